"""CosyVoice 1.0 family: TransformerLM (llm), MaskedDiffWithXvec (flow), family wiring (model)."""

"""Fun-CosyVoice3-0.5B family: CosyVoice3LM, CausalMaskedDiffWithDiT flow, CausalHiFT vocoder."""

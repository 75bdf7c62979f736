"""CosyVoice2-0.5B family: Qwen2 LLM, chunk-causal flow with fixed noise, HiFT at 24 kHz."""

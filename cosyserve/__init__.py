"""cosyserve: an inference server for the CosyVoice family of text-to-speech models."""

__version__ = "0.1.0"

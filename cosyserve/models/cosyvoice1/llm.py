"""CosyVoice 1.0 text-to-speech-token LM (``TransformerLM``, spec §8).

A causal Conformer encodes the text; a 14-layer causal Transformer with relative positions then
continues [sos, x-vector, text, task_id, prompt speech tokens] with speech tokens (eos = 4096).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cosyserve.models.cosyvoice1.config import TransformerLMConfig
from cosyserve.models.llm import SpeechTokenLM, TokenIds, as_ids
from cosyserve.nn.kv_cache import KVCache


class TransformerLM(SpeechTokenLM):
    """v1 LLM with the reference parameter names (``llm.pt`` loads strictly)."""

    def __init__(self, config: TransformerLMConfig) -> None:
        super().__init__()
        self.speech_token_size = config.speech_token_size
        self.sampling_args = dict(config.sampling)
        self.text_embedding = nn.Embedding(config.text_token_size, config.text_encoder_input_size)
        self.text_encoder = config.text_encoder.build()
        self.text_encoder_affine_layer = nn.Linear(self.text_encoder.output_size, config.llm_input_size)
        self.llm_embedding = nn.Embedding(2, config.llm_input_size)  # row 0: sos, row 1: task id
        self.llm = config.llm.build()
        self.llm_decoder = nn.Linear(config.llm_output_size, config.speech_token_size + 1)
        self.speech_embedding = nn.Embedding(config.speech_token_size, config.llm_input_size)
        self.spk_embed_affine_layer = nn.Linear(config.spk_embed_dim, config.llm_input_size)

    def build_prefix(
        self, text: TokenIds, prompt_text: TokenIds, prompt_speech_token: TokenIds, embedding: Tensor | None = None
    ) -> Tensor:
        """[sos ; x-vector ; encoded prompt_text + text ; task_id ; prompt speech] -> (1, L0, D).

        ``embedding`` is the (1, 192) x-vector, or (0, 192) / None for none.
        """
        device = self.speech_embedding.weight.device
        ids = torch.cat([as_ids(prompt_text, device), as_ids(text, device)])
        x = self.text_embedding(ids)[None]
        x, _ = self.text_encoder(x, torch.tensor([ids.numel()], device=device))
        text_part = self.text_encoder_affine_layer(x)[0]
        if embedding is not None and embedding.numel() > 0:
            emb = embedding.reshape(1, -1).to(device=device, dtype=self.speech_embedding.weight.dtype)
            spk = self.spk_embed_affine_layer(F.normalize(emb, dim=1))
        else:
            spk = text_part.new_zeros(0, text_part.size(1))
        table = self.llm_embedding.weight
        parts = [table[0:1], spk, text_part, table[1:2], self.speech_embedding(as_ids(prompt_speech_token, device))]
        return torch.cat(parts, dim=0)[None]

    def feed(self, inputs: Tensor, cache: KVCache | None) -> tuple[Tensor, KVCache]:
        cache = cache if cache is not None else self.llm.new_cache()
        return self.llm.forward_chunk(inputs, cache)[0, -1], cache

    def decode_batch(self, token_ids: Tensor, cache: KVCache) -> Tensor:
        """Feed one speech token per cache row, ids (B,), after each row's own history (the cache is
        extended in place); return the new hidden states (B, D)."""
        x = self.speech_embedding(token_ids.to(self.speech_embedding.weight.device))[:, None, :]
        return self.llm.forward_chunk(x, cache)[:, -1]

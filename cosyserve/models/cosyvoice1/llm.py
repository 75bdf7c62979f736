"""CosyVoice 1.0 text-to-speech-token LM (``TransformerLM``, spec §8).

A causal Conformer encodes the text; a 14-layer causal Transformer with relative positions then
continues [sos, x-vector, text, task_id, prompt speech tokens] with speech tokens (eos = 4096).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cosyserve.models.base import MAX_TOKEN_TEXT_RATIO, MIN_TOKEN_TEXT_RATIO
from cosyserve.models.cosyvoice1.config import TransformerLMConfig
from cosyserve.nn.kv_cache import KVCache
from cosyserve.nn.sampling import RasSampler, Sampler, sample_tokens

TokenIds = Tensor | Sequence[int] | None


def as_ids(ids: TokenIds, device: torch.device) -> Tensor:
    """(1, L) / (L,) tensor, int sequence or None (empty) -> (L,) int64 on ``device``."""
    if ids is None:
        return torch.zeros(0, dtype=torch.long, device=device)
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1).to(device)


class TransformerLM(nn.Module):
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

    @property
    def eos_token(self) -> int:
        return self.speech_token_size

    @property
    def stop_token_ids(self) -> range:
        return range(self.speech_token_size, self.speech_token_size + 1)

    @property
    def hidden_size(self) -> int:
        return self.speech_embedding.embedding_dim

    def make_sampler(self, generator: torch.Generator | None = None) -> RasSampler:
        """The yaml's repetition-aware sampler drawing from ``generator``."""
        return RasSampler(**self.sampling_args, generator=generator)

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

    def prefill(self, prefix: Tensor) -> tuple[Tensor, KVCache]:
        """Run the prefix (1, L0, D) causally through a fresh cache; return the last hidden (D,) and the cache."""
        cache = self.llm.new_cache()
        return self.llm.forward_chunk(prefix, cache)[0, -1], cache

    def decode_batch(self, token_ids: Tensor, cache: KVCache) -> Tensor:
        """Feed one speech token per cache row, ids (B,), after each row's own history (the cache is
        extended in place); return the new hidden states (B, D)."""
        x = self.speech_embedding(token_ids.to(self.speech_embedding.weight.device))[:, None, :]
        return self.llm.forward_chunk(x, cache)[:, -1]

    def decode_step(self, token_id: int, cache: KVCache) -> Tensor:
        """One row's :meth:`decode_batch`: its hidden state (D,)."""
        return self.decode_batch(torch.tensor([int(token_id)]), cache)[0]

    def logp(self, hidden: Tensor) -> Tensor:
        """(..., D) hidden states -> (..., V) log-probabilities; V = speech_token_size + 1 (eos last)."""
        # In fp32 whatever the LLM's precision: the sampler's nucleus cut-off needs it.
        # 2-D for the int8 (dynamically quantized) linear layer.
        logits = self.llm_decoder(hidden.reshape(-1, hidden.shape[-1])).reshape(*hidden.shape[:-1], -1)
        return logits.float().log_softmax(dim=-1)

    def mask_early_stop(self, logp: Tensor) -> Tensor:
        """The scores the sampler sees before ``min_len``: eos at -inf."""
        scores = logp.clone()
        scores[..., self.speech_token_size :] = float("-inf")
        return scores

    def inference(
        self,
        text: TokenIds,
        prompt_text: TokenIds,
        prompt_speech_token: TokenIds,
        embedding: Tensor | None,
        sampler: Sampler | None = None,
        min_len: int | None = None,
        max_len: int | None = None,
    ) -> Iterator[int]:
        """Speech token ids, one at a time; the prefix is built now, decoding runs lazily.

        ``min_len`` / ``max_len`` default to 2x / 20x the number of ``text`` tokens (prompt text
        excluded). eos cannot be chosen before ``min_len`` tokens; at most ``max_len`` are produced.
        ``sampler`` defaults to the yaml's RAS sampler with a fresh random seed. Closing the
        iterator stops decoding.
        """
        n_text = int(as_ids(text, torch.device("cpu")).numel())
        min_len = MIN_TOKEN_TEXT_RATIO * n_text if min_len is None else min_len
        max_len = MAX_TOKEN_TEXT_RATIO * n_text if max_len is None else max_len
        with torch.inference_mode():
            prefix = self.build_prefix(text, prompt_text, prompt_speech_token, embedding)
        return self._decode(prefix, sampler or self.make_sampler(), min_len, max_len)

    def _decode(self, prefix: Tensor, sampler: Sampler, min_len: int, max_len: int) -> Iterator[int]:
        cache: list[KVCache] = []

        def next_logp(token: int | None) -> Tensor:
            if token is None:
                hidden, state = self.prefill(prefix)
                cache.append(state)
            else:
                hidden = self.decode_step(token, cache[0])
            return self.logp(hidden)

        return sample_tokens(next_logp, sampler, self.stop_token_ids, min_len, max_len, self.mask_early_stop)

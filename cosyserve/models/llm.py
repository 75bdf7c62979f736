"""What every text-to-speech-token LM shares: the speech vocabulary's stop ids, log-probs, the sampler
from the yaml and a one-sequence generation loop.

Each family's LM writes how its prefix is built and run (``build_prefix``, ``feed``,
``decode_batch``); the engine batches those steps across requests. :meth:`SpeechTokenLM.generate`
runs them for one sequence alone (tests and scripts), with the engine's own per-row rules
(:class:`~cosyserve.nn.sampling.TokenRules`), so there is one way to pick tokens.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from cosyserve.models.base import MAX_TOKEN_TEXT_RATIO, MIN_TOKEN_TEXT_RATIO
from cosyserve.nn.kv_cache import KVCache
from cosyserve.nn.sampling import RasSampler, Sampler, TokenRules

TokenIds = Tensor | Sequence[int] | None


def as_ids(ids: TokenIds, device: torch.device) -> Tensor:
    """(1, L) / (L,) tensor, int sequence or None (empty) -> (L,) int64 on ``device``."""
    if ids is None:
        return torch.zeros(0, dtype=torch.long, device=device)
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1).to(device)


class SpeechTokenLM(nn.Module):
    """The base of every family's LLM. Speech vocabulary: ``speech_token_size`` codes, then
    ``num_special_tokens`` ids that all stop decoding (eos first unless a family says otherwise).

    Subclasses set ``speech_token_size``, ``sampling_args``, ``speech_embedding`` and ``llm_decoder``.
    """

    num_special_tokens = 1
    speech_token_size: int
    sampling_args: dict[str, Any]
    speech_embedding: nn.Embedding
    llm_decoder: nn.Module

    @property
    def eos_token(self) -> int:
        return self.speech_token_size

    @property
    def hidden_size(self) -> int:
        return self.speech_embedding.embedding_dim

    @property
    def stop_token_ids(self) -> range:
        return range(self.speech_token_size, self.speech_token_size + self.num_special_tokens)

    def make_sampler(self, generator: torch.Generator | None = None) -> RasSampler:
        """The yaml's repetition-aware sampler drawing from ``generator``."""
        return RasSampler(**self.sampling_args, generator=generator)

    @abstractmethod
    def build_prefix(
        self, text: TokenIds, prompt_text: TokenIds, prompt_speech_token: TokenIds, embedding: Tensor | None = None
    ) -> Tensor:
        """The embedded prefix (1, L0, D) the LM continues with speech tokens."""

    @abstractmethod
    def feed(self, inputs: Tensor, cache: KVCache | None) -> tuple[Tensor, KVCache]:
        """Run (1, t, D) inputs after a one-row ``cache``'s history (None: a fresh cache); return the
        last hidden state (D,) and the extended cache. A prefix fed in pieces equals it fed whole."""

    def prefill(self, prefix: Tensor) -> tuple[Tensor, KVCache]:
        """Run the prefix (1, L0, D) through a fresh cache; return the last hidden state (D,) and the cache."""
        return self.feed(prefix, None)

    @abstractmethod
    def decode_batch(self, token_ids: Tensor, cache: KVCache) -> Tensor:
        """Feed one speech token per cache row, ids (B,), after each row's own history (the cache is
        extended in place); return the new hidden states (B, D)."""

    def decode_step(self, token_id: int, cache: KVCache) -> Tensor:
        """One row's :meth:`decode_batch`: its hidden state (D,)."""
        return self.decode_batch(torch.tensor([int(token_id)]), cache)[0]

    def logp(self, hidden: Tensor) -> Tensor:
        """(..., D) hidden states -> (..., V) log-probabilities over the speech vocabulary."""
        # In fp32 whatever the LLM's precision: the sampler's nucleus cut-off needs it.
        # 2-D for the int8 (dynamically quantized) linear layer.
        logits = self.llm_decoder(hidden.reshape(-1, hidden.shape[-1])).reshape(*hidden.shape[:-1], -1)
        return logits.float().log_softmax(dim=-1)

    def mask_early_stop(self, logp: Tensor) -> Tensor:
        """The scores the sampler sees before ``min_len``: every stop id at -inf."""
        scores = logp.clone()
        scores[..., self.speech_token_size :] = float("-inf")
        return scores

    def generate(
        self,
        text: TokenIds,
        prompt_text: TokenIds,
        prompt_speech_token: TokenIds,
        embedding: Tensor | None,
        sampler: Sampler | None = None,
        min_len: int | None = None,
        max_len: int | None = None,
        **mask_options: Any,
    ) -> Iterator[int]:
        """Speech token ids of one sequence, one at a time; the prefix is built (and checked) now,
        decoding runs lazily. Closing the iterator stops decoding.

        ``min_len`` / ``max_len`` default to 2x / 20x the number of ``text`` tokens (prompt text
        excluded): no stop id before ``min_len`` tokens, at most ``max_len`` tokens. ``sampler``
        defaults to the yaml's RAS sampler with a fresh random seed. ``mask_options`` go to
        :meth:`mask_early_stop` (v2/v3: ``reference_eos_mask`` for this call).
        """
        n_text = int(as_ids(text, torch.device("cpu")).numel())
        min_len = MIN_TOKEN_TEXT_RATIO * n_text if min_len is None else min_len
        max_len = MAX_TOKEN_TEXT_RATIO * n_text if max_len is None else max_len
        with torch.inference_mode():
            prefix = self.build_prefix(text, prompt_text, prompt_speech_token, embedding)

        def mask(logp: Tensor) -> Tensor:
            return self.mask_early_stop(logp, **mask_options)

        rules = TokenRules(sampler or self.make_sampler(), self.stop_token_ids, min_len, max_len, mask)
        return self._decode(prefix, rules)

    def _decode(self, prefix: Tensor, rules: TokenRules) -> Iterator[int]:
        cache: KVCache | None = None
        token: int | None = None
        while not rules.stopped:
            with torch.inference_mode():
                if cache is None:
                    hidden, cache = self.prefill(prefix)
                else:
                    hidden = self.decode_step(token, cache)
                token = rules.pick(self.logp(hidden))
            if token is None:
                return
            yield token

"""CosyVoice2 text-to-speech-token LM (``Qwen2LM``): a Qwen2 body between text and speech embeddings.

Uni-stream inference (the whole text is known when decoding starts) through ``build_prefix`` /
``prefill`` / ``decode_batch``; bi-streaming text input (spec §9.4) through ``new_bistream``, whose
per-request state says what to ``feed`` (models/cosyvoice2/bistream.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from cosyserve.models.base import MAX_TOKEN_TEXT_RATIO, MIN_TOKEN_TEXT_RATIO
from cosyserve.models.cosyvoice2.bistream import BistreamInput, Item
from cosyserve.models.cosyvoice2.config import Qwen2LMConfig
from cosyserve.nn.qwen2 import KVCache, Qwen2Config, Qwen2ForCausalLM
from cosyserve.nn.sampling import RasSampler, Sampler, sample_tokens

TokenIds = Tensor | Sequence[int] | None


def as_ids(ids: TokenIds, device: torch.device) -> Tensor:
    """(1, L) / (L,) tensor, int sequence or None (empty) -> (L,) int64 on ``device``."""
    if ids is None:
        return torch.zeros(0, dtype=torch.long, device=device)
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1).to(device)


class Qwen2Encoder(nn.Module):
    """Holds the HF-layout ``Qwen2ForCausalLM`` under ``model`` (keys ``llm.model.model.*``)."""

    def __init__(self, cfg: Qwen2Config) -> None:
        super().__init__()
        self.model = Qwen2ForCausalLM(cfg)

    def forward(self, xs: Tensor, cache: KVCache | None = None) -> Tensor:
        """(1, t, D) inputs -> (1, t, D) final-normed hidden states; ``cache`` is extended in place."""
        return self.model.model(xs, cache)


class Qwen2LM(nn.Module):
    """v2 LLM. Speech vocabulary: ``speech_token_size`` codes, then eos, an unused id and fill.

    Decoding stops on any special id (>= ``speech_token_size``). Before ``min_len`` tokens every
    special id is masked; ``reference_eos_mask=True`` masks only id ``speech_token_size`` as the
    reference does (for v2 that id is eos and the other two are never trained targets, so the two
    settings agree in practice; for v3 they do not).
    """

    num_special_tokens = 3
    decoder_bias = True

    def __init__(self, config: Qwen2LMConfig, reference_eos_mask: bool = False) -> None:
        super().__init__()
        d = config.qwen.hidden_size
        self.speech_token_size = config.speech_token_size
        self.sampling_args = dict(config.sampling)
        self.reference_eos_mask = reference_eos_mask
        self._build_task_embeddings(d)
        self.llm = Qwen2Encoder(config.qwen)
        vocab = config.speech_token_size + self.num_special_tokens
        self.llm_decoder = nn.Linear(d, vocab, bias=self.decoder_bias)
        self.speech_embedding = nn.Embedding(vocab, d)

    def _build_task_embeddings(self, d: int) -> None:
        self.llm_embedding = nn.Embedding(2, d)  # row 0: sos, row 1: task id

    def _sos_and_task(self) -> tuple[Tensor, Tensor]:
        w = self.llm_embedding.weight
        return w[0], w[1]

    @property
    def eos_token(self) -> int:
        return self.speech_token_size

    @property
    def fill_token(self) -> int:
        """The bi-streaming "need more text" marker."""
        return self.speech_token_size + 2

    @property
    def hidden_size(self) -> int:
        return self.speech_embedding.embedding_dim

    @property
    def stop_token_ids(self) -> range:
        return range(self.speech_token_size, self.speech_token_size + self.num_special_tokens)

    def make_sampler(self, generator: torch.Generator | None = None) -> RasSampler:
        """The yaml's repetition-aware sampler drawing from ``generator``."""
        return RasSampler(**self.sampling_args, generator=generator)

    def _check_text(self, ids: Tensor) -> None:
        """Hook for family-specific input requirements."""

    def build_prefix(
        self, text: TokenIds, prompt_text: TokenIds, prompt_speech_token: TokenIds, embedding: Tensor | None = None
    ) -> Tensor:
        """[sos ; embed(prompt_text + text) ; task_id ; speech_embedding(prompt speech)] -> (1, L0, D).

        ``embedding`` (the speaker x-vector) is accepted for interface parity and unused by v2/v3.
        """
        device = self.speech_embedding.weight.device
        ids = torch.cat([as_ids(prompt_text, device), as_ids(text, device)])
        self._check_text(ids)
        sos, task = self._sos_and_task()
        parts = [
            sos[None],
            self.llm.model.model.embed_tokens(ids),
            task[None],
            self.speech_embedding(as_ids(prompt_speech_token, device)),
        ]
        return torch.cat(parts, dim=0)[None]

    def prefill(self, prefix: Tensor) -> tuple[Tensor, KVCache]:
        """Run the prefix (1, L0, D) through a fresh cache; return the last hidden state (D,) and the cache."""
        cache = self.llm.model.model.new_cache()
        return self.llm(prefix, cache)[0, -1], cache

    def decode_batch(self, token_ids: Tensor, cache: KVCache) -> Tensor:
        """Feed one speech token per cache row, ids (B,), after each row's own history (the cache is
        extended in place); return the new hidden states (B, D)."""
        x = self.speech_embedding(token_ids.to(self.speech_embedding.weight.device))[:, None, :]
        return self.llm(x, cache)[:, -1]

    def decode_step(self, token_id: int, cache: KVCache) -> Tensor:
        """One row's :meth:`decode_batch`: its hidden state (D,)."""
        return self.decode_batch(torch.tensor([int(token_id)]), cache)[0]

    # -- bi-streaming text input (spec §9.4) -------------------------------------------------------
    def split_bistream_prompt(self, prompt_text: TokenIds) -> tuple[list[int], list[int]]:
        """The prompt text ids fed right after sos, and those that head the streamed text (v2: all)."""
        return [], as_ids(prompt_text, torch.device("cpu")).tolist()

    def new_bistream(
        self, prompt_text: TokenIds, prompt_speech_token: TokenIds, sampler: Sampler, max_tokens: int
    ) -> BistreamInput:
        """A fresh per-request bi-streaming state (the text comes later, through its ``add_text``)."""
        head, rest = self.split_bistream_prompt(prompt_text)
        return BistreamInput(
            head=head,
            prompt_text=rest,
            prompt_speech=as_ids(prompt_speech_token, torch.device("cpu")).tolist(),
            sampler=sampler,
            speech_token_size=self.speech_token_size,
            fill=self.fill_token,
            eos=self.eos_token,
            max_tokens=max_tokens,
        )

    def embed_inputs(self, items: Sequence[Item]) -> Tensor:
        """(1, n, D) input embeddings of bi-streaming positions (sos, task, text ids, speech ids)."""
        device = self.speech_embedding.weight.device
        sos, task = self._sos_and_task()
        rows: list[Tensor] = []
        start = 0
        while start < len(items):  # one embedding lookup per run of the same kind
            kind = items[start][0]
            end = start
            while end < len(items) and items[end][0] == kind:
                end += 1
            if kind in ("sos", "task"):
                rows.append((sos if kind == "sos" else task)[None].expand(end - start, -1))
            else:
                table = self.llm.model.model.embed_tokens if kind == "text" else self.speech_embedding
                rows.append(table(torch.tensor([i for _, i in items[start:end]], dtype=torch.long, device=device)))
            start = end
        return torch.cat(rows, dim=0)[None]

    def feed(self, inputs: Tensor, cache: KVCache | None) -> tuple[Tensor, KVCache]:
        """Run (1, t, D) inputs after a one-row ``cache``'s history (None: a fresh cache); the last
        hidden state (D,) and the extended cache."""
        cache = cache if cache is not None else self.llm.model.model.new_cache()
        return self.llm(inputs, cache)[0, -1], cache

    def logp(self, hidden: Tensor) -> Tensor:
        """(..., D) hidden states -> (..., V) log-probabilities over the speech vocabulary."""
        # In fp32 whatever the LLM's precision: the sampler's nucleus cut-off needs it.
        # 2-D for the int8 (dynamically quantized) linear layer.
        logits = self.llm_decoder(hidden.reshape(-1, hidden.shape[-1])).reshape(*hidden.shape[:-1], -1)
        return logits.float().log_softmax(dim=-1)

    def mask_early_stop(self, logp: Tensor, reference_eos_mask: bool | None = None) -> Tensor:
        """Scores the sampler sees before ``min_len``: the stop ids (or the reference's one id) at -inf."""
        ref = self.reference_eos_mask if reference_eos_mask is None else reference_eos_mask
        scores = logp.clone()
        if ref:
            scores[..., self.speech_token_size] = float("-inf")
        else:
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
        reference_eos_mask: bool | None = None,
    ) -> Iterator[int]:
        """Speech token ids, one at a time. The inputs are checked now; decoding runs lazily.

        ``min_len`` / ``max_len`` default to 2x / 20x the number of ``text`` tokens (prompt text
        excluded). ``sampler`` defaults to the yaml's RAS sampler with a fresh random seed.
        ``reference_eos_mask`` overrides the instance setting for this call. Closing the iterator
        stops decoding.
        """
        n_text = int(as_ids(text, torch.device("cpu")).numel())
        min_len = MIN_TOKEN_TEXT_RATIO * n_text if min_len is None else min_len
        max_len = MAX_TOKEN_TEXT_RATIO * n_text if max_len is None else max_len
        with torch.inference_mode():
            prefix = self.build_prefix(text, prompt_text, prompt_speech_token, embedding)
        return self._decode(prefix, sampler or self.make_sampler(), min_len, max_len, reference_eos_mask)

    def _decode(
        self, prefix: Tensor, sampler: Sampler, min_len: int, max_len: int, reference_eos_mask: bool | None
    ) -> Iterator[int]:
        cache: list[KVCache] = []

        def next_logp(token: int | None) -> Tensor:
            if token is None:
                hidden, state = self.prefill(prefix)
                cache.append(state)
            else:
                hidden = self.decode_step(token, cache[0])
            return self.logp(hidden)

        def mask(logp: Tensor) -> Tensor:
            return self.mask_early_stop(logp, reference_eos_mask)

        return sample_tokens(next_logp, sampler, self.stop_token_ids, min_len, max_len, mask)

"""CosyVoice2 text-to-speech-token LM (``Qwen2LM``): a Qwen2 body between text and speech embeddings.

Uni-stream inference (the whole text is known when decoding starts) through ``build_prefix`` /
``prefill`` / ``decode_batch``; bi-streaming text input (spec §9.4) through ``new_bistream``, whose
per-request state says what to ``feed`` (models/bistream.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from cosyserve.models.bistream import BistreamInput, Item
from cosyserve.models.cosyvoice2.config import Qwen2LMConfig
from cosyserve.models.llm import SpeechTokenLM, TokenIds, as_ids
from cosyserve.nn.qwen2 import KVCache, Qwen2Config, Qwen2ForCausalLM
from cosyserve.nn.sampling import Sampler


class Qwen2Encoder(nn.Module):
    """Holds the HF-layout ``Qwen2ForCausalLM`` under ``model`` (keys ``llm.model.model.*``)."""

    def __init__(self, cfg: Qwen2Config) -> None:
        super().__init__()
        self.model = Qwen2ForCausalLM(cfg)

    def forward(self, xs: Tensor, cache: KVCache | None = None) -> Tensor:
        """(1, t, D) inputs -> (1, t, D) final-normed hidden states; ``cache`` is extended in place."""
        return self.model.model(xs, cache)


class Qwen2LM(SpeechTokenLM):
    """v2 LLM. Speech vocabulary: ``speech_token_size`` codes, then eos, an unused id and fill.

    Decoding stops on any special id (>= ``speech_token_size``). Before ``min_len`` tokens every
    special id is masked; ``reference_eos_mask=True`` masks only id ``speech_token_size`` as the
    reference does (for v2 that id is eos and the other two are never trained targets, so the two
    settings agree in practice; for v3 they do not).
    """

    num_special_tokens = 3
    decoder_bias = True

    def __init__(self, config: Qwen2LMConfig) -> None:
        super().__init__()
        d = config.qwen.hidden_size
        self.speech_token_size = config.speech_token_size
        self.sampling_args = dict(config.sampling)
        self.reference_eos_mask = config.reference_eos_mask
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
    def fill_token(self) -> int:
        """The bi-streaming "need more text" marker."""
        return self.speech_token_size + 2

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

    def feed(self, inputs: Tensor, cache: KVCache | None) -> tuple[Tensor, KVCache]:
        cache = cache if cache is not None else self.llm.model.model.new_cache()
        return self.llm(inputs, cache)[0, -1], cache

    def decode_batch(self, token_ids: Tensor, cache: KVCache) -> Tensor:
        """Feed one speech token per cache row, ids (B,), after each row's own history (the cache is
        extended in place); return the new hidden states (B, D)."""
        x = self.speech_embedding(token_ids.to(self.speech_embedding.weight.device))[:, None, :]
        return self.llm(x, cache)[:, -1]

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

    def mask_early_stop(self, logp: Tensor, reference_eos_mask: bool | None = None) -> Tensor:
        """Scores the sampler sees before ``min_len``: the stop ids (or the reference's one id) at -inf."""
        if not (self.reference_eos_mask if reference_eos_mask is None else reference_eos_mask):
            return super().mask_early_stop(logp)
        scores = logp.clone()
        scores[..., self.speech_token_size] = float("-inf")
        return scores

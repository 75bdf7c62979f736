"""Fun-CosyVoice3 LM (``CosyVoice3LM``): the v2 LM with its special ids inside the speech vocabulary."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

from cosyserve.errors import InvalidRequest
from cosyserve.models.base import MAX_SILENT_RUN, SilenceFilter
from cosyserve.models.cosyvoice2.llm import Qwen2LM, TokenIds, as_ids

# Text id of <|endofprompt|>: v3 was trained with a system prompt ending in it before the target text.
ENDOFPROMPT_ID = 151646

# FSQ codes of silence / breath. Long runs of them are trimmed before the flow (the LM sees them all).
SILENT_TOKENS = frozenset({1, 2, 28, 29, 55, 248, 494, 2241, 2242, 2322, 2323})


class CosyVoice3LM(Qwen2LM):
    """v3 LLM: no ``llm_embedding``, no decoder bias; 200 specials after the speech codes.

    sos = speech_token_size, eos = +1, task id = +2, fill = +3; every special id stops decoding.
    Before ``min_len`` all specials are masked (what the model was trained for). The reference masks
    only id ``speech_token_size`` (sos, not eos), so there eos can end decoding early:
    ``reference_eos_mask=True`` reproduces that.
    """

    num_special_tokens = 200
    decoder_bias = False

    def _build_task_embeddings(self, d: int) -> None:
        pass  # sos and the task id are rows of speech_embedding

    @property
    def eos_token(self) -> int:
        return self.speech_token_size + 1

    @property
    def fill_token(self) -> int:
        return self.speech_token_size + 3

    def split_bistream_prompt(self, prompt_text: TokenIds) -> tuple[list[int], list[int]]:
        """v3 feeds the prompt text up to and including ``<|endofprompt|>`` right after sos (spec §9.4)."""
        ids = as_ids(prompt_text, torch.device("cpu")).tolist()
        if ENDOFPROMPT_ID not in ids:
            raise InvalidRequest(
                "CosyVoice3 with streamed text needs '<|endofprompt|>' in the prompt text "
                "(e.g. 'You are a helpful assistant.<|endofprompt|>' before the transcript)"
            )
        end = ids.index(ENDOFPROMPT_ID) + 1
        return ids[:end], ids[end:]

    def _sos_and_task(self) -> tuple[Tensor, Tensor]:
        w = self.speech_embedding.weight
        return w[self.speech_token_size], w[self.speech_token_size + 2]

    def _check_text(self, ids: Tensor) -> None:
        if not bool((ids == ENDOFPROMPT_ID).any()):
            raise InvalidRequest(
                "CosyVoice3 needs '<|endofprompt|>' in the prompt text or the text "
                "(e.g. 'You are a helpful assistant.<|endofprompt|>' before it)"
            )


def drop_excess_silence(
    tokens: Iterable[int], silent: frozenset[int] = SILENT_TOKENS, max_run: int = MAX_SILENT_RUN
) -> Iterator[int]:
    """:class:`SilenceFilter` over an iterable, lazily; closing it closes ``tokens`` too."""
    it = iter(tokens)
    silence = SilenceFilter(silent, max_run)
    try:
        for token in it:
            if silence.keep(token):
                yield token
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()

"""Bi-streaming text input for the v2 / v3 LLMs (spec §9.4): speech is generated while the text is
still arriving, in the layout the models were trained on (5 text tokens, then 15 speech tokens).

:class:`BistreamInput` is ONE request's state (its own object, never the shared model's): the text
not yet fed, the prompt speech not yet fed, the ids generated so far and when the next fill marker
is due. The caller (the engine's scheduler) asks :meth:`BistreamInput.next_input` what to feed next
(several positions at once, one speech id, or nothing until more text comes), runs the LLM on it
and hands the step's log-probs to :meth:`BistreamInput.pick`.

The interleave:

1. ``[sos]`` (v3: then the prompt text up to and including ``<|endofprompt|>``); the rest of the
   prompt text heads the text queue, the streamed target text follows it.
2. While prompt speech is left: 5 text tokens + the next 15 prompt speech tokens (the last group may
   be shorter), waiting for text as needed.
3. Decoding: a fill marker is forced when ``len(out) == next_fill`` (first at
   ``(P // 15 + 1) * 15 - P``, then every 16 ids); after a fill (forced or sampled) the next 5 text
   tokens are fed. While the text goes on every special id but fill is masked (no eos).
4. Once the text has ended: the remaining text + task id are fed and decoding runs to eos.

Where this departs from the reference (each a probable bug there, spec §9.4 "Observations", §17.5):

- after a fill the stale input (already in the KV cache) is NOT fed a second time with the final
  text: the training sequences have no such duplicate;
- with no prompt speech, decoding waits for 5 text tokens first also on v3 (the reference starts on
  the instruction alone and forces a fill after 15 ids spoken without any target text);
- a text that ends before the prompt speech is used up is followed by the task id and the rest of the
  prompt speech (the reference drops that prompt speech), i.e. the uni-stream prefix;
- rounds go on while 5 text tokens wait (the reference runs at most one round per incoming text
  token, so a backlog of prompt text is fed later there); the layout does not depend on how the text
  was cut or when it arrived, only on its tokens;
- the final stage is bounded like uni-stream decoding: eos is masked until 2 speech ids per target
  text token exist, and decoding stops at 20 per text token (the reference has no bound);
- every special id but fill (while the text goes on) or eos (after it) is masked, instead of the
  reference's one masked id and an error when another special id is drawn.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from torch import Tensor

from cosyserve.errors import TextError
from cosyserve.models.base import MAX_TOKEN_TEXT_RATIO, MIN_TOKEN_TEXT_RATIO
from cosyserve.nn.sampling import Sampler

MIX_TEXT, MIX_SPEECH = 5, 15  # the trained interleave: 5 text tokens, then 15 speech tokens

# One LLM input position: ("sos" | "task", 0), ("text", Qwen2 text id) or ("speech", speech id).
Item = tuple[str, int]
SOS: Item = ("sos", 0)
TASK: Item = ("task", 0)


class BistreamInput:
    """One request's bi-streaming state (see the module doc)."""

    def __init__(
        self,
        *,
        head: Sequence[int],
        prompt_text: Sequence[int],
        prompt_speech: Sequence[int],
        sampler: Sampler,
        speech_token_size: int,
        fill: int,
        eos: int,
        max_tokens: int,
    ) -> None:
        self.sampler = sampler
        self.speech_token_size = speech_token_size
        self.fill = fill
        self.eos = eos
        self.max_tokens = max_tokens  # speech ids one request can make (the flow's noise bound)
        self.pending: list[Item] = [SOS, *(("text", int(i)) for i in head)]
        self.text: deque[Item] = deque(("text", int(i)) for i in prompt_text)
        self.prompt_speech: deque[Item] = deque(("speech", int(i)) for i in prompt_speech)
        p = len(self.prompt_speech)
        # The first fill completes the prompt's last group of 15; without prompt speech, a first group.
        self.next_fill = (p // MIX_SPEECH + 1) * MIX_SPEECH - p
        self.need_text = p == 0  # the next feed must bring 5 new text tokens (start / after a fill)
        self.out: list[int] = []  # every id generated, fill markers included (the sampler's history)
        self.speech = 0  # speech ids among them
        self.target_text = 0  # streamed text tokens received
        self.text_closed = False
        self.final = False  # the task id is fed: eos may end it
        self.done = False
        # What was fed, in order, and the fed length at each LLM step (tests check the interleave).
        self.fed: list[Item] = []
        self.step_ends: list[int] = []
        self.forced_steps: list[int] = []  # steps whose id was a forced fill (no sampler call)

    # -- text in -----------------------------------------------------------------------------------
    def add_text(self, ids: Sequence[int]) -> None:
        if self.text_closed:
            raise TextError("the text has ended; no more can be added")
        self.text.extend(("text", int(i)) for i in ids)
        self.target_text += len(ids)

    def close_text(self) -> None:
        self.text_closed = True

    # -- what to feed ------------------------------------------------------------------------------
    @property
    def waiting(self) -> bool:
        """Nothing can be fed until more text comes (or the text ends)."""
        if self.done:
            return True
        if self.prompt_speech or self.need_text:
            return len(self.text) < MIX_TEXT and not self.text_closed
        return not self.pending

    def next_input(self) -> list[Item] | None:
        """The positions the next LLM step feeds (several at once, or one speech id), or None while
        it must wait for text. Taking them records them as fed."""
        if self.done:
            return None
        while self.prompt_speech:
            if len(self.text) >= MIX_TEXT:
                self.pending += self._take_text(MIX_TEXT)
                self.pending += [self.prompt_speech.popleft() for _ in range(min(MIX_SPEECH, len(self.prompt_speech)))]
            elif self.text_closed:
                return self._final()
            else:
                return None
        if self.need_text:
            if len(self.text) >= MIX_TEXT:
                self.pending += self._take_text(MIX_TEXT)
                self.need_text = False
            elif self.text_closed:
                return self._final()
            else:
                return None
        if not self.pending:
            return None
        return self._feed()

    def _take_text(self, n: int) -> list[Item]:
        return [self.text.popleft() for _ in range(n)]

    def _final(self) -> list[Item] | None:
        self.final, self.need_text = True, False
        if self.target_text == 0:  # the text ended with nothing to speak
            self.done = True
            return None
        self.pending += [*self.text, TASK, *self.prompt_speech]
        self.text.clear()
        self.prompt_speech.clear()
        return self._feed()

    def _feed(self) -> list[Item]:
        items, self.pending = self.pending, []
        self.fed += items
        self.step_ends.append(len(self.fed))
        return items

    # -- what came out -----------------------------------------------------------------------------
    def pick(self, logp: Tensor) -> int | None:
        """The id of this step from its (V,) log-probs: a speech id (fed next), ``fill`` (wait for
        text) or None (decoding is over)."""
        if not self.final and len(self.out) == self.next_fill:
            token = self.fill
            self.forced_steps.append(len(self.step_ends) - 1)
        else:
            token = int(self.sampler(self._scores(logp), self.out))
        if token == self.fill and not self.final:
            self.next_fill = len(self.out) + MIX_SPEECH + 1
            self.out.append(token)
            self.need_text = True
            return token
        if token >= self.speech_token_size:  # eos (the only special id left unmasked)
            self.done = True
            return None
        self.out.append(token)
        self.speech += 1
        self.pending = [("speech", token)]
        if self.speech >= self.max_tokens or (self.final and self.speech >= MAX_TOKEN_TEXT_RATIO * self.target_text):
            if not self.final:
                raise TextError(
                    f"the streamed text needs more than the {self.max_tokens} speech tokens one request can make"
                )
            self.done = True
        return token

    def _scores(self, logp: Tensor) -> Tensor:
        scores = logp.clone()
        allowed = self.eos if self.final else self.fill
        keep = scores[allowed].clone()
        scores[self.speech_token_size :] = float("-inf")
        if not self.final or self.speech >= MIN_TOKEN_TEXT_RATIO * self.target_text:
            scores[allowed] = keep
        return scores

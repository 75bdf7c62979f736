"""Token samplers for the LLMs: repetition-aware sampling (spec §8.6) and greedy argmax.

A sampler is called once per decoding step with the log-probabilities of that step (already
masked by the caller, e.g. eos before min_len) and the ids generated so far (prompt excluded).
Every random draw comes from the sampler's own ``torch.Generator``; the global RNG is never used.
"""

from __future__ import annotations

from collections.abc import Callable, Container
from typing import Protocol

import numpy as np
import torch
from torch import Tensor


class Sampler(Protocol):
    def __call__(self, logp: Tensor, history: list[int]) -> int: ...


class GreedySampler:
    """argmax (the first index among ties)."""

    def __call__(self, logp: Tensor, history: list[int]) -> int:
        return int(torch.argmax(logp))


class RasSampler:
    """Nucleus + top-k draw, re-drawn from the full distribution when the pick repeats recently.

    1. probs = softmax(logp); walk them in descending order (stable sort) keeping items while the
       mass kept so far is < top_p and fewer than top_k are kept; draw one in proportion to them.
    2. If the pick occurs >= win_size * tau_r times among the last win_size generated ids, ban it
       and draw from softmax of the remaining scores (no top-k / top-p).
    """

    def __init__(
        self,
        top_p: float = 0.8,
        top_k: int = 25,
        win_size: int = 10,
        tau_r: float = 0.1,
        generator: torch.Generator | None = None,
    ) -> None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_k < 1 or win_size < 1:
            raise ValueError(f"top_k and win_size must be >= 1, got {top_k}, {win_size}")
        self.top_p = float(top_p)
        self.top_k = int(top_k)
        self.win_size = int(win_size)
        self.tau_r = float(tau_r)
        if generator is None:
            generator = torch.Generator()
            generator.seed()
        self.generator = generator

    def __call__(self, logp: Tensor, history: list[int]) -> int:
        scores = logp.detach().to(device=self.generator.device, dtype=torch.float32)
        token = self._nucleus(scores)
        recent = history[-self.win_size :]
        if recent.count(token) >= self.win_size * self.tau_r:
            scores = scores.clone()
            scores[token] = float("-inf")
            # With nothing left to choose from the reference would crash; keep the first pick.
            if torch.isfinite(scores).any():
                token = int(torch.multinomial(scores.softmax(0), 1, replacement=True, generator=self.generator))
        return token

    def _nucleus(self, scores: Tensor) -> int:
        probs, order = scores.softmax(0).sort(descending=True, stable=True)
        head = probs[: self.top_k]
        # The running mass is summed in float32 one item at a time, like the reference's loop
        # (torch.cumsum accumulates in float64 on CPU and can move the cut-off by one item).
        mass = np.cumsum(head.cpu().numpy(), dtype=np.float32)
        before = np.concatenate([np.zeros(1, np.float32), mass[:-1]])
        keep = int(np.count_nonzero(before < np.float32(self.top_p)))
        pick = torch.multinomial(head[:keep], 1, replacement=True, generator=self.generator)
        return int(order[pick])


class TokenRules:
    """One sequence's decoding rules applied to each step's log-probs: stop ids masked for the first
    ``min_len`` steps, at most ``max_len`` ids, stop on a stop id. Holds the ids picked so far, so a
    batched decode keeps one per row and a row's picks do not depend on its batch-mates."""

    def __init__(
        self,
        sampler: Sampler,
        stop_ids: Container[int],
        min_len: int,
        max_len: int,
        mask_early_stop: Callable[[Tensor], Tensor],
    ) -> None:
        self.sampler = sampler
        self.stop_ids = stop_ids
        self.min_len = min_len
        self.max_len = max_len
        self.mask_early_stop = mask_early_stop
        self.history: list[int] = []
        self.stopped = max_len <= 0

    def pick(self, logp: Tensor) -> int | None:
        """The next id for this step's (V,) log-probs, or None once decoding has ended."""
        if self.stopped:
            return None
        # The sampler runs in inference mode too: it may edit the scores in place.
        with torch.inference_mode():
            if len(self.history) < self.min_len:
                logp = self.mask_early_stop(logp)
            token = int(self.sampler(logp, self.history))
        if token in self.stop_ids:
            self.stopped = True
            return None
        self.history.append(token)
        self.stopped = len(self.history) >= self.max_len
        return token

"""What a chunk-causal flow estimator keeps of a streamed request's earlier frames, per Euler step.

A streamed request's estimator runs on the new frames only (``forward_chunk`` of the v2 U-Net and
the v3 DiT); whatever the new frames need from the earlier ones lives in a :data:`ChunkState`, one
per Euler step, owned by the request: attention keys / values (:class:`FrameKV`), the last input
frames of each causal convolution (:func:`left_context`), and tensors that depend on the flow time
only (:func:`per_step`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

# Spare room, as a share of the frames held, reserved when the key / value buffers grow: growing
# by concatenation copied (and page-faulted) the whole cache for every chunk. The room is allocated
# but not written, so on the CPU its pages are not resident until frames fill them.
GROWTH = 1.0


class FrameKV:
    """One attention layer's keys and values of the frames so far, (B, H, S, D), grown along S.

    Storage doubles when full, so appending a chunk copies the earlier frames about once per
    request, and the attention reads strided views of the buffers (no copy).
    """

    def __init__(self) -> None:
        self._k: Tensor | None = None
        self._v: Tensor | None = None
        self.frames = 0

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add ``k`` / ``v`` (B, H, T, D) after the frames so far; return all of them (B, H, S + T, D)."""
        new = k.size(2)
        total = self.frames + new
        if self._k is None or self._k.size(2) < total:
            capacity = total + int(total * GROWTH)
            self._k, self._v = (self._grown(old, like, capacity) for old, like in ((self._k, k), (self._v, v)))
        self._k[:, :, self.frames : total] = k
        self._v[:, :, self.frames : total] = v
        self.frames = total
        return self._k[:, :, :total], self._v[:, :, :total]

    def _grown(self, old: Tensor | None, like: Tensor, capacity: int) -> Tensor:
        buffer = like.new_empty(like.size(0), like.size(1), capacity, like.size(3))
        if old is not None:
            buffer[:, :, : self.frames] = old[:, :, : self.frames]
        return buffer

    @property
    def nbytes(self) -> int:
        """Bytes of the frames held (the untouched spare room is left out)."""
        if self._k is None:
            return 0
        per_frame = self._k[:, :, :1].numel() * self._k.element_size()
        return 2 * per_frame * self.frames


# module -> its state: keys / values, the last input frames, or tensors of the flow time.
ChunkState = dict[nn.Module, FrameKV | tuple[Tensor, ...]]


def state_nbytes(state: ChunkState) -> int:
    """Bytes held by one Euler step's state."""
    total = 0
    for value in state.values():
        if isinstance(value, FrameKV):
            total += value.nbytes
        else:
            total += sum(t.numel() * t.element_size() for t in value)
    return total


def append_kv(state: ChunkState, attention: nn.Module, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """``attention``'s keys / values (B, H, S, D) of the earlier frames and the new ``k`` / ``v``."""
    cache = state.get(attention)
    if not isinstance(cache, FrameKV):
        cache = state[attention] = FrameKV()
    return cache.append(k, v)


def sees_every_frame(offset: int, length: int, chunk: int, left_chunks: int) -> bool:
    """Whether the ``length`` new frames from ``offset`` (a chunk boundary) may all attend to every
    frame so far, so their attention needs no mask (a faster kernel): one chunk, nothing dropped on the left."""
    return length <= chunk and (left_chunks < 0 or offset <= left_chunks * chunk)


def left_context(state: ChunkState, conv: nn.Module, x: Tensor, keep: int) -> Tensor:
    """x (B, C, T) with the last ``keep`` input frames of ``conv``'s earlier calls in front (zeros at first)."""
    (left,) = state.get(conv, (x.new_zeros(x.size(0), x.size(1), keep),))
    x = torch.cat([left, x], dim=2)
    state[conv] = (x[:, :, -keep:],)
    return x


def per_step(
    state: ChunkState, module: nn.Module, t: Tensor, compute: Callable[[], tuple[Tensor, ...]]
) -> tuple[Tensor, ...]:
    """``compute()``, a function of the flow time ``t`` only, from the first chunk's call at this step.

    Every chunk's Euler step k runs at the same t, so the time conditioning (for the DiT: the
    time embedding and every block's AdaLN modulation, matrix-vector products over 25 MB of
    weights per block) is computed once per request and step. A different t recomputes.
    """
    cached = state.get(module)
    if isinstance(cached, tuple) and torch.equal(cached[0], t):
        return cached[1:]
    values = compute()
    state[module] = (t, *values)
    return values

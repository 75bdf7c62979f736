"""What a chunk-causal flow estimator keeps of a streamed request's earlier frames, per Euler step.

A streamed request's estimator runs on the new frames only (``forward_chunk`` of the v2 U-Net and
the v3 DiT); whatever the new frames need from the earlier ones lives in a :data:`ChunkState`, one
per Euler step, owned by the request: attention keys / values (:class:`FrameKV`), the last input
frames of each causal convolution (:func:`left_context`), and tensors that depend on the flow time
only (:func:`per_step`).
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable

import torch
from torch import Tensor, nn

MIN_CAPACITY = 64  # frames: the smallest key / value buffer (capacities are powers of two from here)


class StreamCachePool:
    """What the streamed requests of one model may cache together, and the buffers they give back.

    ``limit_bytes`` bounds the frames all requests' caches hold at once (a request that would pass it
    re-runs its flow from the start for its later chunks instead). Buffers a request no longer needs
    are kept, up to ``keep_bytes``, for the next request: on a VM the first write to fresh memory runs
    at a tenth of the speed of a write to memory already used (2.3 against 21 GB/s measured on a
    2-core EPYC VM), and a 9-s CosyVoice2 stream writes 2 GB of keys / values. Thread-safe (the
    Python API's requests run in their callers' threads)."""

    def __init__(self, limit_bytes: int, keep_bytes: int = 0) -> None:
        self.limit_bytes = limit_bytes
        self.keep_bytes = keep_bytes
        self.in_use = 0  # bytes of frames the requests hold (their reservations)
        self._free: dict[tuple, list[Tensor]] = defaultdict(list)
        self._free_bytes = 0
        self._lock = threading.Lock()

    def reserve(self, nbytes: int) -> bool:
        """Take ``nbytes`` more of the limit for a request; False (nothing taken) if it would pass it."""
        with self._lock:
            if self.in_use + nbytes > self.limit_bytes:
                return False
            self.in_use += nbytes
            return True

    def release(self, nbytes: int) -> None:
        with self._lock:
            self.in_use = max(0, self.in_use - nbytes)

    def take(self, like: Tensor, rows: int, heads: int, frames: int, dim: int) -> Tensor:
        """An uninitialised (rows, heads, capacity, dim) buffer with ``like``'s dtype and device and room
        for at least ``frames`` frames: the smallest given-back one that fits, else a new one of ``frames``."""
        key = (rows, heads, dim, like.dtype, like.device)
        with self._lock:
            free = self._free.get(key, [])
            fitting = [i for i, b in enumerate(free) if b.size(2) >= frames]
            if fitting:
                # by position: list.remove would compare tensors element by element
                buffer = free.pop(min(fitting, key=lambda i: free[i].size(2)))
                self._free_bytes -= buffer.numel() * buffer.element_size()
                return buffer
        return like.new_empty(rows, heads, frames, dim)

    def give(self, buffer: Tensor) -> None:
        """A buffer no request uses any more: kept for reuse while the pool keeps less than ``keep_bytes``."""
        nbytes = buffer.numel() * buffer.element_size()
        rows, heads, _, dim = buffer.shape
        with self._lock:
            if self._free_bytes + nbytes <= self.keep_bytes:
                self._free[(rows, heads, dim, buffer.dtype, buffer.device)].append(buffer)
                self._free_bytes += nbytes

    @property
    def kept_bytes(self) -> int:
        return self._free_bytes


class FrameKV:
    """One attention layer's keys and values of the frames so far, (B, H, S, D), grown along S.

    Capacities are powers of two; a full buffer is replaced by one twice as large (the earlier frames
    copied once; the old one freed, so a request never holds two sizes at once), and a request
    starts from the largest room a finished one gave back to the pool, so it rarely grows at all.
    The attention reads strided views of the buffers (no copy).
    """

    def __init__(self, pool: StreamCachePool | None = None) -> None:
        self.pool = pool
        self._k: Tensor | None = None
        self._v: Tensor | None = None
        self.frames = 0

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add ``k`` / ``v`` (B, H, T, D) after the frames so far; return all of them (B, H, S + T, D)."""
        new = k.size(2)
        total = self.frames + new
        if self._k is None or self._k.size(2) < total:
            capacity = max(MIN_CAPACITY, 1 << (total - 1).bit_length())
            self._k, self._v = (self._grown(old, like, capacity) for old, like in ((self._k, k), (self._v, v)))
        self._k[:, :, self.frames : total] = k
        self._v[:, :, self.frames : total] = v
        self.frames = total
        return self._k[:, :, :total], self._v[:, :, :total]

    def _grown(self, old: Tensor | None, like: Tensor, capacity: int) -> Tensor:
        rows, heads, _, dim = like.shape
        if self.pool is not None:
            buffer = self.pool.take(like, rows, heads, capacity, dim)
        else:
            buffer = like.new_empty(rows, heads, capacity, dim)
        if old is not None:
            buffer[:, :, : self.frames] = old[:, :, : self.frames]
        return buffer

    def _give(self, buffer: Tensor | None) -> None:
        if buffer is not None and self.pool is not None:
            self.pool.give(buffer)

    def close(self) -> None:
        """Give the buffers back (the frames are dropped)."""
        self._give(self._k)
        self._give(self._v)
        self._k = self._v = None
        self.frames = 0

    @property
    def nbytes(self) -> int:
        """Bytes of the frames held (the untouched spare room is left out)."""
        if self._k is None:
            return 0
        per_frame = self._k[:, :, :1].numel() * self._k.element_size()
        return 2 * per_frame * self.frames


# module -> its state: keys / values, the last input frames, or tensors of the flow time (and the
# request's buffer pool under POOL_KEY).
ChunkState = dict[nn.Module | str, FrameKV | tuple[Tensor, ...] | StreamCachePool]


def state_nbytes(state: ChunkState) -> int:
    """Bytes held by one Euler step's state."""
    total = 0
    for value in state.values():
        if isinstance(value, FrameKV):
            total += value.nbytes
        elif isinstance(value, tuple):
            total += sum(t.numel() * t.element_size() for t in value)
    return total


# Where a ChunkState's new key / value buffers come from (the request's pool).
POOL_KEY = "pool"


def append_kv(state: ChunkState, attention: nn.Module, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """``attention``'s keys / values (B, H, S, D) of the earlier frames and the new ``k`` / ``v``."""
    cache = state.get(attention)
    if not isinstance(cache, FrameKV):
        cache = state[attention] = FrameKV(state.get(POOL_KEY))
    return cache.append(k, v)


def close_state(state: ChunkState) -> None:
    """Give every key / value buffer of one Euler step's state back to its pool."""
    for value in state.values():
        if isinstance(value, FrameKV):
            value.close()


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

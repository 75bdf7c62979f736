"""The KV cache of every autoregressive stack (v1 rel-pos Transformer, v2/v3 Qwen2): a batch of rows,
each a request with its own length, joining and leaving at any decode step.

Storage per layer is one ``(rows, heads, capacity, head_dim)`` buffer for keys and one for values,
grown by doubling along both the row and the time axis, so a decode step appends in amortised O(1).
Row ``b`` holds its first ``lengths[b]`` positions; what lies beyond is padding that attention masks.
A layer writes its new keys/values with :meth:`write` (at each row's own length) and the stack calls
:meth:`advance` once after its last layer.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self._k: list[Tensor | None] = [None] * num_layers
        self._v: list[Tensor | None] = [None] * num_layers
        self.lengths: list[int] = []

    # -- shape -------------------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def length(self) -> int:
        """The single row's length (one-request caches: prefill, solo decoding)."""
        if self.rows == 0:
            return 0
        if self.rows != 1:
            raise ValueError("length is defined for a one-row cache; use lengths")
        return self.lengths[0]

    @property
    def uniform(self) -> bool:
        """Every row has the same length (no padding to mask)."""
        return len(set(self.lengths)) <= 1

    def lengths_tensor(self, device: torch.device | str) -> Tensor:
        return torch.tensor(self.lengths, dtype=torch.long, device=device)

    def key_mask(self, new: int, device: torch.device | str) -> Tensor | None:
        """(rows, 1, 1, S) bool, True where key ``j`` is a real position of its row after ``new`` more
        positions are written; None when no row is padded. Only for ``new == 1`` on ragged rows."""
        if self.uniform:
            return None
        span = max(self.lengths) + new
        return (torch.arange(span, device=device)[None, :] < (self.lengths_tensor(device) + new)[:, None])[
            :, None, None, :
        ]

    # -- writing -----------------------------------------------------------------------------------
    def write(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write ``t`` new (rows, heads, t, d) keys/values at each row's length; return every row's
        keys/values so far, (rows, heads, S, d) with S = max(lengths) + t (padded rows masked by the caller)."""
        rows, t = k.shape[0], k.shape[2]
        if rows != max(self.rows, 1) and not (self.rows == 0 and rows == 1):
            raise ValueError(f"{rows} rows of keys for a cache of {self.rows} rows")
        if self.rows == 0:
            self.lengths = [0]
        span = max(self.lengths) + t
        self._reserve(layer, k, v, rows, span)
        buf_k, buf_v = self._k[layer], self._v[layer]
        if self.uniform:
            n = self.lengths[0]
            buf_k[:rows, :, n : n + t] = k
            buf_v[:rows, :, n : n + t] = v
        else:
            if t != 1:
                raise ValueError("rows of different lengths take one new position at a time")
            index = torch.arange(rows, device=k.device)
            at = self.lengths_tensor(k.device)
            buf_k[index, :, at] = k[:, :, 0]
            buf_v[index, :, at] = v[:, :, 0]
        return buf_k[:rows, :, :span], buf_v[:rows, :, :span]

    def advance(self, t: int) -> None:
        """Every row now holds ``t`` more positions (after all layers have written them)."""
        self.lengths = [n + t for n in self.lengths]

    def _reserve(self, layer: int, k: Tensor, v: Tensor, rows: int, span: int) -> None:
        """Make layer ``layer``'s buffers hold at least ``rows`` rows of ``span`` positions."""
        buf = self._k[layer]
        have_rows, have_time = (0, 0) if buf is None else (buf.shape[0], buf.shape[2])
        if have_rows >= rows and have_time >= span:
            return
        cap_rows = have_rows if have_rows >= rows else max(rows, 2 * have_rows)
        cap_time = have_time if have_time >= span else max(span, 2 * have_time, 64)
        for store, like in ((self._k, k), (self._v, v)):
            old = store[layer]
            new = like.new_zeros(cap_rows, like.shape[1], cap_time, like.shape[3])
            if old is not None:
                new[: old.shape[0], :, : old.shape[2]] = old
            store[layer] = new

    # -- rows joining and leaving ----------------------------------------------------------------
    def add_row(self, other: KVCache) -> int:
        """Append ``other``'s single row (a freshly prefilled request) as a new row; returns its index."""
        if other.rows != 1 or other.num_layers != self.num_layers:
            raise ValueError("add_row takes a one-row cache of the same depth")
        n = other.lengths[0]
        row = self.rows
        self.lengths.append(n)
        for layer in range(self.num_layers):
            k, v = other._k[layer], other._v[layer]
            if k is None:
                continue
            self._reserve(layer, k, v, row + 1, n)
            self._k[layer][row, :, :n] = k[0, :, :n]
            self._v[layer][row, :, :n] = v[0, :, :n]
        return row

    def remove_row(self, row: int) -> int | None:
        """Drop ``row``; the last row moves into its place. Returns the index that moved (now ``row``),
        or None when the removed row was the last one."""
        last = self.rows - 1
        if not 0 <= row <= last:
            raise IndexError(f"row {row} of {self.rows}")
        moved = None
        if row != last:
            n = self.lengths[last]
            for layer in range(self.num_layers):
                if self._k[layer] is not None:
                    self._k[layer][row, :, :n] = self._k[layer][last, :, :n]
                    self._v[layer][row, :, :n] = self._v[layer][last, :, :n]
            self.lengths[row] = n
            moved = last
        self.lengths.pop()
        if not self.lengths:
            self.clear()
        return moved

    def take_row(self, row: int) -> tuple[KVCache, int | None]:
        """Take ``row`` out as a one-row cache of its own (a request that must feed several positions
        at once, or wait, outside the batch); returns it and what :meth:`remove_row` returns."""
        if not 0 <= row < self.rows:
            raise IndexError(f"row {row} of {self.rows}")
        if self.rows == 1:  # the only row: hand the storage over as it is
            alone = KVCache(self.num_layers)
            alone._k, alone._v, alone.lengths = self._k, self._v, list(self.lengths)
            self._k, self._v, self.lengths = [None] * self.num_layers, [None] * self.num_layers, []
            return alone, None
        n = self.lengths[row]
        alone = KVCache(self.num_layers)
        alone.lengths = [n]
        for layer in range(self.num_layers):
            k, v = self._k[layer], self._v[layer]
            if k is not None:
                alone._k[layer] = k[row : row + 1, :, : max(n, 1)].clone()
                alone._v[layer] = v[row : row + 1, :, : max(n, 1)].clone()
        return alone, self.remove_row(row)

    def clear(self) -> None:
        """Free the storage (no rows left)."""
        self._k = [None] * self.num_layers
        self._v = [None] * self.num_layers
        self.lengths = []

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self._k, *self._v) if t is not None)

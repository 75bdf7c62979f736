"""The batched KV cache: per-row lengths, rows joining and leaving, and batched decoding equal to solo."""

from __future__ import annotations

import torch

from cosyserve.nn.kv_cache import KVCache
from cosyserve.nn.qwen2 import Qwen2Config, Qwen2Model


def test_write_keeps_history_across_reallocations() -> None:
    cache = KVCache(1)
    chunks = [torch.randn(1, 3, n, 4) for n in (10, 60, 1, 100)]  # crosses two reallocations
    for c in chunks:
        k, v = cache.write(0, c, -c)
        cache.advance(c.shape[2])
    expected = torch.cat(chunks, dim=2)
    assert torch.equal(k, expected) and torch.equal(v, -expected)
    assert cache.length == expected.shape[2]


def _row(length: int, seed: int) -> KVCache:
    row = KVCache(2)
    g = torch.Generator().manual_seed(seed)
    for layer in range(2):
        x = torch.randn(1, 2, length, 3, generator=g)
        row.write(layer, x, x + 1)
    row.advance(length)
    return row


def test_rows_join_write_at_their_own_length_and_leave() -> None:
    batch = KVCache(2)
    rows = [_row(n, seed) for seed, n in enumerate((5, 9, 2))]
    for r in rows:
        batch.add_row(r)
    assert batch.lengths == [5, 9, 2] and not batch.uniform
    new = torch.arange(3 * 2 * 3, dtype=torch.float32).reshape(3, 2, 1, 3)
    k, v = batch.write(0, new, -new)
    assert k.shape == (3, 2, 10, 3)
    for b, n in enumerate((5, 9, 2)):
        assert torch.equal(k[b, :, n], new[b, :, 0]) and torch.equal(v[b, :, n], -new[b, :, 0])
        assert torch.equal(k[b, :, :n], rows[b]._k[0][0, :, :n])
    mask = batch.key_mask(1, "cpu")
    assert mask.shape == (3, 1, 1, 10) and mask[2, 0, 0].tolist() == [True] * 3 + [False] * 7
    batch.advance(1)
    moved = batch.remove_row(0)  # the last row moves into row 0
    assert moved == 2 and batch.lengths == [3, 10]
    assert torch.equal(batch._k[0][0, :, :2], rows[2]._k[0][0, :, :2])
    assert batch.remove_row(1) is None and batch.lengths == [3]
    batch.remove_row(0)
    assert batch.rows == 0 and batch.nbytes == 0  # storage freed with the last row


def test_ragged_batch_decode_equals_each_row_alone() -> None:
    cfg = Qwen2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        vocab_size=50,
    )
    torch.manual_seed(0)
    model = Qwen2Model(cfg).eval()
    prefixes = [torch.randn(1, n, 32) for n in (3, 11, 6)]
    solo_caches, batch = [], KVCache(2)
    with torch.no_grad():
        for p in prefixes:
            c = model.new_cache()
            model(p, c)
            solo_caches.append(c)
            r = model.new_cache()
            model(p, r)
            batch.add_row(r)
        step = torch.randn(3, 1, 32)
        batched = model(step, batch)
        for b, c in enumerate(solo_caches):
            alone = model(step[b : b + 1], c)
            torch.testing.assert_close(batched[b], alone[0], atol=1e-5, rtol=0)


def test_take_row_gives_a_one_row_cache_that_continues_alone() -> None:
    rows = [_row(n, seed) for seed, n in enumerate((5, 9, 2))]
    batch = KVCache(2)
    for r in rows:
        batch.add_row(r)
    alone, moved = batch.take_row(0)  # the last row moves into row 0
    assert moved == 2 and batch.lengths == [2, 9] and alone.lengths == [5]
    for layer in range(2):
        assert torch.equal(alone._k[layer][0, :, :5], rows[0]._k[layer][0, :, :5])
        assert torch.equal(alone._v[layer][0, :, :5], rows[0]._v[layer][0, :, :5])
        assert torch.equal(batch._k[layer][0, :, :2], rows[2]._k[layer][0, :, :2])
    # The taken row grows on its own (several positions at once) and can rejoin a batch.
    x = torch.randn(1, 2, 4, 3)
    k, _ = alone.write(0, x, x)
    assert k.shape == (1, 2, 9, 3) and torch.equal(k[0, :, 5:], x[0])
    alone.write(1, x, x)
    alone.advance(4)
    row = batch.add_row(alone)
    assert row == 2 and batch.lengths == [2, 9, 9]
    assert torch.equal(batch._k[0][2, :, :5], rows[0]._k[0][0, :, :5])
    assert torch.equal(batch._k[0][2, :, 5:9], x[0])
    # The last row left: its storage is handed over and the batch is empty.
    single = KVCache(2)
    single.add_row(rows[1])
    taken, moved = single.take_row(0)
    assert moved is None and single.rows == 0 and single.nbytes == 0 and taken.lengths == [9]
    assert torch.equal(taken._k[1][0, :, :9], rows[1]._k[1][0, :, :9])

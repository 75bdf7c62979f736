"""The streamed flow estimator's per-request state: growing key / value buffers and per-step constants."""

from __future__ import annotations

import pytest
import torch

from cosyserve.nn.chunk_state import FrameKV, StreamCachePool, append_kv, per_step, sees_every_frame, state_nbytes
from cosyserve.nn.dit import DiT
from cosyserve.nn.unet import chunk_attention_mask


def _append_all(cache: FrameKV, sizes: tuple[int, ...], seed: int = 0) -> set[int]:
    """Append chunks of ``sizes`` frames, checking every frame so far comes back; the buffers used."""
    g = torch.Generator().manual_seed(seed)
    chunks = [(torch.randn(2, 3, n, 4, generator=g), torch.randn(2, 3, n, 4, generator=g)) for n in sizes]
    buffers = set()
    for i, (k, v) in enumerate(chunks):
        all_k, all_v = cache.append(k, v)
        torch.testing.assert_close(all_k, torch.cat([c[0] for c in chunks[: i + 1]], dim=2), rtol=0, atol=0)
        torch.testing.assert_close(all_v, torch.cat([c[1] for c in chunks[: i + 1]], dim=2), rtol=0, atol=0)
        buffers |= {all_k.untyped_storage().data_ptr(), all_v.untyped_storage().data_ptr()}
    return buffers


def test_frame_kv_returns_every_frame_so_far_and_grows_rarely():
    cache = FrameKV()
    buffers = _append_all(cache, (40, 10, 20, 30, 20))
    assert cache.frames == 120
    # Power-of-two room: 64 frames, then 128 (one growth, the earlier frames copied once): 2 K + 2 V buffers.
    assert len(buffers) == 4
    assert cache.nbytes == 2 * (2 * 3 * 120 * 4) * 4  # the frames held, not the room


def test_buffers_given_back_to_the_pool_serve_the_next_request_within_its_keep_limit():
    per128 = 2 * 3 * 128 * 4 * 4  # a (2, 3, 128, 4) fp32 buffer
    pool = StreamCachePool(limit_bytes=1 << 30, keep_bytes=1 << 20)
    first = FrameKV(pool)
    used = _append_all(first, (40, 80))  # 64, then 128 frames: the 64-frame K and V are freed, not kept
    assert pool.kept_bytes == 0
    first.close()
    assert first.frames == 0 and pool.kept_bytes == 2 * per128
    second = FrameKV(pool)
    reused = _append_all(second, (30, 30, 30), seed=1)  # starts in the kept 128-frame room: never grows
    assert reused <= used and len(reused) == 2 and pool.kept_bytes == 0
    small = StreamCachePool(limit_bytes=1 << 30, keep_bytes=per128)
    third = FrameKV(small)
    _append_all(third, (100,))
    third.close()
    assert small.kept_bytes == per128  # the keep limit: one of the two buffers kept
    assert pool.reserve(1 << 29) and not pool.reserve(1 << 30)  # the limit holds for all requests
    pool.release(1 << 29)
    assert pool.in_use == 0


def test_pool_picks_the_smallest_fitting_room_among_kept_buffers_of_several_sizes():
    pool = StreamCachePool(limit_bytes=1 << 30, keep_bytes=1 << 20)
    like = torch.zeros(1, 2, 1, 4)
    rooms = [pool.take(like, 1, 2, frames, 4) for frames in (256, 64, 128)]
    for room in rooms:
        pool.give(room)
    taken = pool.take(like, 1, 2, 100, 4)  # 128 fits best; the others stay kept
    assert taken is rooms[2]
    assert pool.take(like, 1, 2, 200, 4) is rooms[0] and pool.take(like, 1, 2, 10, 4) is rooms[1]
    assert pool.kept_bytes == 0


def test_per_step_computes_once_per_flow_time():
    state = {}
    key = torch.nn.Identity()
    calls = []

    def compute(value: float):
        calls.append(value)
        return (torch.full((2,), value),)

    t = torch.tensor([0.3, 0.3])
    (first,) = per_step(state, key, t, lambda: compute(1.0))
    (again,) = per_step(state, key, t.clone(), lambda: compute(2.0))
    assert calls == [1.0] and again is first
    (other,) = per_step(state, key, torch.tensor([0.5, 0.5]), lambda: compute(3.0))
    assert calls == [1.0, 3.0] and other[0] == 3.0
    assert state_nbytes(state) == 2 * 4 + 2 * 4  # t and the value


def test_state_nbytes_counts_key_value_buffers():
    state = {}
    attention = torch.nn.Identity()
    append_kv(state, attention, torch.zeros(1, 2, 10, 8), torch.zeros(1, 2, 10, 8))
    assert state_nbytes(state) == 2 * (1 * 2 * 10 * 8) * 4


@pytest.fixture
def tiny_dit() -> DiT:
    torch.manual_seed(0)
    dit = DiT(
        dim=32, depth=2, heads=2, dim_head=16, ff_mult=2, mel_dim=80, mu_dim=80, spk_dim=80,
        out_channels=80, static_chunk_size=8, num_decoding_left_chunks=-1,
    )  # fmt: skip
    return dit.eval()


def test_dit_chunks_compute_the_time_conditioning_once_per_step(tiny_dit):
    """The AdaLN modulations depend on the flow time only: later chunks at the same step reuse them."""
    calls = []
    for block in tiny_dit.transformer_blocks:
        block.attn_norm.linear.register_forward_hook(lambda *_: calls.append(1))
    g = torch.Generator().manual_seed(1)
    frames = 24
    x, mu, cond = (torch.randn(2, 80, frames, generator=g) for _ in range(3))
    spks = torch.randn(2, 80, generator=g)
    t = torch.full((2,), 0.25)
    with torch.inference_mode():
        full = tiny_dit(x, torch.ones(2, 1, frames), mu, t, spks, cond, streaming=True)
        calls.clear()
        state = {}
        parts = [
            tiny_dit.forward_chunk(x[..., s : s + 8], mu[..., s : s + 8], t, spks, cond[..., s : s + 8], state, s)
            for s in range(0, frames, 8)
        ]
    assert len(calls) == len(tiny_dit.transformer_blocks)  # the first chunk only
    torch.testing.assert_close(torch.cat(parts, dim=2), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("left_chunks", [-1, 0, 1, 3])
def test_no_mask_exactly_when_the_new_frames_see_every_frame(left_chunks):
    chunk = 4
    for offset in range(0, 6 * chunk, chunk):
        for length in range(1, 3 * chunk):
            allowed = chunk_attention_mask(offset + length, chunk, left_chunks)[offset:]
            assert sees_every_frame(offset, length, chunk, left_chunks) == bool(allowed.all()), (offset, length)

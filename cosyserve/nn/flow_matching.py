"""Conditional flow-matching sampler shared by every flow decoder (v1 U-Net, v2 causal U-Net, v3 DiT).

The estimator predicts a velocity field; we integrate it from noise (t = 0) to mel (t = 1) with
Euler steps on a cosine time grid, applying classifier-free guidance by evaluating a conditional
and an unconditional (mu, speaker and prompt zeroed) row in one batch of two.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from cosyserve.nn.chunk_state import POOL_KEY, ChunkState, StreamCachePool, close_state, state_nbytes

# The official v2/v3 samplers draw this buffer once at construction: 15000 frames = 300 s of mel
# at 50 frames/s, from a generator seeded with 0.
FIXED_NOISE_FRAMES = 15000
FIXED_NOISE_SEED = 0
MEL_CHANNELS = 80


def fixed_noise(frames: int = FIXED_NOISE_FRAMES, channels: int = MEL_CHANNELS, seed: int = FIXED_NOISE_SEED) -> Tensor:
    """The v2/v3 fixed starting noise (1, channels, frames), from a private CPU generator.

    Equals the official ``torch.manual_seed(0); torch.randn(1, 80, 15000)`` without touching the
    global RNG.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(1, channels, frames, generator=generator)


def cosine_time_grid(n_timesteps: int, device: torch.device | str | None = None) -> Tensor:
    """t_k = 1 - cos(pi/2 * k/n), k = 0..n, computed in float32 as the reference does."""
    t = torch.linspace(0, 1, n_timesteps + 1, device=device, dtype=torch.float32)
    return 1 - torch.cos(t * 0.5 * math.pi)


class ConditionalCFM(nn.Module):
    """Euler ODE solver with classifier-free guidance around an estimator.

    v1 draws fresh noise per call (the caller passes it to :meth:`solve`); v2/v3 start from
    :meth:`fixed_noise`. The estimator is called as
    ``estimator(x, mask, mu, t, spks, cond, streaming=...)`` on batch 2 and returns a velocity
    (2, C, T). This module has no parameters of its own, so the estimator's weights keep the
    official ``decoder.estimator.*`` names when this is the flow's ``decoder``.
    """

    def __init__(self, estimator: nn.Module, inference_cfg_rate: float = 0.7, n_timesteps: int = 10) -> None:
        super().__init__()
        self.estimator = estimator
        self.inference_cfg_rate = float(inference_cfg_rate)
        self.n_timesteps = int(n_timesteps)
        self._fixed_noise: Tensor | None = None  # v2/v3 starting noise, built on first use

    def fixed_noise(self, frames: int, device: torch.device | str = "cpu") -> Tensor:
        """The first ``frames`` frames (1, 80, frames) of the v2/v3 fixed noise, on ``device``.

        Built once per module and device from the private seed-0 generator (module-level
        :func:`fixed_noise`), so no call copies it. Not a buffer: it stays out of the state dict.
        """
        device = torch.device(device)
        if self._fixed_noise is None or self._fixed_noise.device != device:
            self._fixed_noise = fixed_noise().to(device)
        available = self._fixed_noise.size(2)
        if frames > available:
            raise ValueError(
                f"{frames} mel frames exceed the {available}-frame fixed noise of the flow "
                f"({available // 50} s of audio); split the text into shorter segments"
            )
        return self._fixed_noise[:, :, :frames]

    @torch.no_grad()
    def solve(
        self,
        mu: Tensor,
        mask: Tensor,
        spks: Tensor,
        cond: Tensor,
        noise: Tensor,
        streaming: bool = False,
    ) -> Tensor:
        """Integrate from ``noise`` to a mel.

        mu (1, C, T) encoder condition, mask (1, 1, T), spks (1, C) speaker, cond (1, C, T) prompt
        mel (zeros after the prompt), noise (1, C, T) the starting point. Returns (1, C, T) float32.
        """
        mask_in = torch.cat([mask, mask]).to(self._estimator_dtype())

        def velocity(x: Tensor, mu: Tensor, t: Tensor, spks: Tensor, cond: Tensor, step: int) -> Tensor:
            return self.estimator(x, mask_in, mu, t, spks, cond, streaming=streaming)

        return self._integrate(mu, spks, cond, noise, velocity)

    @torch.no_grad()
    def solve_chunk(self, mu: Tensor, spks: Tensor, cond: Tensor, noise: Tensor, cache: EstimatorCache) -> Tensor:
        """:meth:`solve` (streaming) for the frames after ``cache.frames``, reusing the earlier frames' state.

        mu / cond / noise (1, C, T new) cover only the new frames. The estimator's per-frame state
        of the earlier frames (attention keys / values, causal convolution context) is kept per
        Euler step in ``cache``; both CFG rows are one batch, so each entry holds both halves.
        Because the estimator is chunk-causal and every frame's noise is fixed by its position,
        the result equals the new frames of a full streaming :meth:`solve`.
        """
        states = cache.steps(self.n_timesteps)

        def velocity(x: Tensor, mu: Tensor, t: Tensor, spks: Tensor, cond: Tensor, step: int) -> Tensor:
            return self.estimator.forward_chunk(x, mu, t, spks, cond, states[step], cache.frames)

        mel = self._integrate(mu, spks, cond, noise, velocity)
        cache.frames += mu.size(2)
        return mel

    def _estimator_dtype(self) -> torch.dtype:
        # The estimator may run in a lower precision (--dtype flow=bf16): its inputs are cast to it.
        return next(self.estimator.parameters()).dtype

    def _integrate(
        self,
        mu: Tensor,
        spks: Tensor,
        cond: Tensor,
        noise: Tensor,
        velocity: Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, int], Tensor],
    ) -> Tensor:
        """The guided Euler loop: ``velocity(x, mu, t, spks, cond, step)`` evaluates the estimator on
        the two CFG row blocks (already cast to its dtype) at Euler step ``step`` (0-based)."""
        if noise.shape != mu.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != mu shape {tuple(mu.shape)}")
        dtype = mu.dtype  # the ODE state stays in this precision (fp32)
        est_dtype = self._estimator_dtype()
        batch = mu.size(0)
        t_span = cosine_time_grid(self.n_timesteps, device=mu.device)
        x = noise.to(device=mu.device, dtype=dtype)

        # Row block 0 is conditional; row block 1 keeps mu / spks / cond at zero for guidance.
        mu_in = torch.cat([mu, torch.zeros_like(mu)]).to(est_dtype)
        spks_in = torch.cat([spks, torch.zeros_like(spks)]).to(est_dtype)
        cond_in = torch.cat([cond, torch.zeros_like(cond)]).to(est_dtype)
        rate = self.inference_cfg_rate

        # The step uses the running t (t + dt accumulated), not t_span[k], as the reference does.
        t, dt = t_span[0], t_span[1] - t_span[0]
        for step in range(1, len(t_span)):
            t_in = t.expand(2 * batch).to(est_dtype)
            x_in = torch.cat([x, x]).to(est_dtype)
            v = velocity(x_in, mu_in, t_in, spks_in, cond_in, step - 1).to(dtype)
            v_cond, v_uncond = v[:batch], v[batch:]
            x = x + dt * ((1.0 + rate) * v_cond - rate * v_uncond)
            t = t + dt
            if step < len(t_span) - 1:
                dt = t_span[step + 1] - t
        return x.float()


class EstimatorCache:
    """One request's streaming estimator state: per Euler step, per module, the earlier frames' tensors.

    Owned by the request (never by the shared model); :meth:`ConditionalCFM.solve_chunk` extends it.
    """

    def __init__(self, pool: StreamCachePool | None = None) -> None:
        self.frames = 0  # frames already computed
        self.pool = pool  # where the key / value buffers come from and go back to
        self._steps: list[ChunkState] = []

    def steps(self, n: int) -> list[ChunkState]:
        if not self._steps:
            self._steps = [{POOL_KEY: self.pool} if self.pool is not None else {} for _ in range(n)]
        elif len(self._steps) != n:
            raise ValueError(f"the cache holds {len(self._steps)} Euler steps, {n} asked")
        return self._steps

    def nbytes(self) -> int:
        """Bytes held by the cached tensors."""
        return sum(state_nbytes(step) for step in self._steps)

    def reset(self) -> None:
        for step in self._steps:
            close_state(step)
        self.frames = 0
        self._steps = []


class FlowStream:
    """One streamed request's incremental flow state: the estimator cache and the mel computed so far.

    Made by the flow's ``stream_state()`` and owned by the request's synthesizer.
    """

    # The cache holds keys / values per block, Euler step and CFG row: about 4.6 MB per mel frame for
    # the full-size v2 estimator, 3.6 MB for v3's DiT. A request whose cache would pass what the pool
    # grants drops it and re-runs the flow from the start for each later chunk (same result, old cost).

    def __init__(self, pool: StreamCachePool) -> None:
        self.pool = pool
        self.cache = EstimatorCache(pool)
        self.mel: Tensor | None = None  # (1, C, cache.frames), prompt frames included
        self.encoder: object | None = None  # the flow encoder's own streaming state, if it keeps one
        self.reserved = 0  # bytes of the pool's limit this request holds
        self.over_budget = False

    def reset(self) -> None:
        self.close()
        self.mel = None
        self.encoder = None

    def close(self) -> None:
        """The request's flow is done: its keys / values (the bulk of the state) go back to the pool."""
        self.cache.reset()
        self.pool.release(self.reserved)
        self.reserved = 0

    def advance(self, cfm: ConditionalCFM, mu: Tensor, spks: Tensor, cond: Tensor, noise: Tensor) -> Tensor:
        """The streaming mel (1, C, T) of all T frames of mu, computing only those not computed before.

        The frames already computed must end on an attention chunk boundary (the v2/v3 hops do);
        otherwise, or when the request shrank, everything is recomputed from the first frame.
        """
        start = self.cache.frames
        if start and not self.over_budget and not self._hold(int(self.cache.nbytes() / start * mu.size(2))):
            self.over_budget = True  # what this call would hold passes what the pool grants
        if self.over_budget:
            self.reset()
            mask = torch.ones_like(mu[:, :1])
            return cfm.solve(mu, mask, spks, cond, noise, streaming=True)
        if start % cfm.estimator.static_chunk_size or start > mu.size(2) or self.mel is None:
            self.reset()
            start = 0
        if start < mu.size(2):
            new = cfm.solve_chunk(mu[:, :, start:], spks, cond[:, :, start:], noise[:, :, start:], self.cache)
            self.mel = new if self.mel is None else torch.cat([self.mel, new], dim=2)
            if not self._hold(self.cache.nbytes()):  # the first call: its size is known only now
                self.over_budget = True
        return self.mel[:, :, : mu.size(2)]

    def _hold(self, nbytes: int) -> bool:
        """Hold ``nbytes`` of the pool's limit in all (more than held so far: reserve the rest)."""
        if nbytes <= self.reserved:
            return True
        if not self.pool.reserve(nbytes - self.reserved):
            return False
        self.reserved = nbytes
        return True

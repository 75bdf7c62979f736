"""v3 ``CausalHiFTGenerator`` (spec §13.6): the v2 layer plan with causal convolutions.

Causality makes the non-final output of a mel prefix equal to the head of the final output, so the
v3 orchestration can rerun the vocoder on the accumulated mel and emit only the new samples.

Fixed noise. The reference draws two tensors when it builds the module and keeps them for every
call: the initial-phase offset ``rand_ini`` (1, 9) and the additive-noise table ``sine_waves``
(1, 7 200 000, 9), uniform [0, 1) (about 260 MB; a third (1, 7 200 000, 1) table feeds an unused
branch and is never made here). Their values come from the global RNG state after model
construction and cannot be regenerated portably, so we make our own, reproducibly and lazily:
``rand_ini`` and the table, in blocks of :data:`NOISE_BLOCK` rows, each come from a private CPU
generator seeded by a hash of (``noise_seed``, tensor name, block index), so any block can be made
on its own. Only the blocks that the longest request so far needed are kept (a 10 s request holds
about 8.6 MB), and there is no 300 s limit. :meth:`CausalHiFTGenerator.set_fixed_noise` replaces
both tensors with given values (e.g. the reference's, or any head of its table).
"""

from __future__ import annotations

import copy
import hashlib
import math
import threading
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from cosyserve.nn.hift import (
    CausalConv1d,
    ConvRNNF0Predictor,
    SineGen2,
    SourceDraws,
    _HiFTBase,
)

NOISE_BLOCK = 48_000  # rows per generated block of the noise table (2 s at 24 kHz)


def _keyed_generator(seed: int, key: str) -> torch.Generator:
    """A CPU generator for (seed, key); hashed because torch's CPU generator keeps only 32 seed bits."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=4).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))


class CausalConv1dUpsample(nn.Conv1d):
    """Nearest upsampling x rate, then a causal Conv1d (weights (out, in, k), unlike v2's transposed conv)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, rate: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size)
        self.rate = rate

    def forward(self, x: Tensor) -> Tensor:
        x = torch.repeat_interleave(x, self.rate, dim=-1)
        return super().forward(F.pad(x, (self.kernel_size[0] - 1, 0)))


class CausalConv1dDownSample(nn.Conv1d):
    """Conv1d(kernel 2 * rate, stride rate) after rate - 1 zeros on the left."""

    def __init__(self, in_channels: int, out_channels: int, rate: int) -> None:
        super().__init__(in_channels, out_channels, 2 * rate, rate)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(F.pad(x, (self.stride[0] - 1, 0)))


class CausalConvRNNF0Predictor(ConvRNNF0Predictor):
    """As ConvRNNF0Predictor, but condnet[0] looks 3 frames ahead and the rest are causal.

    Not final: the last ``look_ahead`` mel frames only serve as look-ahead, so T - 3 frames come out.
    """

    @staticmethod
    def _conv(in_channels: int, out_channels: int, first: bool) -> nn.Module:
        if first:
            return CausalConv1d(in_channels, out_channels, 4, causal_type="right")
        return CausalConv1d(in_channels, out_channels, 3, causal_type="left")

    @property
    def look_ahead(self) -> int:
        return self.condnet[0].causal_padding

    def forward(self, mel: Tensor, finalize: bool = True) -> Tensor:
        if finalize:
            x = self.condnet[0](mel)
        else:
            x = self.condnet[0](mel[:, :, : -self.look_ahead], mel[:, :, -self.look_ahead :])
        return self._head(self.condnet[1:](x))


class UniformTable:
    """Head of a (1, N, channels) uniform [0, 1) table, either given or generated block by block."""

    def __init__(self, channels: int, seed: int = 0, values: Tensor | None = None) -> None:
        self.channels = channels
        self.seed = seed
        self.fixed = values is not None
        self._rows = values.float() if values is not None else torch.empty(1, 0, channels)
        self._lock = threading.Lock()

    def _block(self, index: int) -> Tensor:
        g = _keyed_generator(self.seed, f"sine_waves:{index}")
        return torch.rand(1, NOISE_BLOCK, self.channels, generator=g)

    def head(self, length: int, device: torch.device | str = "cpu") -> Tensor:
        """Rows [0, length) as (1, length, channels) on ``device``."""
        with self._lock:
            have = self._rows.shape[1]
            if length > have:
                if self.fixed:
                    raise ValueError(f"the given noise table covers {have} samples, {length} are needed")
                blocks = [self._block(b) for b in range(have // NOISE_BLOCK, -(-length // NOISE_BLOCK))]
                self._rows = torch.cat([self._rows, *(b.to(self._rows.device) for b in blocks)], dim=1)
            if self._rows.device != torch.device(device):
                self._rows = self._rows.to(device)  # keep the cache where it is used
            return self._rows[:, :length]


class CausalHiFTGenerator(_HiFTBase):
    """v3 vocoder: ``mel_to_wave(mel, finalize)``; no random draw at call time."""

    causal = True
    f0_predictor_cls = CausalConvRNNF0Predictor

    def __init__(
        self,
        in_channels: int = 80,
        base_channels: int = 512,
        nb_harmonics: int = 8,
        sampling_rate: int = 24000,
        nsf_alpha: float = 0.1,
        nsf_sigma: float = 0.003,
        nsf_voiced_threshold: float = 10,
        upsample_rates: Sequence[int] = (8, 5, 3),
        upsample_kernel_sizes: Sequence[int] = (16, 11, 7),
        istft_params: dict[str, int] | None = None,
        resblock_kernel_sizes: Sequence[int] = (3, 7, 11),
        resblock_dilation_sizes: Sequence[Sequence[int]] = ((1, 3, 5),) * 3,
        source_resblock_kernel_sizes: Sequence[int] = (7, 7, 11),
        source_resblock_dilation_sizes: Sequence[Sequence[int]] = ((1, 3, 5),) * 3,
        lrelu_slope: float = 0.1,
        audio_limit: float = 0.99,
        conv_pre_look_right: int = 4,
        f0_predictor: CausalConvRNNF0Predictor | None = None,
    ) -> None:
        self.conv_pre_look_right = conv_pre_look_right
        super().__init__(
            in_channels, base_channels, nb_harmonics, sampling_rate, nsf_alpha, nsf_sigma, nsf_voiced_threshold,
            upsample_rates, upsample_kernel_sizes, istft_params or {"n_fft": 16, "hop_len": 4},
            resblock_kernel_sizes, resblock_dilation_sizes, source_resblock_kernel_sizes,
            source_resblock_dilation_sizes, lrelu_slope, audio_limit, f0_predictor,
        )  # fmt: skip
        self.set_fixed_noise()
        # A float64 twin of the f0 predictor, built on first use and dropped when weights load; a
        # plain dict so it is neither a submodule nor in the state dict. Swapping the shared
        # module's parameters per call instead would race between concurrent requests.
        self._f0_float64: dict[str, nn.Module] = {}
        self._f0_lock = threading.Lock()
        self.register_load_state_dict_post_hook(lambda module, _keys: module._f0_float64.clear())

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> CausalHiFTGenerator:
        # .to() / .cuda() / .half() rebuild the twin from the moved predictor on next use.
        self._f0_float64.clear()
        return super()._apply(fn, recurse)

    def _sine_gen(self, sampling_rate: int, *args: object) -> SineGen2:
        return SineGen2(sampling_rate, *args, causal=True)

    def _conv_pre(self, in_channels: int, out_channels: int) -> nn.Module:
        return CausalConv1d(in_channels, out_channels, self.conv_pre_look_right + 1, causal_type="right")

    def _up(self, in_channels: int, out_channels: int, kernel_size: int, rate: int) -> nn.Module:
        return CausalConv1dUpsample(in_channels, out_channels, kernel_size, rate)

    def _down(self, in_channels: int, out_channels: int, rate: int) -> nn.Module:
        if rate == 1:
            return CausalConv1d(in_channels, out_channels, 1)
        return CausalConv1dDownSample(in_channels, out_channels, rate)

    def _conv_post(self, in_channels: int, out_channels: int) -> nn.Module:
        return CausalConv1d(in_channels, out_channels, 7)

    def set_fixed_noise(
        self, rand_ini: Tensor | None = None, sine_waves: Tensor | None = None, noise_seed: int = 0
    ) -> None:
        """Set the source's fixed tensors: ``rand_ini`` (1, 9) and a head (1, S, 9) of ``sine_waves``.

        Each one left out is generated from ``noise_seed`` (see the module docstring); a given
        table serves requests up to S samples.
        """
        dim = self.m_source.l_sin_gen.dim
        if rand_ini is None:
            rand_ini = torch.rand(1, dim, generator=_keyed_generator(noise_seed, "rand_ini"))
            rand_ini[:, 0] = 0
        if tuple(rand_ini.shape) != (1, dim):
            raise ValueError(f"rand_ini must have shape (1, {dim}), got {tuple(rand_ini.shape)}")
        if sine_waves is not None and (sine_waves.dim() != 3 or sine_waves.shape[::2] != (1, dim)):
            raise ValueError(f"sine_waves must have shape (1, S, {dim}), got {tuple(sine_waves.shape)}")
        device = self.stft_window.device
        self.register_buffer("rand_ini", rand_ini.float().to(device), persistent=False)
        self.sine_waves = UniformTable(dim, noise_seed, sine_waves)

    @property
    def f0_look_ahead(self) -> int:
        """Mel frames the f0 predictor consumes only as look-ahead in a non-final call."""
        return self.f0_predictor.look_ahead

    @torch.inference_mode()
    def predict_f0(self, mel: Tensor, finalize: bool = True) -> Tensor:
        """f0 (B, T or T - 3) in Hz, computed in float64 as the reference does, returned in mel's dtype."""
        with self._f0_lock:
            predictor = self._f0_float64.get("module")
            if predictor is None:
                predictor = self._f0_float64["module"] = copy.deepcopy(self.f0_predictor).double()
        return predictor(mel.double(), finalize).to(mel.dtype)

    @torch.inference_mode()
    def make_source(self, f0: Tensor) -> Tensor:
        """Excitation (B, 1, T * samples_per_frame) from f0 (B, T) in Hz, with the fixed noise."""
        f0_up = self._upsample_f0(f0)
        noise = self.sine_waves.head(f0_up.shape[1], f0_up.device)
        return self.m_source(f0_up, SourceDraws(self.rand_ini, noise))

    @torch.inference_mode()
    def decode(self, mel: Tensor, source: Tensor, finalize: bool = True) -> Tensor:
        """Waveform from mel (B, 80, T) and source (B, 1, T * samples_per_frame).

        Not final: the last ``conv_pre_look_right`` frames are look-ahead only and the last frame
        of the result (not yet stable) is dropped: (T - look_right - 1) * samples_per_frame samples.
        """
        s_stft = self._stft(source)
        if finalize:
            x = self.conv_pre(mel)
        else:
            look = self.conv_pre_look_right
            x = self.conv_pre(mel[:, :, :-look], mel[:, :, -look:])
            s_stft = s_stft[:, :, : -self.stft_frames_per_frame * look]
        speech = self._stages(x, s_stft)
        return speech if finalize else speech[:, : -self.samples_per_frame]

    @torch.inference_mode()
    def mel_to_wave(self, mel: Tensor, finalize: bool = True, source: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(speech, source): all T frames when final, else (T - 8) frames of speech and T - 3 of source.

        ``source`` replaces the excitation computed from the predicted f0 (tests inject the reference's).
        """
        if source is None:
            source = self.make_source(self.predict_f0(mel, finalize))
        if not finalize:
            mel = mel[:, :, : -self.f0_look_ahead]
        return self.decode(mel, source, finalize), source

    def stream_state(self) -> HiFTStream:
        """A fresh per-request state for :meth:`mel_to_wave_stream`."""
        return HiFTStream()

    def decode_left_reach(self) -> int:
        """Mel frames before an output frame that can change it: a bound on the decoder's left context.

        Summed over the upsampling stages (upsampling conv, reflect pad, the widest resblock, the
        source branch: STFT edge frames and downsampling conv), then conv_post and the iSTFT.
        """
        stft_rate = self.stft_frames_per_frame  # stft frames per mel frame
        reach, rate = 0.0, 1
        for i, up in enumerate(self.ups):
            rate *= up.rate
            blocks = [*self.resblocks[i * self.num_kernels : (i + 1) * self.num_kernels], self.source_resblocks[i]]
            widest = max(sum(c.causal_padding for c in (*b.convs1, *b.convs2)) for b in blocks)
            reach += (up.kernel_size[0] + 1 + widest) / rate
            down = self.source_downs[i]
            reach += (self.n_fft // self.hop_len + down.kernel_size[0] + down.stride[0]) / stft_rate
        reach += (self.conv_post.causal_padding + self.n_fft // self.hop_len) / stft_rate
        # The sum above measured 2-6 frames short on v3-tiny (24 vs ~28): keep a margin of 8.
        return math.ceil(reach) + 8

    @torch.inference_mode()
    def mel_to_wave_stream(
        self, state: HiFTStream, mel: Tensor, finalize: bool = True, source: Tensor | None = None
    ) -> Tensor:
        """The samples :meth:`mel_to_wave` (``mel``, ``finalize``) adds after those emitted from ``state``.

        ``mel`` (1, 80, T) is the request's whole mel so far (each call extends the previous one).
        Only the new frames are computed: the f0 of the frames whose look-ahead is complete is kept
        in ``state`` and the predictor runs on the new frames plus its left context; the excitation
        is rebuilt from the kept f0 (cheap; its phase accumulates from the first sample); the decoder
        runs on the mel from :meth:`decode_left_reach` frames before the first new sample, every
        layer being causal (look-right only at the end, which the window shares with the full run).
        ``source`` (the complete excitation of :meth:`mel_to_wave`) replaces the computed one.
        """
        total = mel.size(2)
        f0_frames = total if finalize else total - self.f0_look_ahead
        spf = self.samples_per_frame
        if source is None:
            have = state.f0.size(1)
            start = max(0, have - self.f0_left_reach())
            f0 = self.predict_f0(mel[:, :, start:], finalize)[:, have - start :]
            state.f0 = torch.cat([state.f0.to(f0), f0], dim=1)
            # A non-final call's f0 frames all had their real look-ahead: they are final.
            source = self.make_source(state.f0)
        window = max(0, state.samples_out // spf - self.decode_left_reach())
        speech = self.decode(mel[:, :, window:f0_frames], source[:, :, window * spf :], finalize)
        speech = speech[:, state.samples_out - window * spf :]
        state.samples_out += speech.size(1)
        return speech

    def f0_left_reach(self) -> int:
        """Mel frames before an f0 frame that can change it (the causal convs after the first)."""
        return sum(conv.causal_padding for conv in self.f0_predictor.condnet[2::2])


class HiFTStream:
    """One streamed request's vocoder state: the final f0 frames and the samples emitted so far."""

    def __init__(self) -> None:
        self.f0 = torch.zeros(1, 0)
        self.samples_out = 0

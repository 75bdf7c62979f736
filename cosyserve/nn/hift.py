"""HiFT vocoder for v1/v2 (spec §13.1-13.5): NSF harmonic source + iSTFTNet generator.

The checkpoints weight-normalise most convolutions; the loader folds them
(:func:`cosyserve.models.checkpoint.read_vocoder_state`), so every
module here holds a plain ``.weight`` under the official name. The causal v3 variant lives in
:mod:`cosyserve.nn.hift_causal` and reuses the blocks defined here.

Random draws of the sine source are injectable (:class:`SourceDraws`); when they are not given they
come from a caller-supplied ``torch.Generator``, never from torch's global RNG.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cosyserve.work_units import unit_boundary


class CausalConv1d(nn.Conv1d):
    """Conv1d whose padding is all on one side: 'left' (causal) or 'right' (look-ahead).

    The pad is zeros, or the frames passed as ``context`` (the previous frames for 'left', the
    look-ahead frames for 'right'); the output has the input's length.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1, causal_type: str = "left"
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, dilation=dilation)
        if causal_type not in ("left", "right"):
            raise ValueError(f"unsupported causal_type '{causal_type}'")
        self.causal_type = causal_type
        # The reference's padding rule; it equals dilation * (kernel_size - 1) for every kernel in use.
        self.causal_padding = 2 * ((kernel_size * dilation - dilation) // 2) + (kernel_size + 1) % 2

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if context is None:
            pad = (self.causal_padding, 0) if self.causal_type == "left" else (0, self.causal_padding)
            x = F.pad(x, pad)
        else:
            if context.shape[-1] != self.causal_padding:
                raise ValueError(f"context has {context.shape[-1]} frames, the conv needs {self.causal_padding}")
            x = torch.cat((context, x) if self.causal_type == "left" else (x, context), dim=-1)
        return super().forward(x)


class Snake(nn.Module):
    """x + sin²(αx)/α with a per-channel α (linear scale)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:  # (B, C, T)
        alpha = self.alpha[None, :, None]
        return x + (1.0 / (alpha + 1e-9)) * torch.sin(x * alpha).pow(2)


class ResBlock(nn.Module):
    """Per dilation d: x += conv2(snake2(conv1_d(snake1(x)))); convs are 'same' or causal-left."""

    def __init__(self, channels: int, kernel_size: int, dilations: list[int], causal: bool = False) -> None:
        super().__init__()

        def conv(dilation: int) -> nn.Conv1d:
            if causal:
                return CausalConv1d(channels, channels, kernel_size, dilation=dilation)
            padding = (kernel_size * dilation - dilation) // 2
            return nn.Conv1d(channels, channels, kernel_size, dilation=dilation, padding=padding)

        self.convs1 = nn.ModuleList(conv(d) for d in dilations)
        self.convs2 = nn.ModuleList(conv(1) for _ in dilations)
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: Tensor) -> Tensor:
        for conv1, conv2, act1, act2 in zip(
            self.convs1, self.convs2, self.activations1, self.activations2, strict=True
        ):
            x = conv2(act2(conv1(act1(x)))) + x
        return x


class ConvRNNF0Predictor(nn.Module):
    """mel (B, 80, T) -> f0 in Hz (B, T): 5 x [Conv1d(k3) -> ELU], Linear, |.|."""

    def __init__(self, num_class: int = 1, in_channels: int = 80, cond_channels: int = 512) -> None:
        super().__init__()
        if num_class != 1:
            raise ValueError(f"{type(self).__name__}: unsupported num_class {num_class} (only 1)")
        layers: list[nn.Module] = []
        for i in range(5):
            layers += [self._conv(in_channels if i == 0 else cond_channels, cond_channels, first=i == 0), nn.ELU()]
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(cond_channels, num_class)

    @staticmethod
    def _conv(in_channels: int, out_channels: int, first: bool) -> nn.Module:
        return nn.Conv1d(in_channels, out_channels, 3, padding=1)

    def _head(self, x: Tensor) -> Tensor:  # (B, C, T) -> (B, T)
        return torch.abs(self.classifier(x.transpose(1, 2)).squeeze(-1))

    def forward(self, mel: Tensor) -> Tensor:
        return self._head(self.condnet(mel))


@dataclass(frozen=True)
class SourceDraws:
    """The sine source's random tensors, in the reference's draw order and layouts.

    ``phase``: uniform [0, 1) initial phases, v1 (B, 9, 1), v2 (B, 9) (harmonic 0 is ignored).
    ``noise``: standard-normal additive noise, v1 (B, 9, L), v2 (B, L, 9).
    ``branch``: the reference's third draw (B, L, 1) for its noise branch, which never reaches the
    output; it may be carried along but is not read.
    """

    phase: Tensor
    noise: Tensor
    branch: Tensor | None = None


def _private_generator(generator: torch.Generator | None) -> torch.Generator:
    if generator is not None:
        return generator
    fresh = torch.Generator()
    fresh.seed()  # a non-deterministic seed without touching the global RNG
    return fresh


class _SineGenBase(nn.Module):
    """Shared parameters of the harmonic sine sources: 9 harmonics, amplitude 0.1, noise std 0.003."""

    def __init__(
        self, sampling_rate: int, upsample_scale: int, harmonic_num: int, sine_amp: float, noise_std: float,
        voiced_threshold: float,
    ) -> None:  # fmt: skip
        super().__init__()
        self.sampling_rate = sampling_rate
        self.upsample_scale = upsample_scale
        self.dim = harmonic_num + 1
        self.sine_amp = sine_amp
        self.noise_std = noise_std
        self.voiced_threshold = voiced_threshold

    def _harmonics(self, like: Tensor) -> Tensor:
        return torch.arange(1, self.dim + 1, dtype=like.dtype, device=like.device)

    def _add_noise(self, sines: Tensor, f0: Tensor, noise: Tensor) -> Tensor:
        # Voiced samples keep the sines plus faint noise; unvoiced ones are noise only.
        uv = (f0 > self.voiced_threshold).to(sines.dtype)
        noise_amp = uv * self.noise_std + (1 - uv) * self.sine_amp / 3
        return sines * uv + noise_amp * noise

    @staticmethod
    def _check(draws: SourceDraws, phase_shape: tuple[int, ...], noise_shape: tuple[int, ...]) -> None:
        for name, shape in (("phase", phase_shape), ("noise", noise_shape)):
            got = tuple(getattr(draws, name).shape)
            if got != shape:
                raise ValueError(f"SourceDraws.{name} has shape {got}, the source needs {shape}")


class SineGen(_SineGenBase):
    """v1 (22050 Hz) source: per-sample phase accumulation, random initial phase per harmonic."""

    def draw(self, batch: int, length: int, generator: torch.Generator | None) -> SourceDraws:
        g = _private_generator(generator)
        phase = torch.rand(batch, self.dim, 1, generator=g, device=g.device)
        noise = torch.randn(batch, self.dim, length, generator=g, device=g.device)
        return SourceDraws(phase, noise)

    def forward(self, f0: Tensor, draws: SourceDraws) -> Tensor:  # f0 (B, L, 1) Hz -> (B, L, 9)
        f0 = f0.transpose(1, 2)  # (B, 1, L)
        batch, _, length = f0.shape
        self._check(draws, (batch, self.dim, 1), (batch, self.dim, length))
        freq = f0 * self._harmonics(f0)[:, None] / self.sampling_rate  # (B, 9, L) cycles per sample
        theta = 2 * math.pi * (torch.cumsum(freq, dim=-1) % 1)
        phase = draws.phase.to(f0) * (2 * math.pi) - math.pi  # U(-pi, pi)
        phase[:, 0] = 0
        sines = self.sine_amp * torch.sin(theta + phase)
        return self._add_noise(sines, f0, draws.noise.to(f0)).transpose(1, 2)


class SineGen2(_SineGenBase):
    """v2 (24 kHz) and v3 source: the phase is accumulated per mel frame and interpolated back.

    Per-sample phase increments are linearly resampled to frame rate (output frame k reads input
    position (k + 0.5) * scale - 0.5), accumulated, scaled by the frame length and brought back to
    sample rate: linearly (v2) or by repetition (``causal``, v3). The initial-phase offset is added
    at n = 0, which no frame reads, so it does not change the output (kept to follow the reference).
    """

    def __init__(self, *args: Any, causal: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.upsample_mode = "nearest" if causal else "linear"

    def draw(self, batch: int, length: int, generator: torch.Generator | None) -> SourceDraws:
        g = _private_generator(generator)
        phase = torch.rand(batch, self.dim, generator=g, device=g.device)
        noise = torch.randn(batch, length, self.dim, generator=g, device=g.device)
        return SourceDraws(phase, noise)

    def forward(self, f0: Tensor, draws: SourceDraws) -> Tensor:  # f0 (B, L, 1) Hz -> (B, L, 9)
        length = f0.shape[1]
        self._check(draws, (draws.phase.shape[0], self.dim), (draws.noise.shape[0], length, self.dim))
        rad = (f0 * self._harmonics(f0) / self.sampling_rate) % 1  # (B, L, 9)
        rad[:, 0] = rad[:, 0] + draws.phase.to(f0)  # initial phase offset at n = 0 only
        down = F.interpolate(rad.transpose(1, 2), scale_factor=1 / self.upsample_scale, mode="linear")
        phase = torch.cumsum(down, dim=-1) * 2 * math.pi  # (B, 9, T)
        kwargs = {"align_corners": False} if self.upsample_mode == "linear" else {}
        phase = F.interpolate(
            phase * self.upsample_scale, scale_factor=self.upsample_scale, mode=self.upsample_mode, **kwargs
        )
        sines = torch.sin(phase).transpose(1, 2) * self.sine_amp  # (B, L, 9)
        return self._add_noise(sines, f0, draws.noise.to(f0))


class SourceModuleHnNSF(nn.Module):
    """Harmonic sines merged by Linear(9 -> 1) + tanh: the excitation (B, 1, L)."""

    def __init__(self, sine_gen: SineGen | SineGen2) -> None:
        super().__init__()
        self.l_sin_gen = sine_gen
        self.l_linear = nn.Linear(sine_gen.dim, 1)

    def forward(self, f0: Tensor, draws: SourceDraws) -> Tensor:  # f0 (B, L, 1)
        return torch.tanh(self.l_linear(self.l_sin_gen(f0, draws))).transpose(1, 2)


class _HiFTBase(nn.Module):
    """Layer plan and decode stages shared by HiFTGenerator and CausalHiFTGenerator (§13.2, §13.4)."""

    causal = False
    f0_predictor_cls: type = ConvRNNF0Predictor

    def __init__(
        self,
        in_channels: int,
        base_channels: int,
        nb_harmonics: int,
        sampling_rate: int,
        nsf_alpha: float,
        nsf_sigma: float,
        nsf_voiced_threshold: float,
        upsample_rates: Sequence[int],
        upsample_kernel_sizes: Sequence[int],
        istft_params: dict[str, int],
        resblock_kernel_sizes: Sequence[int],
        resblock_dilation_sizes: Sequence[Sequence[int]],
        source_resblock_kernel_sizes: Sequence[int],
        source_resblock_dilation_sizes: Sequence[Sequence[int]],
        lrelu_slope: float,
        audio_limit: float,
        f0_predictor: nn.Module | None,
    ) -> None:
        super().__init__()
        self.sampling_rate = sampling_rate
        self.n_fft = istft_params["n_fft"]
        self.hop_len = istft_params["hop_len"]
        self.upsample_rates = list(upsample_rates)
        self.num_kernels = len(resblock_kernel_sizes)
        self.lrelu_slope = lrelu_slope
        self.audio_limit = audio_limit
        # STFT frames per mel frame, and waveform samples per mel frame.
        self.stft_frames_per_frame = math.prod(upsample_rates)
        self.samples_per_frame = self.stft_frames_per_frame * self.hop_len
        stft_channels = self.n_fft + 2

        self.f0_predictor = self.f0_predictor_cls() if f0_predictor is None else f0_predictor
        self.m_source = SourceModuleHnNSF(
            self._sine_gen(
                sampling_rate, self.samples_per_frame, nb_harmonics, nsf_alpha, nsf_sigma, nsf_voiced_threshold
            )
        )
        self.conv_pre = self._conv_pre(in_channels, base_channels)
        channels = [base_channels // 2 ** (i + 1) for i in range(len(upsample_rates))]
        self.ups = nn.ModuleList(
            self._up(ch * 2, ch, k, u) for ch, k, u in zip(channels, upsample_kernel_sizes, upsample_rates, strict=True)
        )
        # Source branch i is downsampled by the product of the upsample rates after stage i.
        down_rates = [math.prod(upsample_rates[i + 1 :]) for i in range(len(upsample_rates))]
        self.source_downs = nn.ModuleList(
            self._down(stft_channels, ch, u) for ch, u in zip(channels, down_rates, strict=True)
        )
        self.source_resblocks = nn.ModuleList(
            ResBlock(ch, k, d, self.causal)
            for ch, k, d in zip(channels, source_resblock_kernel_sizes, source_resblock_dilation_sizes, strict=True)
        )
        self.resblocks = nn.ModuleList(
            ResBlock(ch, k, d, self.causal)
            for ch in channels
            for k, d in zip(resblock_kernel_sizes, resblock_dilation_sizes, strict=True)
        )
        self.conv_post = self._conv_post(channels[-1], stft_channels)
        # scipy's periodic Hann rounded to float32, as the reference builds it; not in the checkpoint.
        window = torch.hann_window(self.n_fft, periodic=True, dtype=torch.float64).float()
        self.register_buffer("stft_window", window, persistent=False)

    # Layer factories (v1/v2: 'same' convs and transposed-conv upsampling).
    def _sine_gen(self, sampling_rate: int, *args: Any) -> SineGen | SineGen2:
        return SineGen(sampling_rate, *args) if sampling_rate == 22050 else SineGen2(sampling_rate, *args)

    def _conv_pre(self, in_channels: int, out_channels: int) -> nn.Module:
        return nn.Conv1d(in_channels, out_channels, 7, padding=3)

    def _up(self, in_channels: int, out_channels: int, kernel_size: int, rate: int) -> nn.Module:
        return nn.ConvTranspose1d(in_channels, out_channels, kernel_size, rate, padding=(kernel_size - rate) // 2)

    def _down(self, in_channels: int, out_channels: int, rate: int) -> nn.Module:
        if rate == 1:
            return nn.Conv1d(in_channels, out_channels, 1)
        return nn.Conv1d(in_channels, out_channels, rate * 2, rate, padding=rate // 2)

    def _conv_post(self, in_channels: int, out_channels: int) -> nn.Module:
        return nn.Conv1d(in_channels, out_channels, 7, padding=3)

    def _upsample_f0(self, f0: Tensor) -> Tensor:  # (B, T) -> (B, T * samples_per_frame, 1)
        return torch.repeat_interleave(f0, self.samples_per_frame, dim=1)[..., None]

    def _stft(self, source: Tensor) -> Tensor:  # (B, 1, L) -> (B, n_fft + 2, L / hop + 1)
        spec = torch.stft(
            source.squeeze(1), self.n_fft, self.hop_len, self.n_fft, window=self.stft_window, return_complex=True
        )
        spec = torch.view_as_real(spec)
        return torch.cat([spec[..., 0], spec[..., 1]], dim=1)

    def _stages(self, x: Tensor, s_stft: Tensor) -> Tensor:
        """Upsampling stages with source fusion, conv_post and the iSTFT head -> (B, samples)."""
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, self.lrelu_slope))
            if i == len(self.ups) - 1:
                x = F.pad(x, (1, 0), mode="reflect")
            x = x + self.source_resblocks[i](self.source_downs[i](s_stft))
            blocks = self.resblocks[i * self.num_kernels : (i + 1) * self.num_kernels]
            xs = blocks[0](x)
            for block in blocks[1:]:
                xs = xs + block(x)
            x = xs / self.num_kernels
            unit_boundary()  # a long vocoder call may pause between stages (cosyserve.work_units)
        x = self.conv_post(F.leaky_relu(x))  # default slope 0.01, as the reference
        bins = self.n_fft // 2 + 1
        magnitude = torch.clip(torch.exp(x[:, :bins]), max=1e2)
        phase = torch.sin(x[:, bins:])
        spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        speech = torch.istft(spec, self.n_fft, self.hop_len, self.n_fft, window=self.stft_window)
        return torch.clamp(speech, -self.audio_limit, self.audio_limit)


class HiFTGenerator(_HiFTBase):
    """v1/v2 vocoder: mel (1, 80, T) -> waveform (1, T * samples_per_frame)."""

    def __init__(
        self,
        in_channels: int = 80,
        base_channels: int = 512,
        nb_harmonics: int = 8,
        sampling_rate: int = 22050,
        nsf_alpha: float = 0.1,
        nsf_sigma: float = 0.003,
        nsf_voiced_threshold: float = 10,
        upsample_rates: Sequence[int] = (8, 8),
        upsample_kernel_sizes: Sequence[int] = (16, 16),
        istft_params: dict[str, int] | None = None,
        resblock_kernel_sizes: Sequence[int] = (3, 7, 11),
        resblock_dilation_sizes: Sequence[Sequence[int]] = ((1, 3, 5),) * 3,
        source_resblock_kernel_sizes: Sequence[int] = (7, 11),
        source_resblock_dilation_sizes: Sequence[Sequence[int]] = ((1, 3, 5),) * 2,
        lrelu_slope: float = 0.1,
        audio_limit: float = 0.99,
        f0_predictor: ConvRNNF0Predictor | None = None,
    ) -> None:
        super().__init__(
            in_channels, base_channels, nb_harmonics, sampling_rate, nsf_alpha, nsf_sigma, nsf_voiced_threshold,
            upsample_rates, upsample_kernel_sizes, istft_params or {"n_fft": 16, "hop_len": 4},
            resblock_kernel_sizes, resblock_dilation_sizes, source_resblock_kernel_sizes,
            source_resblock_dilation_sizes, lrelu_slope, audio_limit, f0_predictor,
        )  # fmt: skip

    @torch.inference_mode()
    def make_source(
        self, f0: Tensor, draws: SourceDraws | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """Excitation (B, 1, T * samples_per_frame) from f0 (B, T) in Hz."""
        f0_up = self._upsample_f0(f0)
        if draws is None:
            draws = self.m_source.l_sin_gen.draw(f0_up.shape[0], f0_up.shape[1], generator)
        return self.m_source(f0_up, draws)

    @torch.inference_mode()
    def decode(self, mel: Tensor, source: Tensor) -> Tensor:
        """Waveform (B, T * samples_per_frame) from mel (B, 80, T) and the excitation (B, 1, L)."""
        return self._stages(self.conv_pre(mel), self._stft(source))

    @torch.inference_mode()
    def mel_to_wave(
        self,
        mel: Tensor,
        cache_source: Tensor | None = None,
        draws: SourceDraws | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(speech (B, N), source (B, 1, N)); ``cache_source`` overwrites the first source samples."""
        source = self.make_source(self.f0_predictor(mel), draws, generator)
        if cache_source is not None and cache_source.shape[-1]:
            # Streaming continuity: the previous chunk's excitation tail replaces the new head.
            source = torch.cat([cache_source.to(source), source[:, :, cache_source.shape[-1] :]], dim=-1)
        return self.decode(mel, source), source

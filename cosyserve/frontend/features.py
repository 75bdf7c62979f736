"""Acoustic features of the prompt audio (spec §4): Whisper log-mel, Kaldi fbank, Matcha mel.

Each function reproduces the float32 arithmetic of the library the reference calls (whisper,
``torchaudio.compliance.kaldi``, Matcha-TTS + librosa filters), because the speech tokenizer turns
these features into exact integer ids.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

# --- Slaney mel filterbank (librosa.filters.mel with htk=False, norm="slaney") -------------------

_F_SP = 200.0 / 3  # Hz per mel below 1 kHz
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOGSTEP = math.log(6.4) / 27.0


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    hz = np.asanyarray(hz, dtype=np.float64)
    mel = hz / _F_SP
    log_region = hz >= _MIN_LOG_HZ
    mel = np.where(log_region, _MIN_LOG_MEL + np.log(np.maximum(hz, 1e-300) / _MIN_LOG_HZ) / _LOGSTEP, mel)
    return mel


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asanyarray(mel, dtype=np.float64)
    hz = _F_SP * mel
    return np.where(mel >= _MIN_LOG_MEL, _MIN_LOG_HZ * np.exp(_LOGSTEP * (mel - _MIN_LOG_MEL)), hz)


@lru_cache(maxsize=16)
def _slaney_mel_cached(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    fft_freqs = np.fft.rfftfreq(n=n_fft, d=1.0 / sr)
    mel_f = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fft_freqs)
    # librosa fills a float32 matrix and normalises it in place: keep both roundings.
    weights = np.zeros((n_mels, len(fft_freqs)), dtype=np.float32)
    for i in range(n_mels):
        lower = -ramps[i] / fdiff[i]
        upper = ramps[i + 2] / fdiff[i + 1]
        weights[i] = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2 : n_mels + 2] - mel_f[:n_mels]))[:, None]
    weights.flags.writeable = False
    return weights


def slaney_mel_filters(sr: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None) -> np.ndarray:
    """Slaney-scale, area-normalised triangular filters (n_mels, n_fft // 2 + 1) float32 (read-only)."""
    fmax = sr / 2.0 if fmax is None else float(fmax)
    return _slaney_mel_cached(int(sr), int(n_fft), int(n_mels), float(fmin), fmax)


# --- Whisper log-mel (speech-tokenizer input) ---------------------------------------------------

WHISPER_SR = 16000
WHISPER_N_FFT = 400
WHISPER_HOP = 160


@lru_cache(maxsize=4)
def _whisper_filters(n_mels: int) -> torch.Tensor:
    return torch.from_numpy(slaney_mel_filters(WHISPER_SR, WHISPER_N_FFT, n_mels).copy())


def whisper_log_mel(wave16k: torch.Tensor, n_mels: int = 128) -> torch.Tensor:
    """Whisper's ``log_mel_spectrogram`` without 30 s padding: (1, N) -> (1, n_mels, N // 160)."""
    wave16k = wave16k.to(torch.float32)
    window = torch.hann_window(WHISPER_N_FFT, device=wave16k.device)
    stft = torch.stft(wave16k, WHISPER_N_FFT, WHISPER_HOP, window=window, return_complex=True)
    power = stft[..., :-1].abs() ** 2  # (1, 201, N // 160): the last centred frame is dropped
    filters = _whisper_filters(n_mels).to(wave16k.device)
    log_spec = torch.clamp(filters @ power, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


# --- Kaldi fbank (CAM++ speaker-encoder input) ----------------------------------------------------

_KALDI_FRAME_LENGTH = 400  # 25 ms at 16 kHz
_KALDI_FRAME_SHIFT = 160  # 10 ms
_KALDI_PADDED = 512  # next power of two of the frame length
_KALDI_PREEMPH = 0.97
_KALDI_LOW_FREQ = 20.0


def _kaldi_mel(freq: torch.Tensor | float) -> torch.Tensor | float:
    if isinstance(freq, torch.Tensor):
        return 1127.0 * (1.0 + freq / 700.0).log()
    return 1127.0 * math.log(1.0 + freq / 700.0)


@lru_cache(maxsize=4)
def _kaldi_mel_banks(num_bins: int, sample_rate: float) -> torch.Tensor:
    """Kaldi's triangular mel banks (num_bins, padded / 2 + 1), built in float32 like torchaudio."""
    nyquist = 0.5 * sample_rate
    fft_bin_width = sample_rate / _KALDI_PADDED
    mel_low = _kaldi_mel(_KALDI_LOW_FREQ)
    mel_high = _kaldi_mel(nyquist)
    delta = (mel_high - mel_low) / (num_bins + 1)
    b = torch.arange(num_bins, dtype=torch.float32).unsqueeze(1)
    left = mel_low + b * delta
    center = mel_low + (b + 1.0) * delta
    right = mel_low + (b + 2.0) * delta
    mel = _kaldi_mel(fft_bin_width * torch.arange(_KALDI_PADDED // 2, dtype=torch.float32)).unsqueeze(0)
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    banks = torch.clamp(torch.minimum(up, down), min=0.0)
    return F.pad(banks, (0, 1))  # the Nyquist bin gets no weight


def kaldi_fbank(wave16k: torch.Tensor, num_mel_bins: int = 80, sample_rate: int = 16000) -> torch.Tensor:
    """Kaldi-compatible log mel filterbank with the reference's settings (spec §4.3): (1, N) -> (T, bins).

    Povey window, pre-emphasis 0.97, DC removal, power spectrum, no dither, snip_edges
    (T = 1 + (N - 400) // 160; 0 frames for shorter input). Only the first channel is used.
    """
    wave = wave16k.to(torch.float32)
    wave = wave[0] if wave.ndim == 2 else wave
    n = wave.shape[-1]
    if n < _KALDI_FRAME_LENGTH:
        return torch.empty(0, num_mel_bins, dtype=torch.float32, device=wave.device)
    frames = wave.unfold(0, _KALDI_FRAME_LENGTH, _KALDI_FRAME_SHIFT)  # (T, 400)
    frames = frames - frames.mean(dim=1, keepdim=True)
    previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)  # first sample repeats itself
    frames = frames - _KALDI_PREEMPH * previous
    window = torch.hann_window(_KALDI_FRAME_LENGTH, periodic=False, device=wave.device).pow(0.85)
    frames = F.pad(frames * window, (0, _KALDI_PADDED - _KALDI_FRAME_LENGTH))
    power = torch.fft.rfft(frames).abs().pow(2.0)  # (T, 257)
    banks = _kaldi_mel_banks(num_mel_bins, float(sample_rate)).to(wave.device)
    energies = torch.mm(power, banks.T)
    eps = torch.tensor(torch.finfo(torch.float32).eps, device=wave.device)
    return torch.max(energies, eps).log()


# --- Matcha mel (prompt features for the flow) ----------------------------------------------------


class MelExtractor:
    """The ``feat_extractor`` of the model yaml (Matcha ``mel_spectrogram``), natural-log mel.

    Holds its own filterbank and window, so models with different rates can live in one process.
    """

    def __init__(
        self,
        n_fft: int,
        num_mels: int,
        sampling_rate: int,
        hop_size: int,
        win_size: int,
        fmin: float = 0,
        fmax: float | None = None,
        center: bool = False,
    ) -> None:
        self.n_fft = int(n_fft)
        self.num_mels = int(num_mels)
        self.sampling_rate = int(sampling_rate)
        self.hop_size = int(hop_size)
        self.win_size = int(win_size)
        self.center = bool(center)
        self.fmin = float(fmin)
        self.fmax = None if fmax is None else float(fmax)
        basis = slaney_mel_filters(self.sampling_rate, self.n_fft, self.num_mels, self.fmin, self.fmax)
        self.mel_basis = torch.from_numpy(basis.copy())  # (num_mels, n_fft // 2 + 1)
        self.window = torch.hann_window(self.win_size)

    def __call__(self, wave: torch.Tensor) -> torch.Tensor:
        """(1, N) float at ``sampling_rate`` -> (1, num_mels, T) natural-log mel, T = N // hop (center=False)."""
        wave = wave.to(torch.float32)
        device = wave.device
        pad = (self.n_fft - self.hop_size) // 2
        wave = F.pad(wave.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
        spec = torch.stft(
            wave,
            self.n_fft,
            hop_length=self.hop_size,
            win_length=self.win_size,
            window=self.window.to(device),
            center=self.center,
            pad_mode="reflect",
            normalized=False,
            onesided=True,
            return_complex=True,
        )
        spec = torch.view_as_real(spec)
        magnitude = torch.sqrt(spec.pow(2).sum(-1) + 1e-9)
        mel = torch.matmul(self.mel_basis.to(device), magnitude)
        return torch.log(torch.clamp(mel, min=1e-5))

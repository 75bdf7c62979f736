"""The two ONNX graphs shipped with every model: speech tokenizer and CAM++ speaker encoder (spec §4.2-4.3).

onnxruntime's ``InferenceSession.run`` may be called from several threads at once, so one
session per model serves all requests.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from cosyserve.errors import AudioError, ModelLoadError
from cosyserve.frontend.features import kaldi_fbank, whisper_log_mel

TOKENIZER_SAMPLE_RATE = 16000
MAX_TOKENIZER_SECONDS = 30.0  # the reference asserts this on every prompt / VC source
MIN_SAMPLES = 400  # one 25 ms analysis frame: shorter input has no features at all


def default_providers() -> list[str]:
    """CUDA when this onnxruntime build has it, always with the CPU fallback."""
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def _open_session(path: str | Path, providers: Sequence[str] | None, threads: int = 1) -> ort.InferenceSession:
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"ONNX model not found: {path}")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=list(providers or default_providers()))
    except Exception as exc:  # onnxruntime raises several unrelated types for unreadable graphs
        raise ModelLoadError(f"cannot load ONNX model {path}: {exc}") from exc


def _check_wave(wave16k: torch.Tensor, what: str) -> torch.Tensor:
    if wave16k.ndim == 1:
        wave16k = wave16k[None]
    if wave16k.ndim != 2 or wave16k.shape[0] != 1:
        raise AudioError(f"{what}: expected a mono waveform of shape (1, N), got {tuple(wave16k.shape)}")
    if wave16k.shape[1] < MIN_SAMPLES:
        raise AudioError(
            f"{what}: audio too short ({wave16k.shape[1] / TOKENIZER_SAMPLE_RATE:.3f} s, "
            f"need at least {MIN_SAMPLES / TOKENIZER_SAMPLE_RATE:.3f} s)"
        )
    return wave16k.to(torch.float32).cpu()


class SpeechTokenizer:
    """``speech_tokenizer_v*.onnx``: 16 kHz audio -> discrete speech tokens (1, T) int32."""

    def __init__(self, path: str | Path, providers: Sequence[str] | None = None, threads: int = 1) -> None:
        self.path = Path(path)
        self.session = _open_session(self.path, providers, threads)
        inputs = self.session.get_inputs()
        if len(inputs) < 2:
            raise ModelLoadError(f"{self.path}: expected 2 inputs (feats, feats_length), found {len(inputs)}")
        # Official graphs differ in input names between versions: address them by position.
        self._feats_name = inputs[0].name
        self._length_name = inputs[1].name

    def __call__(self, wave16k: torch.Tensor) -> torch.Tensor:
        wave16k = _check_wave(wave16k, "speech tokenizer")
        seconds = wave16k.shape[1] / TOKENIZER_SAMPLE_RATE
        if seconds > MAX_TOKENIZER_SECONDS:
            raise AudioError(
                f"audio is {seconds:.1f} s long; the speech tokenizer accepts at most {MAX_TOKENIZER_SECONDS:g} s"
            )
        feats = whisper_log_mel(wave16k, n_mels=128)  # (1, 128, T)
        outputs = self.session.run(
            None,
            {
                self._feats_name: feats.numpy(),
                self._length_name: np.array([feats.shape[2]], dtype=np.int32),
            },
        )
        tokens = np.asarray(outputs[0]).reshape(-1).astype(np.int32)
        return torch.from_numpy(tokens)[None]


class SpeakerEncoder:
    """``campplus.onnx``: 16 kHz audio -> x-vector (1, 192) float32."""

    def __init__(self, path: str | Path, providers: Sequence[str] | None = None, threads: int = 1) -> None:
        self.path = Path(path)
        self.session = _open_session(self.path, providers, threads)
        self._input_name = self.session.get_inputs()[0].name

    def __call__(self, wave16k: torch.Tensor) -> torch.Tensor:
        wave16k = _check_wave(wave16k, "speaker encoder")
        feat = kaldi_fbank(wave16k, num_mel_bins=80)  # (T, 80)
        feat = feat - feat.mean(dim=0, keepdim=True)  # cepstral mean normalisation
        embedding = self.session.run(None, {self._input_name: feat[None].numpy()})[0]
        return torch.from_numpy(np.asarray(embedding, dtype=np.float32).reshape(1, -1))

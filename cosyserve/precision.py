"""Numeric precision per stage: the ``--dtype`` setting (torch-free, so the settings can check it).

``fp32`` everywhere is the default and what the parity tests pin. ``bf16`` halves the LLM's weight
reads (its decode step is bound by them) and runs the flow's estimator on bf16 matmuls; ``int8``
quantizes the LLM's linear layers' weights (CPU). The vocoder always runs in fp32 (v3's f0
predictor in fp64, as the official code does).
"""

from __future__ import annotations

STAGE_DTYPES: dict[str, tuple[str, ...]] = {
    "llm": ("fp32", "bf16", "fp16", "int8"),
    "flow": ("fp32", "bf16", "fp16"),
}
DEFAULT_DTYPE = "fp32"

# The attention of a streamed v2/v3 request's last chunk. "reference": full context over the whole
# utterance, as the official code computes it (a full re-run of the flow, as costly as the
# non-streamed request's flow); "causal": chunk-causal like every earlier chunk, so the last chunk
# costs only its own frames (its audio then differs slightly from the reference's last chunk).
STREAM_LAST_CHUNK_MODES = ("reference", "causal")
DEFAULT_STREAM_LAST_CHUNK = "causal"  # a streamed request costs about what a non-streamed one does
# All streamed requests of a model together: the flow's cached keys / values (about 4.6 MB per mel
# frame for the full-size v2 estimator in fp32, 9 s of audio ~ 2 GB); a request that would pass it
# re-runs the flow from the start for its later chunks (same audio, the quadratic cost). 0: half the
# memory available when the model loads.
DEFAULT_STREAM_CACHE_MB = 0


def check_engine_precision(dtype: str, last_chunk: str, cache_mb: int) -> None:
    """Raise ValueError, naming the option, for a ``--dtype`` or streaming option no model can use (the
    server's settings and the engine's options both check through here)."""
    parse_dtypes(dtype)
    check_streaming(last_chunk, cache_mb)


def check_streaming(last_chunk: str, cache_mb: int) -> None:
    """Raise ValueError, naming the option, for streaming options no model can use."""
    if last_chunk not in STREAM_LAST_CHUNK_MODES:
        raise ValueError(f"stream_last_chunk {last_chunk!r} is not one of {', '.join(STREAM_LAST_CHUNK_MODES)}")
    if cache_mb < 0:
        raise ValueError(f"stream_cache_mb must be 0 (automatic) or more, not {cache_mb}")


# ``fast``: per stage the fastest precision this CPU runs within the deviation bounds that
# scripts/precision_report.py measures (LLM greedy agreement >= 95 % over 200 teacher-forced steps,
# mel error <= 2 %, waveform SNR >= 40 dB against fp32). The LLM: int8 weights (per output row),
# faster than bf16 even where bf16 is native (its decode step reads half as many bytes); the flow's
# estimator: bf16 only where the CPU has bf16 instructions (elsewhere bf16 is emulated, slower than
# fp32). The vocoder stays fp32.
FAST = "fast"
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (Linux /proc/cpuinfo; empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def fast_dtypes(flags: frozenset[str]) -> dict[str, str]:
    """What ``--dtype fast`` picks on a CPU with these flags."""
    return {"llm": "int8", "flow": "bf16" if flags & BF16_CPU_FLAGS else "fp32"}


def parse_dtypes(spec: str, flags: frozenset[str] | None = None) -> dict[str, str]:
    """``"bf16"`` (every stage that takes it), ``"llm=int8,flow=bf16"`` or ``"fast"`` (for this CPU, or
    one with ``flags``) -> {stage: dtype}.

    Raises ValueError naming the bad part.
    """
    spec = (spec or DEFAULT_DTYPE).strip().lower()
    if spec == FAST:
        return fast_dtypes(cpu_flags() if flags is None else flags)
    out = dict.fromkeys(STAGE_DTYPES, DEFAULT_DTYPE)
    if "=" not in spec:
        if not any(spec in allowed for allowed in STAGE_DTYPES.values()):
            raise ValueError(f"dtype {spec!r} is not one of fp32, bf16, fp16, int8, fast")
        return {stage: spec if spec in allowed else DEFAULT_DTYPE for stage, allowed in STAGE_DTYPES.items()}
    for part in spec.split(","):
        stage, _, dtype = part.strip().partition("=")
        if stage not in STAGE_DTYPES:
            raise ValueError(f"dtype stage {stage!r} is not one of {', '.join(STAGE_DTYPES)}")
        if dtype not in STAGE_DTYPES[stage]:
            raise ValueError(f"{stage} dtype {dtype!r} is not one of {', '.join(STAGE_DTYPES[stage])}")
        out[stage] = dtype
    return out

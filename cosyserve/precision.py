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
# Per streamed request, the flow's cached keys / values (about 4.6 MB per mel frame for the full-size
# v2 estimator in fp32, 9 s of audio ~ 2 GB); a request that would outgrow it re-runs the flow from
# the start for its later chunks (same audio, the quadratic cost).
DEFAULT_STREAM_CACHE_MB = 1024


def parse_dtypes(spec: str) -> dict[str, str]:
    """``"bf16"`` (every stage that takes it) or ``"llm=int8,flow=bf16"`` -> {stage: dtype}.

    Raises ValueError naming the bad part.
    """
    spec = (spec or DEFAULT_DTYPE).strip().lower()
    out = dict.fromkeys(STAGE_DTYPES, DEFAULT_DTYPE)
    if "=" not in spec:
        if not any(spec in allowed for allowed in STAGE_DTYPES.values()):
            raise ValueError(f"dtype {spec!r} is not one of fp32, bf16, fp16, int8")
        return {stage: spec if spec in allowed else DEFAULT_DTYPE for stage, allowed in STAGE_DTYPES.items()}
    for part in spec.split(","):
        stage, _, dtype = part.strip().partition("=")
        if stage not in STAGE_DTYPES:
            raise ValueError(f"dtype stage {stage!r} is not one of {', '.join(STAGE_DTYPES)}")
        if dtype not in STAGE_DTYPES[stage]:
            raise ValueError(f"{stage} dtype {dtype!r} is not one of {', '.join(STAGE_DTYPES[stage])}")
        out[stage] = dtype
    return out

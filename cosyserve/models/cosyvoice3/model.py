"""Fun-CosyVoice3-0.5B: CosyVoice3LM + CausalMaskedDiffWithDiT + CausalHiFT at 24 kHz."""

from cosyserve.models.base import FamilySpec
from cosyserve.models.cosyvoice3.config import parse
from cosyserve.models.cosyvoice3.flow import CausalMaskedDiffWithDiT
from cosyserve.models.cosyvoice3.llm import SILENT_TOKENS, CosyVoice3LM
from cosyserve.nn.hift_causal import CausalHiFTGenerator

SPEC = FamilySpec(
    "cosyvoice3",
    "v3",
    parse,
    llm=CosyVoice3LM,
    flow=CausalMaskedDiffWithDiT,
    hift=CausalHiFTGenerator,
    silent_tokens=frozenset(SILENT_TOKENS),
)
load = SPEC.load

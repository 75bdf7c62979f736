"""CosyVoice2-0.5B: Qwen2LM + CausalMaskedDiffWithXvec (chunk-causal) + HiFT at 24 kHz."""

from cosyserve.models.base import FamilySpec
from cosyserve.models.cosyvoice2.config import parse
from cosyserve.models.cosyvoice2.flow import CausalMaskedDiffWithXvec
from cosyserve.models.cosyvoice2.llm import Qwen2LM
from cosyserve.nn.hift import HiFTGenerator

SPEC = FamilySpec("cosyvoice2", "v2", parse, llm=Qwen2LM, flow=CausalMaskedDiffWithXvec, hift=HiFTGenerator)
load = SPEC.load

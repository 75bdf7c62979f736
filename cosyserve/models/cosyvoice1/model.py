"""CosyVoice 1.0 (300M, -SFT, -Instruct, -25Hz): TransformerLM + MaskedDiffWithXvec + HiFT at 22.05 kHz."""

from cosyserve.models.base import FamilySpec
from cosyserve.models.cosyvoice1.config import parse
from cosyserve.models.cosyvoice1.flow import MaskedDiffWithXvec
from cosyserve.models.cosyvoice1.llm import TransformerLM
from cosyserve.nn.hift import HiFTGenerator

SPEC = FamilySpec("cosyvoice1", "v1", parse, llm=TransformerLM, flow=MaskedDiffWithXvec, hift=HiFTGenerator)
load = SPEC.load

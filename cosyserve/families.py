"""The model families, one record each: every fact about a family lives here.

The rest of the code asks this table (which yaml names a family, which speech tokenizer it ships,
which modes it serves, how its tokens become audio...) instead of keeping tables of its own. It
imports nothing, so any layer may read it; the classes it names are imported by those that build
them (``models`` for the networks, ``engine`` for the token-to-audio policy).

To add a family: a ``models/<family>/`` package with its networks and a ``FamilySpec`` (``load``),
a synthesizer in ``engine/streaming.py`` if its token-to-audio schedule is new, and a record here.

The engine asks this table, never a network (``hasattr``) or a family name, what a family can do.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str  # the id used everywhere: cosyvoice1 | cosyvoice2 | cosyvoice3
    display: str  # what a person calls it
    version: str  # frontend conventions: v1 | v2 | v3
    yaml: str  # the config file whose presence identifies a model directory of this family
    speech_tokenizer: str  # the speech tokenizer file (the 25 Hz v1 model uses v1's name too)
    model_module: str  # module whose ``load`` builds the networks from the yaml (a FamilySpec)
    synthesizer: str  # token-to-audio policy: a class of cosyserve.engine.streaming
    instruct_mode: str  # instruct (built-in speaker + instruction) or instruct2 (prompt + instruction)
    system_prompt: bool = False  # texts need "You are a helpful assistant.<|endofprompt|>" before them
    bistream: bool = False  # the LLM takes text that arrives while it speaks (spec §9.4)
    # The official code's early stop masks one id that is not this family's eos (v3: spec §17.2), which
    # --reference_eos_mask reproduces; where the two rules agree (v1, v2) the option changes nothing.
    reference_eos_quirk: bool = False
    # The text tags around emphasised words (SSML <emphasis>), special tokens of the family's tokenizer
    # (spec §5.5, §6.3); None: the words are spoken plainly.
    emphasis: tuple[str, str] | None = None
    # Its tokenizer has inline pronunciation tokens (pinyin units [ch][óng], CMU phones [AH0]; spec §5.5, §6.3),
    # which the pronunciation lexicon writes pinyin / CMU entries as; other families speak a respelling.
    inline_pronunciation: bool = False


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "cosyvoice1",
            "CosyVoice 1.0",
            "v1",
            "cosyvoice.yaml",
            "speech_tokenizer_v1.onnx",
            "cosyserve.models.cosyvoice1.model",
            "V1Synthesizer",
            "instruct",
        ),
        Family(
            "cosyvoice2",
            "CosyVoice2",
            "v2",
            "cosyvoice2.yaml",
            "speech_tokenizer_v2.onnx",
            "cosyserve.models.cosyvoice2.model",
            "V2Synthesizer",
            "instruct2",
            bistream=True,
            emphasis=("<strong>", "</strong>"),
        ),
        Family(
            "cosyvoice3",
            "Fun-CosyVoice3",
            "v3",
            "cosyvoice3.yaml",
            "speech_tokenizer_v3.onnx",
            "cosyserve.models.cosyvoice3.model",
            "V3Synthesizer",
            "instruct2",
            system_prompt=True,
            bistream=True,
            reference_eos_quirk=True,
            emphasis=("<strong>", "</strong>"),
            inline_pronunciation=True,
        ),
    )
}

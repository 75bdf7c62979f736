"""How continuity changes the speaking rate across the segments of one long text.

Speaks a 20-sentence text (20 segments) with and without ``continuity`` (same seed) and prints, per
segment, the speech tokens the LLM picked per text token of the segment, then the spread of that rate
(mean, standard deviation, coefficient of variation, min..max). On the tiny golden models (random
weights) the figures only show that the mechanism runs and changes what the LLM does: whether the voice
and rate actually stay steadier needs the real weights (and listening).

    PYTHONPATH=. python3 scripts/continuity_rate.py /work/shared/golden/models/v2-tiny [--seed 1]
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import torch

from cosyserve.engine.pipeline import TTSModel, load_model
from cosyserve.engine.request import GenerationOptions, SynthesisRequest

SUBJECTS = (
    "old keeper", "young sailor", "tall woman", "quiet child", "red boat", "grey gull", "small dog", "night wind",
    "first wave", "last ship", "blue lamp", "cold rain", "long road", "green field", "dark cloud", "warm bread",
    "bright star", "slow river", "proud horse", "silent bell",
)  # fmt: skip
SENTENCE = (
    "The {} came back along the rocky shore at dawn, stopped by the old stone wall near the harbour, "
    "and looked out at the grey sea for a long while before walking on."
)
TEXT = " ".join(SENTENCE.format(s) for s in SUBJECTS)


def rates(model: TTSModel, continuity: bool, seed: int) -> list[tuple[int, int]]:
    """(text tokens, speech tokens) of each segment."""
    lead = model.inputs.text_lead("sft")
    texts: list[int] = []
    picked: list[list[int]] = []
    build = model.lm.build_prefix

    def build_prefix(text: Any, prompt_text: Any, prompt_speech: Any, embedding: Any = None) -> Any:
        texts.append(int(text.shape[-1]) - (0 if continuity and texts else lead))
        return build(text, prompt_text, prompt_speech, embedding)

    base = model._synthesizer

    class Counting(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.ids: list[int] = []
            picked.append(self.ids)

        def add(self, token: int) -> None:
            self.ids.append(token)
            super().add(token)

    model.lm.build_prefix = build_prefix  # type: ignore[method-assign]
    model._synthesizer = Counting
    try:
        request = SynthesisRequest(
            "sft", TEXT, spk_id=model.list_speakers()[0], options=GenerationOptions(seed=seed), continuity=continuity
        )
        for _ in model.synthesize(request):
            pass
    finally:
        model.lm.build_prefix = build  # type: ignore[method-assign]
        model._synthesizer = base
    return [(t, len(p)) for t, p in zip(texts, picked, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a model directory (e.g. the golden v2-tiny)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_model(args.model)
    print(f"{model.family}, {len(SUBJECTS)} sentences, seed {args.seed}")
    for continuity in (False, True):
        found = rates(model, continuity, args.seed)
        r = [speech / text for text, speech in found]
        mean, sd = statistics.mean(r), statistics.pstdev(r)
        print(f"continuity {'on ' if continuity else 'off'}: {len(r)} segments, speech tokens per text token")
        print("  " + " ".join(f"{x:.2f}" for x in r))
        print(f"  mean {mean:.3f}  sd {sd:.3f}  cv {sd / mean if mean else 0:.3f}  min {min(r):.2f}  max {max(r):.2f}")


if __name__ == "__main__":
    main()

"""scripts/precision_report.py on the tiny models: every option runs and moves the outputs a little."""

from __future__ import annotations

import importlib.util
import math

import pytest
from golden import REPO, model_dir

# Slow: end-to-end on the golden models, servers, browsers or databases (the fast tier: -m "not slow").
pytestmark = pytest.mark.slow


def _report_module():
    spec = importlib.util.spec_from_file_location("precision_report", REPO / "scripts" / "precision_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["v1-tiny", "v2-tiny", "v3-tiny"])
def test_precision_report_rows(name, capsys):
    report = _report_module()
    argv = [str(model_dir(name)), "--steps", "6", "--seconds", "1", "--threads", "1",
            "--options", "llm=bf16,llm=int8,flow=bf16,flow_steps=5"]  # fmt: skip
    args = report.build_parser().parse_args(argv)
    rows = {r["option"]: r for r in report.run(args)}
    report.print_table(args, list(rows.values()))
    printed = capsys.readouterr().out
    assert set(rows) == {"llm=bf16", "llm=int8", "flow=bf16", "flow_steps=5", "fp32 (vocoder rerun)"}
    assert all(option in printed for option in rows)
    for option in ("llm=bf16", "llm=int8"):
        assert 0 <= rows[option]["argmax_agree"] <= 1
        assert 0 < rows[option]["mean_abs_dlogp"] <= rows[option]["max_abs_dlogp"] < 5
    assert math.isinf(rows["fp32 (vocoder rerun)"]["snr_db"])  # same mel, same draws: the same waveform
    for option in ("flow=bf16", "flow_steps=5"):
        assert 0 < rows[option]["mel_rel_err"] < 0.5 and math.isfinite(rows[option]["snr_db"])
    with pytest.raises(SystemExit):
        report.parse_options("flow=int8")

"""Loading broken model directories: every failure is a ModelLoadError naming the file or key.

Each case copies a golden model dir (one per model version in the manifest) into tmp_path and
breaks one thing; nothing is ever written into the golden set.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from golden import golden_root, manifest, model_dir, model_version
from resources import missing_mark

from cosyserve.engine.pipeline import load_model
from cosyserve.errors import ModelLoadError
from cosyserve.hub import FAMILY_YAMLS, detect_family

# Slow: end-to-end on the golden models, servers, browsers or databases (the fast tier: -m "not slow").
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _one_per_version() -> list:
    first: dict[str, str] = {}
    for name in manifest()["models"]:
        first.setdefault(model_version(name), name)
    if not first:
        return [pytest.param(None, marks=missing_mark(f"no golden models in {golden_root()}"))]
    return list(first.values())


MODELS = _one_per_version()


def _yaml(directory: Path) -> Path:
    family = detect_family(directory)
    return directory / next(y for y, f in FAMILY_YAMLS if f == family)


def _edit_yaml(pattern: str, replacement: str, expect: str | None = None) -> Callable[[Path], str]:
    """Substitute the first match in the yaml; the error must name ``expect`` (default: the yaml)."""

    def edit(d: Path) -> str:
        path = _yaml(d)
        text, n = re.subn(pattern, replacement, path.read_text(encoding="utf-8"), count=1, flags=re.M)
        assert n == 1, f"{pattern!r} not in {path.name}"
        path.write_text(text, encoding="utf-8")
        return expect or path.name

    return edit


def _write_yaml(data: bytes) -> Callable[[Path], str]:
    def write(d: Path) -> str:
        _yaml(d).write_bytes(data)
        return _yaml(d).name

    return write


def _remove_yaml(d: Path) -> str:
    _yaml(d).unlink()
    return "not a CosyVoice model directory"


def _remove(pattern: str) -> Callable[[Path], str]:
    def remove(d: Path) -> str:
        (path,) = d.glob(pattern)
        path.unlink()
        return path.name

    return remove


def _write(name: str, data: bytes) -> Callable[[Path], str]:
    def write(d: Path) -> str:
        (d / name).write_bytes(data)
        return name

    return write


def _truncate(name: str) -> Callable[[Path], str]:
    def truncate(d: Path) -> str:
        data = (d / name).read_bytes()
        (d / name).write_bytes(data[: len(data) // 2])
        return name

    return truncate


def _edit_state(name: str, edit: Callable[[dict], str]) -> Callable[[Path], str]:
    """Rewrite a weights file; ``edit`` changes the state dict and returns the key to expect."""

    def apply(d: Path) -> str:
        state = torch.load(d / name, map_location="cpu", weights_only=True)
        key = edit(state)
        torch.save(state, d / name)
        return key

    return apply


def _drop_key(state: dict) -> str:
    key = sorted(state)[len(state) // 2]
    del state[key]
    return key


def _grow_key(state: dict) -> str:
    key = next(k for k, v in state.items() if v.dim() >= 1 and v.shape[0] > 1)
    state[key] = torch.zeros(state[key].shape[0] + 1, *state[key].shape[1:])
    return key


def _extra_key(state: dict) -> str:
    state["not_a_parameter.weight"] = torch.zeros(3)
    return "not_a_parameter.weight"


def _other_family_yaml(d: Path) -> str:
    """The yaml of another model version written under this directory's yaml name."""
    mine = model_version(d.name)
    other = next((m for m in manifest()["models"] if model_version(m) != mine), None)
    if other is None:
        pytest.skip("the golden set has a single model version")
    _yaml(d).write_text(_yaml(model_dir(other)).read_text(encoding="utf-8"), encoding="utf-8")
    return "llm"


def _other_family_llm_class(d: Path) -> str:
    mine = model_version(d.name)
    other = next((m for m in manifest()["models"] if model_version(m) != mine), None)
    if other is None:
        pytest.skip("the golden set has a single model version")
    target = re.search(r"^llm: !new:(\S+)", _yaml(model_dir(other)).read_text(encoding="utf-8"), re.M).group(1)
    return _edit_yaml(r"^llm: !new:\S+", f"llm: !new:{target}", target.rsplit(".", 1)[-1])(d)


# case id -> (break the copy and return the text the error must name)
CASES: dict[str, Callable[[Path], str]] = {
    "missing llm.pt": _remove("llm.pt"),
    "missing flow.pt": _remove("flow.pt"),
    "missing hift.pt": _remove("hift.pt"),
    "missing campplus.onnx": _remove("campplus.onnx"),
    "missing speech tokenizer": _remove("speech_tokenizer_v*.onnx"),
    "yaml not yaml": _write_yaml(b"llm: [unclosed\n  :: {\n"),
    "yaml binary": _write_yaml(bytes(range(256)) * 4),
    "yaml not a mapping": _write_yaml(b"- a\n- b\n"),
    "yaml unknown llm class": _edit_yaml(r"^llm: !new:\S+", "llm: !new:cosyvoice.llm.llm.NoSuchLM", "NoSuchLM"),
    "yaml ref to missing key": _edit_yaml(r"!ref <\w+>", "!ref <no_such_key>", "no_such_key"),
    "yaml bad sample_rate": _edit_yaml(r"^sample_rate: .*$", "sample_rate: fast", "sample_rate"),
    "yaml python tag": _edit_yaml(r"^llm: ", "llm: !!python/object/apply:os.getcwd []\nold_llm: "),
    "yaml of another family": _other_family_yaml,
    "llm class of another family": _other_family_llm_class,
    "no yaml": _remove_yaml,
    "truncated flow.pt": _truncate("flow.pt"),
    "random bytes llm.pt": _write("llm.pt", os.urandom(4096)),
    "random bytes hift.pt": _write("hift.pt", b"PK\x03\x04" + os.urandom(4096)),
    "missing key in flow.pt": _edit_state("flow.pt", _drop_key),
    "wrong shape in llm.pt": _edit_state("llm.pt", _grow_key),
    "unexpected key in hift.pt": _edit_state("hift.pt", _extra_key),
    "corrupt spk2info.pt": _truncate("spk2info.pt"),
}


def _copy(name: str, tmp_path: Path) -> Path:
    # Named after the model so helpers can find its version.
    copy = tmp_path / name
    shutil.copytree(model_dir(name), copy)
    return copy


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", MODELS)
def test_broken_model_dir(name, case, tmp_path):
    copy = _copy(name, tmp_path)
    expected = CASES[case](copy)
    with pytest.raises(ModelLoadError) as err:
        load_model(copy, text_frontend="none")
    assert expected in str(err.value), f"{case}: the error does not name {expected!r}: {err.value}"


@pytest.mark.parametrize("name", MODELS)
def test_missing_llm_weights_variant(name, tmp_path):
    with pytest.raises(ModelLoadError, match=r"llm\.rl\.pt"):
        load_model(model_dir(name), text_frontend="none", llm_weights="llm.rl.pt")


@pytest.mark.parametrize("name", MODELS)
def test_yaml_code_is_never_executed(name, tmp_path):
    copy = _copy(name, tmp_path)
    marker = tmp_path / "executed"
    command = f'["touch {marker}"]'
    text = _yaml(copy).read_text(encoding="utf-8")
    _yaml(copy).write_text(f"boom: !apply:os.system {command}\nbang: !new:os.system {command}\n" + text, "utf-8")
    load_model(copy, text_frontend="none")  # unused keys are inert records
    _edit_yaml(r"^llm: ", f"llm: !apply:os.system {command}\nold_llm: ")(copy)
    with pytest.raises(ModelLoadError, match="llm"):
        load_model(copy, text_frontend="none")
    assert not marker.exists(), "a yaml tag executed code"


@pytest.mark.parametrize("name", MODELS)
def test_legacy_vocoder_naming_loads(name, tmp_path):
    """hift.pt with weight_g / weight_v names and a ``generator.`` prefix gives the same vocoder."""
    copy = _copy(name, tmp_path)
    state = torch.load(copy / "hift.pt", map_location="cpu", weights_only=True)
    assert any(".parametrizations.weight.original" in k for k in state), "expected weight-normed keys"
    legacy = {
        "generator."
        + k.replace("parametrizations.weight.original0", "weight_g").replace(
            "parametrizations.weight.original1", "weight_v"
        ): v
        for k, v in state.items()
    }
    torch.save(legacy, copy / "hift.pt")
    loaded = load_model(copy, text_frontend="none").core.hift.state_dict()
    reference = load_model(model_dir(name), text_frontend="none").core.hift.state_dict()
    assert loaded.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(loaded[key], value), key


@pytest.mark.parametrize("name", MODELS)
def test_missing_spk2info_means_no_sft(name, tmp_path):
    copy = _copy(name, tmp_path)
    (copy / "spk2info.pt").unlink()
    model = load_model(copy, text_frontend="none")
    assert model.list_speakers() == [] and "sft" not in model.modes

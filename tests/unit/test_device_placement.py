"""Every tensor the engine makes for a stage is made on (or moved to) the model's device, checked on
the CPU.

A GPU run fails on a CPU tensor meeting a CUDA weight; a CPU run cannot see that mistake. Here the
model's weights are *said* to live on another device: :class:`StandInDevice` is a torch function
mode that reports the weights, and every tensor computed from them or created / moved with
``device=`` that device, as being on ``meta``, while the arithmetic still runs on the CPU. An op
that mixes such a tensor with an ordinary CPU tensor (of one element or more) raises, as CUDA would,
and so does ``.numpy()`` on one. The engine runs its real path under it: the frontend's CPU
tensors, the scheduler's prefix and decode ids, the synthesizers' flow / vocoder inputs, streaming
caches, speed changes, batched decoding.
"""

from __future__ import annotations

import dataclasses
import weakref

import pytest
import torch
from golden import golden_root, manifest, model_dir, model_version
from resources import missing_mark
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from cosyserve.engine.loading import EngineOptions, StagePlacement, load_parts
from cosyserve.engine.pipeline import TTSModel
from cosyserve.engine.request import GenerationOptions, SynthesisRequest
from cosyserve.engine.streaming import Draws
from cosyserve.nn.linear import PackedLinear

pytestmark = pytest.mark.slow

STAND_IN = torch.device("meta")
OTHER_STAND_IN = torch.device("hpu")  # a second device, for stages placed apart
# Ops that accept operands on two devices (a copy, an index on the CPU).
_CROSS_DEVICE = {torch.Tensor.copy_, torch.Tensor.__getitem__, torch.Tensor.__setitem__}
_TO_DEVICE = {torch.Tensor.to, torch.Tensor.cpu}
_TO_HOST_ARRAY = {torch.Tensor.numpy, torch.Tensor.__array__}
_CPU = torch.device("cpu")


class WrongDevice(RuntimeError):
    pass


class StandInDevice(TorchFunctionMode):
    """Treats ``modules``' parameters and buffers, and what is computed from them, as being on
    :data:`STAND_IN` (see the module docstring); ``placed`` puts other modules on other stand-ins."""

    def __init__(self, *modules: torch.nn.Module, placed: dict[torch.device, tuple] | None = None) -> None:
        super().__init__()
        # By storage, not tensor object: views share it, and so do the parameters a module copy or a
        # dtype change rebuilds around a computed tensor (deepcopy, .double()).
        self.where: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.opaque: dict[int, torch.device] = {}  # weights in oneDNN's packed layout have no storage
        groups = [(STAND_IN, modules), *(placed or {}).items()]
        for device, group in groups:
            for module in group:
                for tensor in (*module.parameters(), *module.buffers()):
                    self.where[tensor.untyped_storage()] = device
                for layer in module.modules():
                    if isinstance(layer, PackedLinear):
                        self.opaque[id(layer.packed)] = device

    def _device_of(self, tensor: torch.Tensor) -> torch.device:
        if tensor.layout != torch.strided:
            return self.opaque.get(id(tensor), _CPU)
        return self.where.get(tensor.untyped_storage(), _CPU)

    def _is_on(self, tensor: torch.Tensor) -> bool:
        return self._device_of(tensor) != _CPU

    def _target(self, func, args: tuple, kwargs: dict) -> torch.device | None:
        """Where the result is put explicitly (None: not said)."""
        candidates = [kwargs["device"]] if kwargs.get("device") is not None else []
        if func in _TO_DEVICE:
            if func is torch.Tensor.cpu:
                return _CPU
            candidates += [a for a in args[1:] if isinstance(a, (str, torch.device, torch.Tensor))]
        if not candidates:
            return None
        where = candidates[0]
        if isinstance(where, torch.Tensor):
            return self._device_of(where)
        return torch.device(where) if torch.device(where).type in (STAND_IN.type, OTHER_STAND_IN.type) else _CPU

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func == torch.Tensor.device.__get__:
            return self._device_of(args[0])
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        devices = {self._device_of(t) for t in tensors if self._is_on(t)}
        target = self._target(func, args, kwargs)
        if target is None:  # an op: its operands must agree, its result is where they are
            if func in _TO_HOST_ARRAY and devices:
                raise WrongDevice(f"{func.__name__}() of a tensor on the model's device (needs .cpu() first)")
            off = [t for t in tensors if not self._is_on(t) and t.dim() > 0]
            name = getattr(func, "__name__", func)
            if len(devices) > 1 and func not in _CROSS_DEVICE:
                raise WrongDevice(f"{name}: tensors on {sorted(map(str, devices))} meet")
            if devices and off and func not in _CROSS_DEVICE:
                shapes = [tuple(t.shape) for t in off]
                raise WrongDevice(f"{name}: CPU tensor(s) {shapes} meet the model's device")
            target = next(iter(devices)) if devices else _CPU
        if kwargs.get("device") is not None:
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to:
            args = tuple(a for a in args if not isinstance(a, (str, torch.device)))
            if len(args) > 1 and isinstance(args[1], torch.Tensor):  # .to(other): take its dtype only
                args = (args[0], args[1].dtype, *args[2:])
        out = func(*args, **kwargs)
        return self._place(out, target, tensors)

    def _place(self, out, target: torch.device, inputs: list[torch.Tensor]):
        results = out if isinstance(out, (tuple, list)) else (out,)
        placed = []
        for result in results:
            if isinstance(result, torch.Tensor):
                storage = result.untyped_storage()
                shares = any(t.layout == torch.strided and storage is t.untyped_storage() for t in inputs)
                if self._device_of(result) != target and shares:
                    result = result.clone()  # a move makes a new tensor; never retag the input's storage
                if target != _CPU:
                    self.where[result.untyped_storage()] = target
            placed.append(result)
        if not isinstance(out, (tuple, list)):
            return placed[0]
        return type(out)(placed)  # tuple, list or torch.return_types (built from a sequence)


# -- the mode itself ------------------------------------------------------------------------------------
def test_stand_in_device_catches_a_cpu_tensor_meeting_a_weight():
    layer = torch.nn.Linear(4, 3).requires_grad_(False)
    with StandInDevice(layer):
        device = layer.weight.device
        assert device == STAND_IN
        with pytest.raises(WrongDevice, match="linear"):
            layer(torch.zeros(2, 4))
        with pytest.raises(WrongDevice, match="cat"):
            torch.cat([layer.weight, torch.zeros(1, 4)])
        hidden = layer(torch.zeros(2, 4, device=device))  # made there: fine
        assert hidden.device == STAND_IN
        assert layer(torch.ones(2, 4).to(device)).device == STAND_IN  # moved there: fine
        assert (hidden * torch.tensor(2.0)).device == STAND_IN  # a CPU scalar is allowed, as on CUDA
        with pytest.raises(WrongDevice, match="numpy"):
            hidden.numpy()
        back = hidden.cpu()
        assert back.device == torch.device("cpu") and back.numpy().shape == (2, 3)
        assert hidden.device == STAND_IN  # moving back made a new tensor
        with pytest.raises(WrongDevice, match="add"):
            back + hidden
        assert hidden.to(torch.zeros(1)).device == torch.device("cpu")  # .to(other) follows other
        assert torch.equal(torch.zeros_like(hidden).cpu(), torch.zeros(2, 3))


# -- the engine under it ----------------------------------------------------------------------------------
def _models() -> list:
    names = [m for m in manifest()["models"] if model_version(m) in ("v1", "v2", "v3")]
    if not names:
        return [pytest.param(None, marks=missing_mark(f"no golden models in {golden_root()}"))]
    return names


@pytest.fixture(scope="module")
def prompt_wav() -> bytes:
    name = manifest().get("inputs", {}).get("e2e", {}).get("prompt_wav", "zero_shot_prompt")
    return (golden_root() / "audio" / f"{name}.wav").read_bytes()


def _placed(name: str, placement: StagePlacement) -> TTSModel:
    """The model loaded on the CPU, its runner told its stages are where ``placement`` says (the
    stand-in mode makes them look so)."""
    parts = load_parts(
        model_dir(name), device="cpu", hub="auto", options=EngineOptions(text_frontend="none"), library=None
    )
    return TTSModel(dataclasses.replace(parts, placement=placement))


def _stand_in(model: TTSModel) -> StandInDevice:
    core = model.core
    return StandInDevice(core.llm, core.flow, core.hift)


def _run_batched(model: TTSModel, requests: list[SynthesisRequest]) -> None:
    """Several requests decoded as one batch (rows joining a shared cache), each to its end."""
    loop = model.new_loop()
    for seed, request in enumerate(requests):
        loop.add(model.prepare(request, draws=Draws(seed)))
    finished = 0
    while loop.has_work:
        for sequence, chunk in loop.step():
            if chunk is None:
                assert sequence.failed is None, sequence.failed
                finished += 1
    assert finished == len(requests)


def _requests(model: TTSModel, prompt_wav: bytes) -> list[SynthesisRequest]:
    """Non-streamed and streamed (with a speed change) zero_shot, streamed vc, and sft (no prompt)."""
    text, prompt_text = "今天天气真好，我们一起去散步吧。", "希望你以后能够做的比我还好呦。"
    requests = [
        SynthesisRequest("zero_shot", text, prompt_text=prompt_text, prompt_audio=prompt_wav,
                         options=GenerationOptions(stream=stream, seed=1, speed=speed))
        for stream, speed in ((False, 1.0), (True, 1.5))
    ]  # fmt: skip
    requests.append(SynthesisRequest("vc", source_audio=prompt_wav, prompt_audio=prompt_wav,
                                     options=GenerationOptions(stream=True, seed=2)))  # fmt: skip
    if model.list_speakers():
        requests.append(
            SynthesisRequest("sft", text, spk_id=model.list_speakers()[0], options=GenerationOptions(seed=3))
        )
    return requests


@pytest.mark.parametrize("name", _models())
def test_engine_creates_stage_inputs_on_the_model_device(name, prompt_wav):
    model = _placed(name, StagePlacement.on(STAND_IN.type))
    requests = _requests(model, prompt_wav)
    with _stand_in(model):
        for request in requests:
            chunks = list(model.synthesize(request))
            assert chunks and all(c.size and c.dtype.name == "float32" for c in chunks), request.mode
        _run_batched(model, [requests[0], requests[-1]])


def _every_mode(model: TTSModel, prompt_wav: bytes) -> list[SynthesisRequest]:
    text, prompt_text = "今天天气真好，我们一起去散步吧。", "希望你以后能够做的比我还好呦。"
    speaker = model.list_speakers()[0] if model.list_speakers() else None
    fields = {
        "sft": {"text": text, "spk_id": speaker},
        "zero_shot": {"text": text, "prompt_text": prompt_text, "prompt_audio": prompt_wav},
        "cross_lingual": {"text": text, "prompt_audio": prompt_wav},
        "instruct": {"text": text, "spk_id": speaker, "instruct_text": "Speak slowly."},
        "instruct2": {"text": text, "instruct_text": "Speak slowly.", "prompt_audio": prompt_wav},
        "vc": {"source_audio": prompt_wav, "prompt_audio": prompt_wav},
    }
    return [
        SynthesisRequest(mode, options=GenerationOptions(stream=stream, seed=n), **fields[mode])
        for n, (mode, stream) in enumerate((m, s) for m in sorted(model.modes) for s in (False, True))
    ]


@pytest.mark.parametrize("vocoder_apart", [False, True], ids=["vocoder-with-flow", "vocoder-with-llm"])
@pytest.mark.parametrize("name", _models())
def test_llm_and_flow_on_two_devices_serve_every_mode(name, vocoder_apart, prompt_wav):
    """The LLM on one device, the flow on another, the vocoder on either: every mode, streamed or not,
    and a batch, with each stage's inputs made on (or moved to) its own device only."""
    vocoder = STAND_IN if vocoder_apart else OTHER_STAND_IN
    model = _placed(name, StagePlacement(llm=STAND_IN.type, flow=OTHER_STAND_IN.type, vocoder=vocoder.type))
    core = model.core
    requests = _every_mode(model, prompt_wav)
    assert {r.mode for r in requests} == set(model.modes)
    placed = {OTHER_STAND_IN: (core.flow,)}
    placed[vocoder] = (*placed.get(vocoder, ()), core.hift)
    with StandInDevice(core.llm, placed=placed):
        assert core.llm.speech_embedding.weight.device == STAND_IN
        assert next(core.flow.parameters()).device == OTHER_STAND_IN
        for request in requests:
            chunks = list(model.synthesize(request))
            assert chunks and all(c.size and c.dtype.name == "float32" for c in chunks), request.mode
        _run_batched(model, requests[:3])


def test_the_stand_in_catches_two_devices_meeting():
    a, b = torch.nn.Linear(4, 3).requires_grad_(False), torch.nn.Linear(3, 2).requires_grad_(False)
    with StandInDevice(a, placed={OTHER_STAND_IN: (b,)}):
        hidden = a(torch.zeros(1, 4, device=STAND_IN))
        with pytest.raises(WrongDevice, match="meet"):
            b(hidden)
        assert b(hidden.to(OTHER_STAND_IN)).device == OTHER_STAND_IN

"""Checks shared by the families' config modules: yaml nodes -> checked numbers, errors naming the key.

Each family's ``config.py`` reads its yaml once into config dataclasses with these helpers; the
``nn`` blocks never see a yaml node. The blocks more than one family uses (conformer encoders, the
CFM sampler, the RAS sampler, the HiFT vocoder) are read here, once.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from cosyserve.config import ConfigError, Node
from cosyserve.nn.conformer import (
    ACTIVATIONS,
    INPUT_LAYERS,
    ConformerEncoder,
    TransformerEncoder,
    UpsampleConformerEncoder,
)
from cosyserve.nn.sampling import RasSampler

BLANK_EN = "CosyVoice-BlankEN"  # the Qwen2 folder whose config.json gives the v2/v3 LLM geometry


def expect_node(config: dict[str, Any], key: str, *classes: str) -> Node:
    """Return ``config[key]`` as a Node whose class is one of ``classes`` (or raise)."""
    value = config.get(key)
    if not isinstance(value, Node):
        raise ConfigError(f"key '{key}' must be a !new: object")
    if classes and value.cls not in classes:
        raise ConfigError(f"key '{key}': unsupported class {value.target} (expected {' or '.join(classes)})")
    return value


def expect_class(node: object, classes: tuple[str, ...], where: str) -> Node:
    """``node`` as a Node of one of ``classes``; ``where`` is its yaml path, e.g. ``flow.decoder``."""
    if not isinstance(node, Node) or node.cls not in classes:
        found = node.target if isinstance(node, Node) else type(node).__name__
        raise ConfigError(f"{where}: expected {' or '.join(classes)}, found {found}")
    return node


def node_kwargs(node: Node, *allowed: str) -> dict[str, Any]:
    """Keyword arguments of ``node`` limited to ``allowed`` keys (the numbers a module needs)."""
    return {k: v for k, v in node.args.items() if k in allowed}


def positive_int(value: Any, name: str) -> int:
    """``value`` if it is a positive integer; ``name`` is its yaml path."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"'{name}' must be a positive integer, got {value!r}")
    return value


def config_int(values: dict[str, Any], key: str, path: str = "") -> int:
    """``values[key]`` as a positive integer (a top-level yaml key, or ``path`` names its parent)."""
    return positive_int(values.get(key), f"{path + '.' if path else ''}{key}")


def require_int(node: Node, key: str, path: str) -> int:
    """``node.key`` (which must be present) as a positive integer."""
    return positive_int(node.require(key, path), f"{path}.{key}")


def check_known(node: Node, known: set[str], where: str) -> None:
    for key in node.args:
        if key not in known:
            raise ConfigError(f"{where}: unknown key '{key}'")


def constructor_keys(cls: type) -> set[str]:
    return set(inspect.signature(cls).parameters)


@contextmanager
def named_errors(where: str) -> Iterator[None]:
    """Turn a building block's ValueError / TypeError into a ConfigError naming the yaml path."""
    try:
        yield
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def feat_extractor_args(config: dict[str, Any]) -> dict[str, Any]:
    node = config.get("feat_extractor")
    if not isinstance(node, Node):
        raise ConfigError("key 'feat_extractor' must be a !name: mel_spectrogram entry")
    return dict(node.args)


def stage_numbers(config: dict[str, Any], flow: Node, causal: bool) -> StageNumbers:
    """The numbers beside the networks; ``causal`` for the chunk-causal flows (v2/v3)."""
    numbers = StageNumbers(
        sample_rate=config_int(config, "sample_rate"),
        hop_size=config_int(feat_extractor_args(config), "hop_size", "feat_extractor"),
        token_frame_rate=require_int(flow, "input_frame_rate", "flow"),
    )
    if causal:
        numbers.token_mel_ratio = require_int(flow, "token_mel_ratio", "flow")
        numbers.chunk_tokens = int(config.get("chunk_size", 25))
        numbers.pre_lookahead_len = require_int(flow, "pre_lookahead_len", "flow")
    return numbers


# --- conformer / transformer encoders -----------------------------------------------------------

ENCODERS: dict[str, type[nn.Module]] = {
    "ConformerEncoder": ConformerEncoder,
    "TransformerEncoder": TransformerEncoder,
    "UpsampleConformerEncoder": UpsampleConformerEncoder,
}

# Keys of the reference constructors that change nothing at inference.
_IGNORED_ENCODER_KEYS = {
    "dropout_rate",
    "positional_dropout_rate",
    "attention_dropout_rate",
    "use_dynamic_left_chunk",
    "gradient_checkpointing",
    "positionwise_conv_kernel_size",
    "cnn_module_kernel",
    "cnn_module_norm",
    "causal",
}

# key -> the values we honour. Everywhere in CosyVoice the Conformer runs with the macaron FFN and
# the convolution module off; other values would need code the reference has and we do not.
_SUPPORTED_ENCODER_OPTIONS = {
    "pos_enc_layer_type": ("rel_pos_espnet",),
    "selfattention_layer_type": ("rel_selfattn",),
    "normalize_before": (True,),
    "use_cnn_module": (False,),
    "macaron_style": (False,),
    "use_dynamic_chunk": (False,),
    "global_cmvn": (None,),
}


@dataclass(frozen=True)
class EncoderConfig:
    """One encoder of the yaml: its class and the keyword arguments its constructor takes."""

    kind: str  # a key of ENCODERS
    args: Mapping[str, Any] = field(default_factory=dict)

    @property
    def output_size(self) -> int:
        return self.args.get("output_size", inspect.signature(ENCODERS[self.kind]).parameters["output_size"].default)

    def build(self) -> nn.Module:
        return ENCODERS[self.kind](**self.args)


def encoder_config(node: object, where: str, *classes: str) -> EncoderConfig:
    """Read an encoder node; training-only keys are dropped, options we cannot honour raise naming the key."""
    if not isinstance(node, Node) or node.kind != "new":
        raise ConfigError(f"{where} must be a !new: encoder object")
    if node.cls not in classes:
        raise ConfigError(f"{where}: unsupported class {node.target} (expected {' or '.join(classes)})")
    accepted = constructor_keys(ENCODERS[node.cls])
    args = {}
    for key, value in node.args.items():
        if key in _SUPPORTED_ENCODER_OPTIONS:
            if value not in _SUPPORTED_ENCODER_OPTIONS[key]:
                raise ConfigError(
                    f"{where}: unsupported {key}={value!r} (supported: {_SUPPORTED_ENCODER_OPTIONS[key]})"
                )
        elif key in accepted:
            args[key] = value
        elif key not in _IGNORED_ENCODER_KEYS:
            raise ConfigError(f"{where}: unknown key '{key}'")
    for key, param in inspect.signature(ENCODERS[node.cls]).parameters.items():
        if param.default is inspect.Parameter.empty and key not in args:
            raise ConfigError(f"missing key '{where}.{key}'")
    if args.get("input_layer", "linear") not in INPUT_LAYERS:
        raise ConfigError(f"{where}: unsupported input_layer={args['input_layer']!r} (supported: {INPUT_LAYERS})")
    if args.get("activation_type", "swish") not in ACTIVATIONS:
        raise ConfigError(f"{where}: unsupported activation_type={args['activation_type']!r}")
    return EncoderConfig(node.cls, args)


def flow_encoder_config(flow: Node, input_size: int, cls: str) -> EncoderConfig:
    """The v1 / v2 flow's ``encoder``, whose input size is the flow's."""
    node = expect_class(flow.require("encoder", "flow"), (cls,), "flow.encoder")
    if node.get("input_size", input_size) != input_size:
        raise ConfigError("flow.encoder.input_size does not match flow.input_size")
    return encoder_config(Node(node.kind, node.target, {**node.args, "input_size": input_size}), "flow.encoder", cls)


def unet_args(node: Node) -> dict[str, Any]:
    """The ``ConditionalDecoder`` (U-Net estimator) arguments of an estimator node (v1, v2)."""
    return node_kwargs(
        node,
        "in_channels",
        "out_channels",
        "channels",
        "dropout",
        "attention_head_dim",
        "n_blocks",
        "num_mid_blocks",
        "num_heads",
        "act_fn",
        "causal",
        "static_chunk_size",
        "num_decoding_left_chunks",
    )


# --- samplers -----------------------------------------------------------------------------------


def sampling_args(node: object, where: str = "llm.sampling") -> dict[str, Any]:
    """The ``sampling: !name:...ras_sampling`` arguments, checked now rather than at the first request."""
    if not isinstance(node, Node):
        raise ConfigError(f"{where} must be a !name: ras_sampling entry")
    if node.cls != "ras_sampling":
        raise ConfigError(f"{where}: unsupported function {node.target} (expected ras_sampling)")
    check_known(node, {"top_p", "top_k", "win_size", "tau_r"}, where)
    with named_errors(where):
        RasSampler(**node.args)
    return dict(node.args)


def cfm_rate(node: Node) -> float:
    """The ``inference_cfg_rate`` of a ``ConditionalCFM`` / ``CausalConditionalCFM`` decoder node."""
    params = node.get("cfm_params", {})
    if isinstance(params, Node):  # an ``omegaconf.DictConfig`` node holding ``content``
        params = params.get("content", params.args)
    if not isinstance(params, dict):
        raise ConfigError(f"{node.target}: cfm_params must be a mapping")
    if params.get("solver", "euler") != "euler" or params.get("t_scheduler", "cosine") != "cosine":
        raise ConfigError(f"{node.target}: only the euler solver on the cosine schedule is supported")
    return float(params.get("inference_cfg_rate", 0.7))


# --- the HiFT vocoders --------------------------------------------------------------------------


@dataclass(frozen=True)
class HiFTConfig:
    """The yaml's ``hift``: the generator's keyword arguments and its f0 predictor's."""

    args: Mapping[str, Any]
    f0_predictor: Mapping[str, Any] = field(default_factory=dict)


def _checked_args(node: Node, cls: type) -> dict[str, Any]:
    if node.cls != cls.__name__:
        raise ConfigError(f"unsupported class {node.target} (expected {cls.__name__})")
    known = constructor_keys(cls)
    for key in node.args:
        if key not in known:
            raise ConfigError(f"{node.target}: unsupported key '{key}'")
    return dict(node.args)


def hift_config(node: Node, cls: type[nn.Module]) -> HiFTConfig:
    """Read the ``hift`` node for ``cls`` (HiFTGenerator or CausalHiFTGenerator); every key must be known."""
    args = _checked_args(node, cls)
    f0 = args.pop("f0_predictor", None)
    if f0 is not None and not isinstance(f0, Node):
        raise ConfigError(f"f0_predictor must be a {cls.f0_predictor_cls.__name__} object, got {f0!r}")
    f0_args = {} if f0 is None else _checked_args(f0, cls.f0_predictor_cls)
    istft = args.get("istft_params")
    if istft is not None and (not isinstance(istft, dict) or set(istft) != {"n_fft", "hop_len"}):
        raise ConfigError(f"hift: unsupported istft_params {istft!r} (expected n_fft and hop_len)")
    defaults = inspect.signature(cls).parameters

    def arg(key: str) -> Any:
        return args.get(key, defaults[key].default)

    for group in (
        ("upsample_rates", "upsample_kernel_sizes", "source_resblock_kernel_sizes", "source_resblock_dilation_sizes"),
        ("resblock_kernel_sizes", "resblock_dilation_sizes"),
    ):
        sizes = {key: len(arg(key)) for key in group}
        if len(set(sizes.values())) != 1:
            raise ConfigError(f"hift: these lists must have equal lengths: {sizes}")
    if arg("base_channels") % 2 ** len(arg("upsample_rates")):
        raise ConfigError(
            f"hift: base_channels {arg('base_channels')} is not divisible by 2^{len(arg('upsample_rates'))}"
        )
    if f0_args.get("num_class", 1) != 1:
        raise ConfigError(f"hift.f0_predictor: unsupported num_class {f0_args['num_class']} (only 1)")
    return HiFTConfig(args, f0_args)


def build_hift(cls: type[nn.Module], config: HiFTConfig) -> nn.Module:
    with named_errors("hift"):
        return cls(**config.args, f0_predictor=cls.f0_predictor_cls(**config.f0_predictor))


@dataclass(kw_only=True)
class StageNumbers:
    """The numbers the engine schedules a family by."""

    sample_rate: int
    hop_size: int  # waveform samples per mel frame
    token_frame_rate: int  # speech tokens per second
    token_mel_ratio: int = 0  # mel frames per token (v2/v3; v1 interpolates)
    chunk_tokens: int = 0  # streaming hop in tokens (v2/v3 flow chunk size)
    pre_lookahead_len: int = 0  # look-ahead tokens of the causal flow (v2/v3)


@dataclass(frozen=True)
class FamilyConfig:
    """A family's yaml, checked: one config per network, and the numbers the engine schedules by."""

    llm: Any  # the family's LLM config dataclass
    flow: Any  # the family's flow config dataclass
    hift: HiFTConfig
    numbers: StageNumbers


@dataclass(frozen=True, kw_only=True)
class SpeechLMConfig:
    """What every speech LLM config holds: the speech vocabulary and the yaml's sampler."""

    speech_token_size: int
    sampling: Mapping[str, Any] = field(default_factory=dict)  # RasSampler arguments
    # Before min_len mask only the id the official code masks (see Family.reference_eos_quirk), not every stop id.
    reference_eos_mask: bool = False

"""Loading the official ``*.pt`` state dicts safely and strictly."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class CheckpointError(RuntimeError):
    """A weights file is missing, unreadable, or does not fit the model built from the yaml."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)`` with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing weights file: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt files
        raise CheckpointError(f"cannot read weights file {path}: {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a state dict of tensors")
    return state


def fold_weight_norm(state: dict[str, torch.Tensor], prefix_to_strip: str = "") -> dict[str, torch.Tensor]:
    """Fold weight-normalised parameters into plain ``weight`` tensors.

    Accepts both namings the official checkpoints use: ``<m>.weight_g``/``<m>.weight_v`` and
    ``<m>.parametrizations.weight.original0``/``original1``. The norm is over every axis but 0,
    which matches torch's ``weight_norm(dim=0)`` for both Conv1d and ConvTranspose1d weights.
    """
    out: dict[str, torch.Tensor] = {}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if prefix_to_strip and key.startswith(prefix_to_strip):
            key = key[len(prefix_to_strip) :]
        for g_name, v_name in (
            ("weight_g", "weight_v"),
            ("parametrizations.weight.original0", "parametrizations.weight.original1"),
        ):
            if key.endswith("." + g_name):
                pairs.setdefault(key[: -len(g_name)] + "weight", {})["g"] = value
                break
            if key.endswith("." + v_name):
                pairs.setdefault(key[: -len(v_name)] + "weight", {})["v"] = value
                break
        else:
            out[key] = value
    for name, gv in pairs.items():
        if set(gv) != {"g", "v"}:
            raise CheckpointError(f"incomplete weight-norm pair for {name}")
        v = gv["v"].float()
        norm = v.norm(p=2, dim=tuple(range(1, v.dim())), keepdim=True)
        out[name] = gv["g"] * v / norm
    return out


def load_into(module: nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """Strict ``load_state_dict`` whose error names the file and the offending keys."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not fit the model described by the yaml: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for key, value in state.items():
        if tuple(expected[key].shape) != tuple(value.shape):
            raise CheckpointError(
                f"{source}: '{key}' has shape {tuple(value.shape)}, the yaml implies {tuple(expected[key].shape)}"
            )
    # Strided views (the tiny golden checkpoints share storage) must be made contiguous.
    module.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=True)


def read_vocoder_state(path: str | Path) -> dict[str, torch.Tensor]:
    """``hift.pt`` with weight norm folded and the optional ``generator.`` prefix stripped (spec §13.1)."""
    return fold_weight_norm(read_state_dict(path), prefix_to_strip="generator.")

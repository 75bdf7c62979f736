"""Read the official ``cosyvoice*.yaml`` files without executing anything named in them.

The official files are HyperPyYAML: ``!new:`` / ``!name:`` / ``!apply:`` tags name Python
objects to import and call. We parse those tags into inert :class:`Node` records, resolve
``!ref`` substitutions ourselves, and let each model family read its numbers from the records
(``cosyserve/models/<family>/config.py``). Nothing is imported or called based on the file's contents.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """The model configuration is unreadable, unknown or inconsistent."""


@dataclass
class Node:
    """A tagged yaml object: ``!new:target`` (kind 'new') or ``!name:target`` (kind 'name')."""

    kind: str
    target: str
    args: dict[str, Any] = field(default_factory=dict)

    @property
    def cls(self) -> str:
        """The last component of the dotted target, e.g. ``TransformerLM``."""
        return self.target.rsplit(".", 1)[-1]

    def get(self, key: str, default: Any = None) -> Any:
        return self.args.get(key, default)

    def require(self, key: str, path: str = "") -> Any:
        if key not in self.args:
            raise ConfigError(f"missing key '{path + '.' if path else ''}{key}' in {self.target}")
        return self.args[key]


@dataclass
class _Ref:
    expr: str


@dataclass
class _Apply:
    target: str


_REF_NAME = re.compile(r"<([^<>]+)>")


class _Loader(yaml.SafeLoader):
    """SafeLoader that turns HyperPyYAML tags into inert records."""


def _construct_tagged(kind: str):
    def construct(loader: _Loader, suffix: str, node: yaml.Node) -> Any:
        if isinstance(node, yaml.MappingNode):
            args = loader.construct_mapping(node, deep=True)
        elif isinstance(node, yaml.SequenceNode):
            args = {"__args__": loader.construct_sequence(node, deep=True)}
        else:
            value = loader.construct_scalar(node)
            args = {} if value in ("", None) else {"__args__": [value]}
        if kind == "apply":
            return _Apply(suffix)
        return Node(kind, suffix, dict(args))

    return construct


def _construct_ref(loader: _Loader, node: yaml.Node) -> _Ref:
    return _Ref(str(loader.construct_scalar(node)))


_Loader.add_multi_constructor("!new:", _construct_tagged("new"))
_Loader.add_multi_constructor("!name:", _construct_tagged("name"))
_Loader.add_multi_constructor("!apply:", _construct_tagged("apply"))
_Loader.add_constructor("!ref", _construct_ref)


def _resolve(value: Any, top: dict[str, Any], resolving: tuple[str, ...]) -> Any:
    if isinstance(value, _Ref):
        return _resolve_ref(value.expr, top, resolving)
    if isinstance(value, Node):
        value.args = {k: _resolve(v, top, resolving) for k, v in value.args.items()}
        return value
    if isinstance(value, dict):
        return {k: _resolve(v, top, resolving) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, top, resolving) for v in value]
    return value


def _resolve_ref(expr: str, top: dict[str, Any], resolving: tuple[str, ...]) -> Any:
    names = _REF_NAME.findall(expr)
    if not names:
        raise ConfigError(f"malformed !ref '{expr}'")

    def lookup(name: str) -> Any:
        key = name.split("[", 1)[0]
        if key not in top:
            raise ConfigError(f"!ref to unknown key '{key}'")
        if key in resolving:
            raise ConfigError(f"circular !ref through '{key}'")
        top[key] = _resolve(top[key], top, (*resolving, key))
        return top[key]

    if _REF_NAME.fullmatch(expr.strip()):
        return lookup(names[0])
    # The official files use one arithmetic form: "<a> * <b>".
    parts = [p.strip() for p in expr.split("*")]
    if len(parts) == 2 and all(_REF_NAME.fullmatch(p) for p in parts):
        a, b = (lookup(_REF_NAME.fullmatch(p).group(1)) for p in parts)
        if not all(isinstance(v, (int, float)) for v in (a, b)):
            raise ConfigError(f"!ref '{expr}' multiplies non-numbers")
        return a * b
    raise ConfigError(f"unsupported !ref expression '{expr}'")


def parse_yaml(text: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Parse HyperPyYAML text into plain values and :class:`Node` records, refs resolved."""
    try:
        raw = yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no object construction
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid yaml: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError("the model yaml must be a mapping at the top level")
    top = {k: v for k, v in raw.items() if not str(k).startswith("__")}
    top.update(overrides or {})
    for key in list(top):
        top[key] = _resolve(top[key], top, (key,))
    return top


def load_yaml(path: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read and parse a model yaml; errors name the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    try:
        return parse_yaml(text, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{path.name}: {exc}") from exc

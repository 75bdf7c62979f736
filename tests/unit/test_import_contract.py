"""The import contract: imports flow one way, and no module imports itself back through others.

Layers, top to bottom: ``cli`` > ``deploy``, ``bench`` > ``api`` > ``settings`` > ``engine`` > ``models`` >
``nn``. The frontends (``audio``, ``text``, ``frontend``) stand beside the engine: any layer from
``models`` up may import them, and they import nothing above them (nothing of ``settings``, ``engine``,
``api``, ``cli``...). ``hub`` (model and asset resolution) serves the frontends and everything above.
The leaves (``families``, ``precision``, ``errors``, ``config``, ``work_units``, the package itself) any
module may import. Every import counts: at module level, inside functions and under TYPE_CHECKING.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "cosyserve"

LEAVES = frozenset(
    {"cosyserve", "cosyserve.families", "cosyserve.precision", "cosyserve.errors", "cosyserve.config"}
    | {"cosyserve.work_units"}
)
# Layer of each top-level part; a module may import its own layer and those below it.
RANKS = {
    "cli": 8,
    "__main__": 8,
    "deploy": 7,
    "bench": 7,
    "bench_mixed": 7,
    "synth_file": 7,
    "api": 6,
    "settings": 5,
    "engine": 4,
    "models": 3,
    "nn": 2,
    "audio": 1,
    "text": 1,
    "frontend": 1,
    "hub": 0,
}
FRONTENDS = frozenset({"audio", "text", "frontend"})


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(name: str, known: dict[str, Path]) -> Iterator[tuple[str, int]]:
    """(cosyserve module imported, line) for every import statement of module ``name`` (of ``known``)."""
    path = known[name]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(name, path.name == "__init__.py", node)
            # "from pkg import mod" imports the submodule; "from mod import name" the module
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # "import cosyserve.engine.client as x" -> that module
                target = target.rpartition(".")[0]
            if target.startswith("cosyserve") and target != name:
                yield target, node.lineno


def part(module: str) -> str:
    """The top-level part of the package a module belongs to (``cosyserve.engine.core`` -> ``engine``)."""
    return module.split(".")[1] if "." in module else ""


def violations(known: dict[str, Path]) -> list[str]:
    found = []
    for name in known:
        if name in LEAVES:
            continue
        own = part(name)
        assert own in RANKS, f"{name}: put its part '{own}' in the import contract (RANKS)"
        for target, line in imports_of(name, known):
            if target in LEAVES or part(target) == own:
                continue
            theirs = part(target)
            where = f"{known[name].name}:{line}: {name} imports {target}"
            if own in FRONTENDS and theirs not in FRONTENDS | {"hub"}:
                found.append(f"{where} (a frontend imports only frontends, hub and the leaves)")
            elif RANKS[theirs] > RANKS[own]:
                found.append(f"{where} ({own} is below {theirs})")
    return found


def cycles(known: dict[str, Path]) -> list[list[str]]:
    """The import circles among cosyserve modules (each one found once), any import counted."""
    graph = {name: sorted({t for t, _ in imports_of(name, known)}) for name in known}
    found, done = [], set()
    for start in graph:
        stack, on_path = [(start, iter(graph[start]))], [start]
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                on_path.pop()
                done.add(node)
            elif child in on_path:
                circle = on_path[on_path.index(child) :]
                if min(circle) == circle[0]:  # one report per circle, from its smallest module
                    found.append([*circle, child])
            elif child not in done:
                stack.append((child, iter(graph[child])))
                on_path.append(child)
    return found


def test_imports_flow_down_the_layers() -> None:
    found = violations(modules())
    assert not found, "\n".join(found)


def test_there_are_no_import_circles() -> None:
    found = cycles(modules())
    assert not found, "\n".join(" -> ".join(c) for c in found)


@pytest.mark.parametrize(
    ("source", "importer", "expected"),
    [
        ("from cosyserve.api.deps import ServerState\n", "cosyserve.engine.fake", "engine is below api"),
        ("from cosyserve.settings import Settings\n", "cosyserve.audio.fake", "a frontend imports only"),
        ("from ..engine import client\n", "cosyserve.text.fake", "a frontend imports only"),
        ("def f():\n    import cosyserve.cli\n", "cosyserve.models.fake", "models is below cli"),
    ],
)
def test_an_upward_import_breaks_the_contract(tmp_path: Path, source: str, importer: str, expected: str) -> None:
    fake = tmp_path / "fake.py"
    fake.write_text(source, encoding="utf-8")
    found = [v for v in violations({**modules(), importer: fake}) if importer in v]
    assert len(found) == 1 and expected in found[0], found


def test_a_circle_breaks_the_contract(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("from cosyserve.engine import fake_b\n", encoding="utf-8")
    (tmp_path / "b.py").write_text("from . import fake_a\n", encoding="utf-8")
    known = {**modules(), "cosyserve.engine.fake_a": tmp_path / "a.py", "cosyserve.engine.fake_b": tmp_path / "b.py"}
    assert cycles(known) == [["cosyserve.engine.fake_a", "cosyserve.engine.fake_b", "cosyserve.engine.fake_a"]]

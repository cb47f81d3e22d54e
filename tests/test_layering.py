"""Data flows one way (docs: ARCHITECTURE.md): a module imports only from the layers below it.

The table is the rule. A new module (or subpackage) gets one entry in ``LAYERS``; ``PEERS``
lists the few allowed imports inside one layer and ``ONLY`` narrows a module to an allow-list.
Imports are read with ``ast`` (nothing is imported), including those inside functions and
``TYPE_CHECKING`` blocks: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import gapcam

SRC = Path(__file__).resolve().parents[1] / "src" / "gapcam"

#: top-level module or subpackage of gapcam -> layer (lower layers know nothing of higher ones).
#: Layers are spaced by 10 so that a module can slot in between (e.g. 35) without renumbering.
LAYERS: dict[str, int] = {
    # 0: vocabulary
    "_version": 0,
    "errors": 0,
    "types": 0,
    "cache": 0,
    # 10: the engine parts; each knows only the vocabulary
    "images": 10,
    "cam": 10,
    "boxes": 10,
    "overlay": 10,
    "plots": 10,
    "models": 10,
    "pipeline": 10,  # generic bounded thread stages; knows only the errors
    # 15: evaluation parts over the engine parts (pure numpy metrics; annotation readers)
    "metrics": 15,
    "datasets": 15,
    "backends": 15,  # who runs GapModel.features: eager PyTorch or ONNX Runtime
    # 20: pipelines over the parts
    "explain": 20,
    "feature_cache": 20,
    "train_data": 20,
    # 30: writing results; the training loop
    "export": 30,
    "train_loop": 30,
    "finetune": 35,
    "train_output": 38,  # writes a training run; `train` drives it
    # 40: front ends and tools
    "run": 40,
    "summary": 40,
    "evaluate": 40,
    "evaluate_report": 45,  # the `gapcam evaluate` job: table, JSON, plot over `evaluate`
    "web": 40,
    "train": 40,
    "batch": 40,
    "ray_engine": 40,  # `gapcam localize --engine ray`: the same pipeline on Ray Data
    "synthetic": 40,
    # 50: the command line dispatches to any of them
    "cli": 50,
    "__main__": 60,
}

#: allowed imports between modules of the same layer
PEERS: dict[str, set[str]] = {
    "models": {"cam"},  # GapModel.logits is cam.logits_from_features
}

#: modules narrowed to an explicit allow-list (on top of the layer rule)
ONLY: dict[str, set[str]] = {
    "errors": set(),
    "types": set(),
    "_version": set(),
    "cache": set(),
    "boxes": {"types"},
    "overlay": {"types"},
}

FACADE = "gapcam (the package facade)"


def _unit_of(path: Path) -> str:
    return path.relative_to(SRC).with_suffix("").parts[0]


def _sources() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if p != SRC / "__init__.py")


def _dotted(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["gapcam", *parts])


def _imported(path: Path) -> set[str]:
    """Dotted names of everything in gapcam that ``path`` imports (``gapcam.x.y``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = _dotted(path) if path.name == "__init__.py" else _dotted(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "gapcam")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            if base.split(".")[0] != "gapcam":
                continue
            if base == "gapcam":
                found.update(f"gapcam.{a.name}" for a in node.names)
            else:
                found.add(base)
    return found


def _target_unit(dotted: str) -> str:
    """The gapcam unit a dotted import lands in: a submodule, or where a public name lives."""
    parts = dotted.split(".")
    if len(parts) == 1:
        return FACADE
    name = parts[1]
    if (SRC / f"{name}.py").is_file() or (SRC / name).is_dir():
        return name
    if name == "__version__":
        return "_version"
    location = gapcam._LOCATIONS.get(name)
    return location.split(".")[1] if location else FACADE


def _violations(unit: str, targets: set[str]) -> list[str]:
    layer = LAYERS[unit]
    problems = []
    for target in sorted(targets - {unit}):
        if target == FACADE:
            problems.append("imports the package facade; import from the module instead")
        elif target not in LAYERS:
            problems.append(f"imports {target}, which has no entry in LAYERS")
        elif unit in ONLY and target not in ONLY[unit]:
            problems.append(f"imports {target}; {unit} may import only {sorted(ONLY[unit])}")
        elif LAYERS[target] > layer or (
            LAYERS[target] == layer and target not in PEERS.get(unit, set())
        ):
            problems.append(
                f"imports {target} (layer {LAYERS[target]}) from layer {layer}: data flows one "
                "way; move the shared code down a layer"
            )
    return problems


def test_every_module_has_a_layer() -> None:
    missing = sorted({_unit_of(p) for p in _sources()} - set(LAYERS))
    assert not missing, (
        f"gapcam modules without a layer: {missing}; add each to LAYERS in tests/test_layering.py "
        "(the lowest layer whose modules it imports, plus one)"
    )


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(SRC)))
def test_imports_follow_the_layers(path: Path) -> None:
    unit = _unit_of(path)
    if unit not in LAYERS:
        pytest.fail(f"{unit} has no entry in LAYERS in tests/test_layering.py; add it")
    targets = {_target_unit(name) for name in _imported(path)}
    problems = _violations(unit, targets)
    assert not problems, f"{path.relative_to(SRC)} ({unit}): " + "; ".join(problems)


@pytest.mark.parametrize(
    ("unit", "banned"),
    [
        ("errors", {"types", "images", "models"}),
        ("types", {"errors", "cam"}),
        ("images", {"models", "cam", "explain", "cli"}),
        ("cam", {"models", "images", "explain"}),
        ("boxes", {"errors", "cam", "images"}),
        ("overlay", {"errors", "boxes", "cam"}),
        ("explain", {"cli", "run", "export"}),
        ("models", {"explain", "cli", "images"}),
    ],
)
def test_the_table_encodes_the_documented_rules(unit: str, banned: set[str]) -> None:
    for target in banned:
        assert _violations(unit, {target}), f"the table would let {unit} import {target}"


def test_the_checker_sees_every_kind_of_import(tmp_path: Path) -> None:
    """Guard the checker itself: absolute, from-package, relative and function-level imports."""
    assert _target_unit("gapcam.models.base") == "models"
    assert _target_unit("gapcam.Localizer") == "explain"
    assert _target_unit("gapcam.__version__") == "_version"
    assert _target_unit("gapcam") == FACADE
    found = _imported(SRC / "explain.py")
    assert {"gapcam.cam", "gapcam.images", "gapcam.boxes", "gapcam.models"} <= found
    lazy = _imported(SRC / "models" / "base.py")
    assert "gapcam.cam" in lazy  # imported inside GapModel.logits
    assert _violations("images", {"explain"})
    assert not _violations("explain", {"images"})

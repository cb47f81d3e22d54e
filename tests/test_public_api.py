"""The public surface: ``import gapcam`` is cheap; ``__all__`` is complete, resolves, and each name
is looked up where it is defined."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from importlib import import_module
from pathlib import Path

import pytest

import gapcam
from gapcam import errors

INIT = Path(gapcam.__file__)


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )


def test_import_gapcam_does_not_import_torch() -> None:
    done = _run(
        "import sys, gapcam, gapcam.errors, gapcam.types\n"
        "heavy = sorted({'torch', 'torchvision', 'timm', 'numpy', 'PIL'} & set(sys.modules))\n"
        "assert not heavy, heavy\n"
        "print(gapcam.__version__)"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == gapcam.__version__


def test_a_public_name_loads_its_module_on_first_use() -> None:
    done = _run(
        "import sys, gapcam\n"
        "assert 'gapcam.boxes' not in sys.modules\n"
        "gapcam.box_iou\n"
        "assert 'gapcam.boxes' in sys.modules and 'torch' not in sys.modules\n"
    )
    assert done.returncode == 0, done.stderr


def test_each_location_is_where_the_name_is_defined() -> None:
    """``_LOCATIONS`` names the module that defines each name, or the package that re-exports
    it from one of its own modules (``gapcam.models`` for ``gapcam.models.base.GapModel``)."""
    wrong = []
    for name, location in gapcam._LOCATIONS.items():
        value = getattr(import_module(location), name)
        defined = value.__module__
        if value.__name__ != name or getattr(import_module(defined), name) is not value:
            wrong.append(f"{name}: defined as {defined}.{value.__name__}")
        elif defined != location and not defined.startswith(f"{location}."):
            wrong.append(f"{name}: listed in {location}, defined in {defined}")
    assert wrong == []


@pytest.mark.parametrize("name", gapcam.__all__)
def test_every_exported_name_resolves(name: str) -> None:
    value = getattr(gapcam, name)
    assert value is not None
    if name != "__version__":
        module = gapcam._LOCATIONS[name]
        assert getattr(sys.modules[module], name) is value


def test_all_matches_the_static_imports() -> None:
    """The TYPE_CHECKING block (what type checkers and IDEs see) lists exactly ``__all__``."""
    tree = ast.parse(INIT.read_text(encoding="utf-8"))
    static: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for statement in node.body:
                assert isinstance(statement, ast.ImportFrom)
                static.update({a.asname or a.name: statement.module for a in statement.names})
    assert set(static) | {"__version__"} == set(gapcam.__all__)
    for name, module in static.items():
        assert gapcam._LOCATIONS[name] == module, name


def test_every_error_is_exported() -> None:
    classes = {
        name
        for name, value in vars(errors).items()
        if inspect.isclass(value) and issubclass(value, errors.GapcamError)
    }
    missing = sorted(classes - set(gapcam.__all__))
    assert not missing, f"exceptions missing from gapcam.__all__: {missing}"
    for name in classes:
        assert issubclass(getattr(gapcam, name), gapcam.GapcamError)


def test_dir_and_unknown_names() -> None:
    assert set(gapcam.__all__) <= set(dir(gapcam))
    with pytest.raises(AttributeError, match="no attribute 'Localiser'"):
        _ = gapcam.Localiser

"""Read local weight files safely: safetensors, or ``torch.load(weights_only=True)``.

Nothing is ever unpickled: a file that needs arbitrary pickles is refused with a message.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from gapcam.errors import ModelError

#: safetensors' names of the dtypes it stores (``tensor_header`` reports these)
DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})

Header = dict[str, tuple[str, tuple[int, ...]]]


def tensor_header(path: str | Path, label: str) -> Header:
    """Name -> (dtype, shape) of a safetensors file, from its header alone: nothing is loaded,
    so what the file claims can be checked before memory is given to it. safetensors refuses a
    header over 100 MB and one whose tensors do not exactly cover the rest of the file.
    ``label`` starts the error message (``checkpoint='run'``)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return {
                name: (
                    handle.get_slice(name).get_dtype(),
                    tuple(handle.get_slice(name).get_shape()),
                )
                for name in handle.keys()  # noqa: SIM118 (a safetensors handle, not a dict)
            }
    except (SafetensorError, OSError, ValueError) as exc:
        name = Path(path).name
        raise ModelError(f"{label}: {name} is not a readable safetensors file ({exc})") from exc


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict from ``path`` (.safetensors, or a torch file) onto the CPU.

    A checkpoint dict that wraps the state dict under ``state_dict`` or ``model`` is unwrapped,
    and a ``module.`` prefix (from DataParallel) is removed.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(
            f"weights={str(path)!r}: no such file; give a .safetensors or .pth state dict"
        )
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            loaded: object = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelError(
                f"weights={str(path)!r}: not a valid safetensors file ({exc})"
            ) from exc
    else:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle.UnpicklingError, RuntimeError, EOFError, KeyError, ...
            raise ModelError(
                f"weights={str(path)!r}: {_torch_load_problem(exc)}; save a plain state dict "
                "(torch.save(model.state_dict(), ...)) or safetensors"
            ) from exc
    return _unwrap(loaded, path)


def _torch_load_problem(exc: Exception) -> str:
    """One short reason for a failed weights-only ``torch.load`` (torch's own text is long and
    advises ``weights_only=False`` or allow-listing globals, which gapcam never does)."""
    text = str(exc).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines and lines[0].startswith("Weights only load failed"):
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found:
            return (
                f"it holds pickled Python objects besides tensors ({found.group(1)}); refused, "
                "gapcam never unpickles them (that could run code)"
            )
        detail = [line for line in lines[1:] if not line.startswith(("Please", "Check the"))]
        return f"not a torch weights file ({detail[-1][:120] if detail else 'unreadable'})"
    if isinstance(exc, KeyError) or not lines:  # torch's legacy reader on non-torch bytes
        return "not a torch weights file"
    return f"cannot load it as a weights-only torch file ({lines[0][:200]})"


def _unwrap(loaded: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(loaded, Mapping):
        for key in ("state_dict", "model"):
            inner = loaded.get(key)
            if isinstance(inner, Mapping):
                loaded = inner
                break
    if not isinstance(loaded, Mapping) or not loaded:
        raise ModelError(
            f"weights={str(path)!r}: holds no state dict (a mapping of names to tensors)"
        )
    state = {}
    for key, value in loaded.items():
        if not isinstance(value, torch.Tensor):
            raise ModelError(f"weights={str(path)!r}: entry {key!r} is not a tensor")
        state[key.removeprefix("module.")] = value
    return state


def with_metadata(module: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> Any:
    """``tensors`` as a state dict carrying the module's own version metadata (unless it has
    its own): a plain dict (safetensors, an unwrapped checkpoint) has none, and some modules
    (torchvision's MNASNet) refuse to load without it."""
    state: Any = OrderedDict(tensors)
    own = getattr(tensors, "_metadata", None)
    state._metadata = own if own is not None else getattr(module.state_dict(), "_metadata", None)
    return state


def load_tensors(module: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """``load_state_dict(tensors, strict=False)`` with version metadata (``with_metadata``)."""
    module.load_state_dict(with_metadata(module, tensors), strict=False)


def load_into(module: torch.nn.Module, state: Mapping[str, torch.Tensor], label: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line error naming what does not match."""
    try:
        module.load_state_dict(with_metadata(module, state), strict=True)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = " ".join(lines[1:3]) if len(lines) > 1 else lines[0]
        raise ModelError(
            f"{label}: the weights do not fit this architecture ({detail[:300]}); "
            "check that model= matches the network the weights were saved from"
        ) from exc

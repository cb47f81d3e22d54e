"""Fine-tuned heads as run folders: ``model.safetensors`` + ``gapcam.json``. Nothing is pickled.

``model.safetensors`` holds ``head.weight`` / ``head.bias`` (the new classifier) and, when part
of the backbone was trained too, those tensors under ``backbone.<name>``. ``gapcam.json`` holds
the backbone's name and weights, the class names, the preprocessing, metrics and the version.
A run loads with ``load_checkpoint(run)``: build the backbone, swap in the head, load tensors.
``gapcam.train`` writes runs (``checkpoint_files`` gives the bytes; no I/O in this module
besides reading).

A run folder may come from anyone, so it is checked before memory is given to what it claims:
``gapcam.json`` is read only up to ``MAX_METADATA_BYTES`` and checked field by field (types,
ranges, at most ``MAX_CLASSES`` class names of at most ``MAX_CLASS_NAME`` characters, none
with a control character: such a name would break a terminal line or an overlay caption, so it
is refused, never rewritten), then the tensors' shapes are read from the safetensors header
and compared with it and with the backbone; only then are the head built and the tensors read.
The same class-name rule holds when a run is written (``checkpoint_files``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import reprlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from gapcam.console import safe_text
from gapcam.errors import ModelError
from gapcam.models.base import GapModel
from gapcam.models.weights import Header, load_tensors, tensor_header
from gapcam.types import RESIZE_MODES, Preprocess

FORMAT = "gapcam.checkpoint/1"
TENSORS = "model.safetensors"
METADATA = "gapcam.json"

#: the largest gapcam.json read (a run of 2000 classes writes about 45 MB: its confusion matrix)
MAX_METADATA_BYTES = 64 * 1024 * 1024
#: the most class names a run may have, and the longest name (any folder name fits)
MAX_CLASSES, MAX_CLASS_NAME = 100_000, 255
#: the longest backbone name, and the largest input side a run's preprocessing may ask for
MAX_BACKBONE_NAME, MAX_INPUT_SIDE = 200, 4096
#: the resampling filters ``gapcam.images`` knows (its ``_INTERPOLATION``)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")
_SHA256 = re.compile("[0-9a-f]{64}")
_REPR = reprlib.Repr()  # a value from the file, shown short (long strings and lists cut)
_REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict = 60, 60, 6, 4


def replace_classifier(model: GapModel, class_names: Sequence[str]) -> GapModel:
    """A GapModel whose classifier is a new layer with one output per name (set in place in
    ``model.module``, which the caller owns)."""
    old = model.classifier
    if model.head == "linear":
        new: nn.Module = nn.Linear(model.num_features, len(class_names))
    else:
        new = nn.Conv2d(model.num_features, len(class_names), kernel_size=1)
    new = new.to(device=model.device, dtype=model.weight.dtype)
    parent, attribute = _locate(model.module, old)
    setattr(parent, attribute, new)
    return dataclasses.replace(model, classifier=new, class_names=tuple(class_names), aliases=())


def _locate(root: nn.Module, target: nn.Module) -> tuple[nn.Module, str]:
    for module in root.modules():
        for child_name, child in module.named_children():
            if child is target:
                return module, child_name
    raise ModelError(f"{type(root).__name__}: its classifier is not a submodule; cannot replace it")


def class_name_problem(name: object) -> str | None:
    """Why ``name`` cannot be a class name (a string of 1 to ``MAX_CLASS_NAME`` characters, not
    blank, without control characters), or None when it can."""
    if not isinstance(name, str):
        return f"is a {type(name).__name__}, not a string"
    if not name.strip():
        return "is empty"
    if len(name) > MAX_CLASS_NAME:
        return f"is {len(name)} characters long, over the limit of {MAX_CLASS_NAME}"
    if safe_text(name, limit=len(name)) != name:
        return "has control characters"
    return None


def check_class_names(names: object, label: str) -> tuple[str, ...]:
    """``names`` as a tuple, when it is a list of 1 to ``MAX_CLASSES`` valid class names;
    else a one-line ModelError starting with ``label``."""
    if not isinstance(names, (list, tuple)):
        raise ModelError(f"{label}: class_names is a {type(names).__name__}, not a list of names")
    if not names:
        raise ModelError(f"{label}: class_names is empty; a classifier needs classes")
    if len(names) > MAX_CLASSES:
        raise ModelError(f"{label}: {len(names):,} class names, over the limit of {MAX_CLASSES:,}")
    for index, name in enumerate(names):
        problem = class_name_problem(name)
        if problem is not None:
            raise ModelError(f"{label}: class name {index} {_shown(name)} {problem}")
    return tuple(names)


def trained_tensors(model: GapModel, backbone_names: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """The tensors a run saves: the head, plus the named backbone parameters/buffers."""
    tensors: dict[str, torch.Tensor] = {"head.weight": cast(torch.Tensor, model.classifier.weight)}
    bias = getattr(model.classifier, "bias", None)
    if bias is not None:
        tensors["head.bias"] = bias
    state = model.module.state_dict()
    for name in backbone_names:
        tensors[f"backbone.{name}"] = state[name]
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def checkpoint_files(
    tensors: Mapping[str, torch.Tensor], metadata: dict[str, Any]
) -> dict[str, bytes]:
    """The bytes of ``model.safetensors`` and ``gapcam.json`` for a run (no I/O here).

    ``gapcam.json`` records the sha256 of ``model.safetensors``, so a mismatched pair (a run
    folder changed or copied in part) is detected when loading. Write both together, each to a
    temporary name first and then renamed (``gapcam.outputs.atomic_write_all``), so that a full
    disk leaves the previous run intact.
    """
    import hashlib

    from safetensors.torch import save

    from gapcam._version import __version__

    names = check_class_names(metadata.get("class_names"), "checkpoint")
    head = tensors.get("head.weight")
    if head is None or head.shape[0] != len(names):
        found = None if head is None else tuple(head.shape)
        raise ModelError(f"checkpoint: head.weight is {found}, for {len(names)} class names")
    data = save({k: v.contiguous() for k, v in tensors.items()})
    document = {"format": FORMAT, "gapcam_version": __version__, **metadata}
    document["tensors_sha256"] = hashlib.sha256(data).hexdigest()
    text = (json.dumps(document, indent=2) + "\n").encode()
    if len(text) > MAX_METADATA_BYTES:
        raise ModelError(
            f"checkpoint: {METADATA} would be {len(text):,} bytes, over the {MAX_METADATA_BYTES:,} "
            f"a run may have ({len(names):,} classes); train fewer classes per run"
        )
    return {TENSORS: data, METADATA: text}


def _label(run: Path) -> str:
    return f"checkpoint={safe_text(repr(str(run)))}"


def read_metadata(run: Path) -> dict[str, Any]:
    """``gapcam.json`` of the run folder ``run``, checked (see the module docstring)."""
    label = _label(Path(run))
    path = Path(run) / METADATA
    if not Path(run).is_dir():
        what = "is a file, not a folder" if Path(run).exists() else "no such folder"
        raise ModelError(f"{label}: {what}; give a folder made by `gapcam train`")
    if not path.is_file():
        raise ModelError(f"{label}: no {METADATA} in it; give a folder made by `gapcam train`")
    try:
        with path.open("rb") as stream:
            data = stream.read(MAX_METADATA_BYTES + 1)
    except OSError as exc:
        raise ModelError(f"{label}: cannot read {METADATA} ({exc.strerror or exc})") from exc
    if len(data) > MAX_METADATA_BYTES:
        raise ModelError(
            f"{label}: {METADATA} is over {MAX_METADATA_BYTES:,} bytes; not a gapcam run"
        )
    try:
        document = json.loads(data.decode("utf-8"))
    except RecursionError as exc:
        raise ModelError(f"{label}: {METADATA} is nested too deeply; not a gapcam run") from exc
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError too
        reason = safe_text(exc, limit=120)
        raise ModelError(f"{label}: {METADATA} is not valid JSON ({reason})") from exc
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ModelError(f"{label}: {METADATA} is not a {FORMAT} file")
    for key in ("backbone", "class_names"):
        if key not in document:
            raise ModelError(f"{label}: {METADATA} has no {key!r}")
    _check_document(document, label)
    return document


def _check_document(document: dict[str, Any], label: str) -> None:
    """The fields ``load_checkpoint`` uses: each of the right type and in range."""
    where = f"{label}: {METADATA}"
    backbone = document["backbone"]
    if not isinstance(backbone, str) or not backbone.strip():
        raise ModelError(f"{where}: backbone is {_shown(backbone)}, not a model name")
    if len(backbone) > MAX_BACKBONE_NAME or safe_text(backbone, limit=len(backbone)) != backbone:
        raise ModelError(f"{where}: backbone {_shown(backbone)} is not a model name")
    weights = document.get("backbone_weights")
    if weights is not None and (not isinstance(weights, str) or not weights or "\x00" in weights):
        raise ModelError(f"{where}: backbone_weights is {_shown(weights)}, not a file path")
    check_class_names(document["class_names"], where)
    digest = document.get("tensors_sha256")
    if digest is not None and not (isinstance(digest, str) and _SHA256.fullmatch(digest)):
        raise ModelError(f"{where}: tensors_sha256 is {_shown(digest)}, not a sha256 digest")
    preprocess = document.get("preprocess")
    if preprocess is not None:
        _preprocess(preprocess, where)


def _shown(value: object) -> str:
    """A value from the file, short and printable (``repr`` escapes control characters), for
    an error message."""
    return safe_text(_REPR.repr(value), limit=80)


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _preprocess(value: object, where: str) -> dict[str, Any]:
    """The ``preprocess`` object as ``Preprocess.replace`` keywords (unknown keys left out)."""
    if not isinstance(value, dict):
        raise ModelError(f"{where}: preprocess is {_shown(value)}, not an object")
    clean: dict[str, Any] = {}
    fields = {f.name for f in dataclasses.fields(Preprocess)}
    for key, item in value.items():
        if key not in fields:
            continue
        if key == "size":
            valid = (
                isinstance(item, list)
                and len(item) == 2
                and all(isinstance(side, int) and not isinstance(side, bool) for side in item)
                and all(8 <= side <= MAX_INPUT_SIDE for side in item)
            )
            wanted = f"[height, width], each 8 to {MAX_INPUT_SIDE} pixels"
        elif key in ("mean", "std"):
            valid = (
                isinstance(item, list)
                and len(item) == 3
                and all(_number(v) for v in item)
                and (key == "mean" or all(v > 0 for v in item))
            )
            wanted = "3 finite numbers" + (", each above 0" if key == "std" else "")
        else:
            choices = RESIZE_MODES if key == "resize" else INTERPOLATIONS
            valid = item in choices
            wanted = f"one of {', '.join(choices)}"
        if not valid:
            raise ModelError(f"{where}: preprocess.{key} is {_shown(item)}; expected {wanted}")
        clean[key] = tuple(item) if isinstance(item, list) else item
    return clean


def load_checkpoint(run: str | Path) -> GapModel:
    """The GapModel of a training run folder (backbone + trained head and tensors).

    Nothing a file claims is allocated before it is checked: ``gapcam.json`` (see the module
    docstring), then the tensors' shapes from the safetensors header against the class names
    and the backbone; then the head is built and the tensors are read."""
    from gapcam.models.registry import build_model

    run = Path(run)
    label = _label(run)
    meta = read_metadata(run)
    header = tensor_header(run / TENSORS, label)
    names = tuple(meta["class_names"])
    _check_head_rows(header, len(names), label)
    model = build_model(meta["backbone"], meta.get("backbone_weights"))
    _check_header(model, header, len(names), label)
    model = replace_classifier(model, names)
    tensors = _read_tensors(run, meta.get("tensors_sha256"))
    _load_head(model, tensors, run)
    backbone = {
        k.removeprefix("backbone."): v for k, v in tensors.items() if k.startswith("backbone.")
    }
    if backbone:
        _load_backbone(model, backbone, run)
    preprocess = meta.get("preprocess")
    if preprocess is not None:
        model.preprocess = model.preprocess.replace(**_preprocess(preprocess, label))
    model.name = f"{meta['backbone']}+{safe_text(run.name)}"
    model.source = "checkpoint"
    return model


def _check_head_rows(header: Header, classes: int, label: str) -> None:
    """head.weight / head.bias have one row per class name (before the head is allocated)."""
    for key in ("head.weight", "head.bias"):
        found = header.get(key)
        if found is None and key == "head.bias":
            continue
        shape = None if found is None else found[1]
        if shape is None or not shape or shape[0] != classes:
            raise ModelError(
                f"{label}: {key} is {shape}, but {METADATA} names {classes:,} classes; "
                f"{TENSORS} does not match {METADATA}"
            )


def _check_header(model: GapModel, header: Header, classes: int, label: str) -> None:
    """Every tensor of the header is one the model has, of the model's shape: then reading the
    file costs no more memory than the model itself."""
    width = model.num_features
    head = (classes, width) if model.head == "linear" else (classes, width, 1, 1)
    expected: dict[str, tuple[int, ...]] = {"head.weight": head, "head.bias": (classes,)}
    state = model.module.state_dict()
    for name, (_, shape) in header.items():
        if name.startswith("backbone."):
            own = state.get(name.removeprefix("backbone."))
            wanted = None if own is None else tuple(own.shape)
        else:
            wanted = expected.get(name)
        if wanted is None:
            raise ModelError(
                f"{label}: {TENSORS} holds {_shown(name)}, which the backbone "
                f"{model.name} has not; {TENSORS} does not match {METADATA}"
            )
        if shape != wanted:
            raise ModelError(
                f"{label}: {name} is {shape}, expected {wanted}; "  # a name the model has
                f"{TENSORS} does not match {METADATA}"
            )


def _read_tensors(run: Path, expected_sha256: str | None) -> dict[str, torch.Tensor]:
    """The run's tensors (safetensors: nothing unpickled), checked against gapcam.json's hash."""
    import hashlib

    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        data = (run / TENSORS).read_bytes()
    except OSError as exc:
        raise ModelError(f"{_label(run)}: cannot read {TENSORS} ({exc})") from exc
    if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise ModelError(
            f"{_label(run)}: {TENSORS} does not match {METADATA} (sha256 differs); the "
            "run folder was changed or only partly copied; train again or copy it in full"
        )
    try:
        return load(data)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{_label(run)}: cannot read {TENSORS} ({exc})") from exc


def _load_head(model: GapModel, tensors: Mapping[str, torch.Tensor], run: Path) -> None:
    classifier: Any = model.classifier
    for key, target in (
        ("head.weight", classifier.weight),
        ("head.bias", getattr(classifier, "bias", None)),
    ):
        if target is None:
            continue
        tensor = tensors.get(key)
        if tensor is None or tensor.shape != target.shape:
            found = None if tensor is None else tuple(tensor.shape)
            raise ModelError(
                f"{_label(run)}: {key} is {found}, expected {tuple(target.shape)}; "
                f"{TENSORS} does not match {METADATA}"
            )
        with torch.no_grad():
            target.copy_(tensor)


def _load_backbone(model: GapModel, tensors: Mapping[str, torch.Tensor], run: Path) -> None:
    state = model.module.state_dict()
    for name, tensor in tensors.items():
        if name not in state or state[name].shape != tensor.shape:
            raise ModelError(
                f"{_label(run)}: backbone tensor {_shown(name)} does not fit the backbone"
            )
    load_tensors(model.module, tensors)

"""Fine-tuned heads as run folders: ``model.safetensors`` + ``gapcam.json``. Nothing is pickled.

``model.safetensors`` holds ``head.weight`` / ``head.bias`` (the new classifier) and, when part
of the backbone was trained too, those tensors under ``backbone.<name>``. ``gapcam.json`` holds
the backbone's name and weights, the class names, the preprocessing, metrics and the version.
A run loads with ``load_checkpoint(run)``: build the backbone, swap in the head, load tensors.
``gapcam.train`` writes runs (``checkpoint_files`` gives the bytes; no I/O in this module
besides reading).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from gapcam.errors import ModelError
from gapcam.models.base import GapModel
from gapcam.models.weights import load_tensors

FORMAT = "gapcam.checkpoint/1"
TENSORS = "model.safetensors"
METADATA = "gapcam.json"


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

    data = save({k: v.contiguous() for k, v in tensors.items()})
    document = {"format": FORMAT, "gapcam_version": __version__, **metadata}
    document["tensors_sha256"] = hashlib.sha256(data).hexdigest()
    return {TENSORS: data, METADATA: (json.dumps(document, indent=2) + "\n").encode()}


def read_metadata(run: Path) -> dict[str, Any]:
    path = Path(run) / METADATA
    if not path.is_file():
        raise ModelError(
            f"checkpoint={str(run)!r}: no {METADATA} in it; give a folder made by `gapcam train`"
        )
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"checkpoint={str(run)!r}: {METADATA} is not valid JSON ({exc})") from exc
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ModelError(f"checkpoint={str(run)!r}: {METADATA} is not a {FORMAT} file")
    for key in ("backbone", "class_names"):
        if key not in document:
            raise ModelError(f"checkpoint={str(run)!r}: {METADATA} has no {key!r}")
    return document


def load_checkpoint(run: str | Path) -> GapModel:
    """The GapModel of a training run folder (backbone + trained head and tensors)."""
    from gapcam.models.registry import build_model

    run = Path(run)
    meta = read_metadata(run)
    model = build_model(meta["backbone"], meta.get("backbone_weights"))
    model = replace_classifier(model, meta["class_names"])
    tensors = _read_tensors(run, meta.get("tensors_sha256"))
    _load_head(model, tensors, run)
    backbone = {
        k.removeprefix("backbone."): v for k, v in tensors.items() if k.startswith("backbone.")
    }
    if backbone:
        _load_backbone(model, backbone, run)
    preprocess = meta.get("preprocess")
    if isinstance(preprocess, dict):
        fields = {f.name for f in dataclasses.fields(model.preprocess)}
        clean = {
            k: tuple(v) if isinstance(v, list) else v for k, v in preprocess.items() if k in fields
        }
        model.preprocess = model.preprocess.replace(**clean)
    model.name = f"{meta['backbone']}+{run.name}"
    model.source = "checkpoint"
    return model


def _read_tensors(run: Path, expected_sha256: str | None) -> dict[str, torch.Tensor]:
    """The run's tensors (safetensors: nothing unpickled), checked against gapcam.json's hash."""
    import hashlib

    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        data = (run / TENSORS).read_bytes()
    except OSError as exc:
        raise ModelError(f"checkpoint={str(run)!r}: cannot read {TENSORS} ({exc})") from exc
    if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise ModelError(
            f"checkpoint={str(run)!r}: {TENSORS} does not match {METADATA} (sha256 differs); the "
            "run folder was changed or only partly copied; train again or copy it in full"
        )
    try:
        return load(data)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"checkpoint={str(run)!r}: cannot read {TENSORS} ({exc})") from exc


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
                f"checkpoint={str(run)!r}: {key} is {found}, expected {tuple(target.shape)}; "
                f"{TENSORS} does not match {METADATA}"
            )
        with torch.no_grad():
            target.copy_(tensor)


def _load_backbone(model: GapModel, tensors: Mapping[str, torch.Tensor], run: Path) -> None:
    state = model.module.state_dict()
    for name, tensor in tensors.items():
        if name not in state or state[name].shape != tensor.shape:
            raise ModelError(
                f"checkpoint={str(run)!r}: backbone tensor {name!r} does not fit the backbone"
            )
    load_tensors(model.module, tensors)

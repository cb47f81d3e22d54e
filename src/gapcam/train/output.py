"""Write a training run: the best model as a checkpoint, the resume state, figures, overlays.

The checkpoint files (``model.safetensors``, ``gapcam.json``, ``train_state.safetensors``) are
replaced together (all written to temporary names first), so a full disk leaves the previous
run intact; the figures and overlays follow once the checkpoint is in place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gapcam.console import safe_text
from gapcam.models.base import GapModel
from gapcam.models.checkpoint import checkpoint_files, trained_tensors
from gapcam.models.weights import load_tensors
from gapcam.outputs import NAME_BYTES, atomic_write, atomic_write_all, encode_image
from gapcam.train.config import TrainConfig
from gapcam.train.data import Dataset
from gapcam.train.features import Extracted
from gapcam.train.finetune import stage_names
from gapcam.train.loop import LoopState, Standardizer

STATE = "train_state.safetensors"
CURVE, CONFUSION, OVERLAYS = "curve.png", "confusion.png", "overlays"
#: paths the user typed are shown whole (control characters escaped); an image's error is cut
PATH_LIMIT, ERROR_LIMIT = 4096, 280

Echo = Callable[[str], None]


@dataclass
class TrainReport:
    """What a training run produced: the run folder, the trained model, its metrics."""

    run: Path
    model: GapModel
    metrics: dict[str, Any]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    interrupted: bool = False


@dataclass
class RunData:
    """Everything the writer needs, gathered while training."""

    config: TrainConfig
    settings: dict[str, Any]
    dataset: Dataset
    train: Extracted
    val: Extracted
    norm: Standardizer
    phases: dict[str, LoopState]
    timings: dict[str, float]
    cache: dict[str, Any]


def write_run(
    run: RunData, model: GapModel, echo: Echo, interrupted: bool, warn: Echo | None = None
) -> TrainReport:
    from safetensors.torch import save

    phase = "finetune" if "finetune" in run.phases else "head"
    state = run.phases[phase]
    _install_best(model, run, phase)
    metrics = _metrics(run, phase)
    names = stage_names(model) if phase == "finetune" else []
    state_tensors = {"norm.mean": run.norm.mean, "norm.std": run.norm.std}
    for loop_state in run.phases.values():
        state_tensors |= loop_state.tensors()
    out = run.config.out
    files = checkpoint_files(trained_tensors(model, names), _metadata(run, model, metrics, names))
    files[STATE] = save({k: v.contiguous() for k, v in state_tensors.items()})
    atomic_write_all({out / name: data for name, data in files.items()})
    if run.config.overwrite:
        shutil.rmtree(out / OVERLAYS, ignore_errors=True)
    _figures(run, model, metrics, out)
    count = _overlays(run, model, out)
    _summary(run, metrics, state, count, echo, interrupted, warn or echo)
    return TrainReport(out, model, metrics, list(run.train.failed + run.val.failed), interrupted)


def _install_best(model: GapModel, run: RunData, phase: str) -> None:
    """Put the best epoch's head (folded to raw features) and backbone tensors into ``model``."""
    best = run.phases[phase].best
    backbone = {
        k.removeprefix("backbone."): v for k, v in best.items() if k.startswith("backbone.")
    }
    if backbone:
        load_tensors(model.module, backbone)
    weight, bias = run.norm.fold(best)
    classifier: Any = model.classifier
    with torch.no_grad():
        classifier.weight.copy_(weight.reshape(classifier.weight.shape))
        classifier.bias.copy_(bias)


def _metrics(run: RunData, phase: str) -> dict[str, Any]:
    state = run.phases[phase]
    names = run.dataset.class_names
    matrix = [[0] * len(names) for _ in names]
    for truth, guess in zip(run.val.labels.tolist(), state.best_predictions, strict=True):
        matrix[truth][guess] += 1
    per_class = {
        name: (row[i] / sum(row) if sum(row) else None)
        for i, (name, row) in enumerate(zip(names, matrix, strict=True))
    }
    best_row = next(r for r in state.history if r["epoch"] == state.best_epoch)
    return {
        "phase": phase,
        "best_epoch": state.best_epoch,
        "epochs_run": state.epoch,
        "stopped_early": state.stopped_early,
        "val_accuracy": best_row["val_accuracy"],
        "val_loss": finite(best_row["val_loss"]),
        "train_accuracy": best_row["train_accuracy"],
        "train_loss": finite(best_row["train_loss"]),
        "val_images": len(run.val.labels),
        "per_class_val_accuracy": per_class,
        "confusion_matrix": matrix,
    }


def _metadata(
    run: RunData, model: GapModel, metrics: dict[str, Any], names: list[str]
) -> dict[str, Any]:
    settings = run.settings
    weights = settings["weights"]
    failed = run.train.failed + run.val.failed
    counts = run.dataset.counts()
    return {
        "backbone": settings["model"],
        "backbone_weights": str(Path(weights).resolve()) if weights else None,
        "class_names": list(run.dataset.class_names),
        "preprocess": dataclasses.asdict(model.preprocess),
        "finetune": settings["finetune"],
        "trained_backbone_tensors": len(names),
        "metrics": metrics,
        "dataset": {
            "root": str(run.dataset.root.resolve()),
            "layout": run.dataset.layout,
            "images": counts,
            "train_images": len(run.train.labels),
            "val_images": len(run.val.labels),
            "skipped_count": len(failed),
            "skipped": [{"path": path, "error": error} for path, error in failed],
            "sha256": dataset_digest(run),
        },
        "training": {
            "settings": settings,
            "patience": run.config.patience,
            "phases": {name: state.document() for name, state in run.phases.items()},
            "seconds": run.timings,
            "feature_cache": run.cache,
        },
    }


def _figures(run: RunData, model: GapModel, metrics: dict[str, Any], out: Path) -> None:
    from gapcam import plots

    history = [row for state in run.phases.values() for row in state.history]
    best = {name: state.best_epoch for name, state in run.phases.items()}
    atomic_write(out / CURVE, plots.training_curve(history, best), overwrite=True)
    matrix = plots.confusion_matrix(metrics["confusion_matrix"], model.class_names)
    atomic_write(out / CONFUSION, matrix, overwrite=True)


def _overlays(run: RunData, model: GapModel, out: Path) -> int:
    """CAM overlays of up to ``config.overlays`` val images, taken in turn from each class."""
    from gapcam.images import load_image
    from gapcam.localizer import Localizer

    chosen: list[tuple[Path, int]] = []
    by_class: dict[int, list[Path]] = {}
    for path, label in zip(run.val.paths, run.val.labels.tolist(), strict=True):
        by_class.setdefault(label, []).append(path)
    for rank in range(max((len(v) for v in by_class.values()), default=0)):
        chosen += [(paths[rank], c) for c, paths in sorted(by_class.items()) if rank < len(paths)]
    chosen = chosen[: max(0, run.config.overlays)]
    if not chosen:
        return 0
    localizer = Localizer(model=model)
    results = localizer.explain([load_image(path) for path, _ in chosen])
    for (path, label), result in zip(chosen, results, strict=True):
        name = overlay_name(model.class_names[label], path.stem)
        atomic_write(out / OVERLAYS / name, encode_image(result.figure()), overwrite=True)
    return len(chosen)


def overlay_name(class_name: str, stem: str) -> str:
    """``CLASS-STEM.cam.png``, where a class name (which a CSV label may set to anything) can
    neither leave the overlays folder nor break the name: control characters escaped, path
    separators replaced by ``_``, and the whole cut to ``NAME_BYTES``."""
    label = safe_text(class_name, NAME_BYTES).encode("utf-8", "backslashreplace").decode()
    for separator in {"/", os.sep, os.altsep or "/"}:
        label = label.replace(separator, "_")
    name = f"{label}-{stem}.cam.png"
    if _size(name) <= NAME_BYTES:
        return name
    label = _cut(label, NAME_BYTES // 2)
    return f"{label}-{_cut(stem, NAME_BYTES - _size(f'{label}-.cam.png'))}.cam.png"


def _size(name: str) -> int:
    return len(os.fsencode(name))


def _cut(text: str, size: int) -> str:
    """The longest start of ``text`` of at most ``size`` bytes as a file name."""
    while text and _size(text) > size:
        text = text[: -max(1, (_size(text) - size) // 4)]
    return text


def _summary(
    run: RunData,
    metrics: dict[str, Any],
    state: Any,
    overlays: int,
    echo: Echo,
    interrupted: bool,
    warn: Echo,
) -> None:
    right = round(metrics["val_accuracy"] * metrics["val_images"])
    stop = (
        f"; stopped early at epoch {state.epoch} (no better val for {run.config.patience} epochs)"
        if state.stopped_early
        else ""
    )
    echo(
        f"best epoch {metrics['best_epoch']} ({metrics['phase']}): val accuracy "
        f"{metrics['val_accuracy']:.1%} ({right}/{metrics['val_images']}), val loss "
        f"{metrics['val_loss']:.3f}{stop}"
    )
    failed = run.train.failed + run.val.failed
    out = safe_text(run.config.out, PATH_LIMIT)
    if failed:  # with quiet, this one line (echo is silent then)
        listed = f"(listed in {out}/gapcam.json){'' if run.config.quiet else ':'}"
        warn(f"skipped {len(failed)} unreadable image(s) {listed}")
        for _, error in failed[:10]:
            echo(f"  {safe_text(error, ERROR_LIMIT)}")
    echo(
        f"run: {out}/ (model.safetensors, gapcam.json, {CURVE}, {CONFUSION}, "
        f"{OVERLAYS}/ with {overlays} val overlays)"
    )
    if interrupted:
        data = safe_text(run.config.data, PATH_LIMIT)
        echo(f"continue it with: gapcam train {data} --out {out} --resume")
    echo(f"use it: gapcam localize IMAGES --checkpoint {out}")


def dataset_digest(run: RunData) -> str:
    """sha256 over the (split, relative path, label, content) of every readable image."""
    digest = hashlib.sha256()
    for split, part in (("train", run.train), ("val", run.val)):
        for path, label, content in zip(
            part.paths, part.labels.tolist(), part.digests, strict=True
        ):
            relative = path.relative_to(run.dataset.root).as_posix()
            digest.update(f"{split}\t{relative}\t{label}\t{content}\n".encode())
    return digest.hexdigest()


def finite(value: float) -> float | None:
    return value if math.isfinite(value) else None

"""``gapcam train``: a GAP + linear classifier for the user's own classes, in a run folder.

Fast path (the default): the backbone stays frozen, each image's pooled features are computed
once (and cached on disk, see ``gapcam.train.features``), and only the linear head is trained:
many epochs cost seconds. ``finetune="last-stage"`` then also trains the backbone's last stage
with augmentation (see ``gapcam.train.finetune``), starting from the trained head.

The run folder (see ``gapcam.models.checkpoint``) holds ``model.safetensors`` + ``gapcam.json``
(the best epoch on the validation split: what ``gapcam localize --checkpoint RUN`` and
``load_checkpoint`` use), ``train_state.safetensors`` (the last epoch and the optimizer, for
``resume``), ``curve.png``, ``confusion.png`` and ``overlays/`` (CAMs of a few val images).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from gapcam.cache import cache_dir
from gapcam.errors import ModelError, TrainingError
from gapcam.models.base import GapModel
from gapcam.models.checkpoint import METADATA, read_metadata, replace_classifier
from gapcam.train import loop as train_loop
from gapcam.train.config import DEFAULTS, FINETUNE_EPOCHS, HEAD_EPOCHS, TrainConfig
from gapcam.train.data import Dataset, discover
from gapcam.train.features import Extracted, FeatureCache, model_key
from gapcam.train.features import pooled_features as _pooled_features
from gapcam.train.finetune import fit_last_stage, last_stage
from gapcam.train.loop import LoopState, Standardizer
from gapcam.train.output import STATE, Echo, RunData, TrainReport, dataset_digest, write_run
from gapcam.types import FINETUNE_MODES, OPTIMIZERS


def train_classifier(data: str | Path, out: str | Path, **options: Any) -> TrainReport:
    """Train on the image folder ``data`` into the run folder ``out`` (Python API).

    ``options`` are the fields of ``TrainConfig`` (``model=``, ``epochs=``, ``finetune=``,
    ``resume=``, ...). Load the result with ``gapcam.load_checkpoint(out)``.
    """
    return run_training(TrainConfig(Path(data), Path(out), **options), echo=_silent)


def run_training(config: TrainConfig, echo: Echo = print, warn: Echo | None = None) -> TrainReport:
    """Train as ``config`` says. ``echo`` gets the progress and the report; ``warn`` (default:
    ``echo``) the lines that matter even with ``quiet``, which silences ``echo``: unreadable
    images skipped, a feature cache that could not be used, an interruption."""
    warn = warn or echo
    if config.quiet:
        echo = _silent
    previous = _check_out(config)
    settings = _resolve(config, previous)
    dataset = discover(config.data, settings["val_fraction"], settings["seed"])
    if previous is not None and list(previous["class_names"]) != list(dataset.class_names):
        raise TrainingError(
            f"resume=True: the run's classes {list(previous['class_names'])} differ from the "
            f"data's {list(dataset.class_names)}; start a new run (another out=, or "
            "overwrite=True)"
        )
    model = _backbone(settings, dataset.class_names, config.device)
    if settings["finetune"] == "last-stage":
        last_stage(model.module)  # an unknown architecture stops here, not after the head phase
    counts = ", ".join(f"{n} {c['train']}/{c['val']}" for n, c in dataset.counts().items())
    echo(f"classes (train/val images): {counts}  [{dataset.layout}]")
    run = _features(config, settings, dataset, model, echo, warn)
    if previous is not None:
        run.phases = _restore_phases(previous, config.out)
        run.norm = Standardizer(*_norm_tensors(config.out))
        if previous.get("dataset", {}).get("sha256") != dataset_digest(run):
            warn("note: the images changed since the run started; resuming on the current ones")
    interrupted = False
    started = time.perf_counter()
    try:
        _fit(run, model, echo)
    except KeyboardInterrupt:
        interrupted = True
        run.phases = {name: state for name, state in run.phases.items() if state.best}
        if not run.phases:  # not one epoch done: nothing worth saving
            raise
        warn("interrupted: saving the run as it stands; continue it with resume=True")
    run.timings["training_s"] = time.perf_counter() - started
    return write_run(run, model, echo, interrupted, warn)


def _silent(_: str) -> None:
    pass


def _check_out(config: TrainConfig) -> dict[str, Any] | None:
    """Refuse to clobber a run; on ``resume``, the run's gapcam.json."""
    out = config.out
    if out.exists() and not out.is_dir():
        raise TrainingError(f"out={str(out)!r}: is a file; give a folder for the run")
    if config.resume and config.overwrite:
        raise TrainingError("resume=True and overwrite=True: give one or the other")
    if config.data.resolve() in (out.resolve(), *out.resolve().parents):
        raise TrainingError(
            f"out={str(out)!r}: is inside the data folder {config.data}, where it would be read as "
            "a class; choose a folder outside it"
        )
    holds_run = (out / METADATA).exists() or (out / STATE).exists()
    if config.resume:
        if not holds_run:
            raise TrainingError(
                f"resume=True: {out} holds no training run ({METADATA}); drop resume=True to "
                "start one"
            )
        try:
            document = read_metadata(out)
        except ModelError as exc:
            raise TrainingError(f"resume=True: {exc}") from exc
        if "training" not in document or not (out / STATE).is_file():
            raise TrainingError(f"resume=True: {out} has no {STATE}; it cannot be continued")
        return document
    if holds_run and not config.overwrite:
        raise TrainingError(
            f"out={str(out)!r}: already holds a training run ({METADATA}); pass resume=True to "
            "continue it or overwrite=True to replace it, or choose another out="
        )
    if out.is_dir() and not holds_run and any(out.iterdir()) and not config.overwrite:
        raise TrainingError(
            f"out={str(out)!r}: folder is not empty and holds no gapcam run; choose a new or "
            "empty folder, or pass overwrite=True to write the run into it"
        )
    return None


def _resolve(config: TrainConfig, previous: dict[str, Any] | None) -> dict[str, Any]:
    stored = previous["training"]["settings"] if previous else {}
    settings = {}
    for key, default in DEFAULTS.items():
        given = getattr(config, key)
        if key == "weights" and given not in (None, "random"):
            given = str(Path(given).resolve())  # a resumed run may start from another folder
        if stored and given is not None and given != stored.get(key):
            raise TrainingError(
                f"resume=True: {key}={given!r} differs from the run's "
                f"{stored.get(key)}; leave it out to continue, or start a new run"
            )
        settings[key] = given if given is not None else stored.get(key, default)
    if settings["finetune"] not in FINETUNE_MODES:
        modes = ", ".join(FINETUNE_MODES)
        raise TrainingError(f"finetune={settings['finetune']!r}: use one of {modes}")
    if settings["optimizer"] not in OPTIMIZERS:
        raise TrainingError(f"optimizer={settings['optimizer']!r}: use {' or '.join(OPTIMIZERS)}")
    for key in ("lr", "batch_size"):
        if not settings[key] > 0:
            raise TrainingError(f"{key}={settings[key]:g}: must be positive")
    if (config.epochs is not None and config.epochs < 1) or config.patience < 1:
        raise TrainingError(f"epochs={config.epochs} / patience={config.patience}: use >= 1")
    return settings


def _backbone(settings: dict[str, Any], names: tuple[str, ...], device: str | None) -> GapModel:
    from gapcam.models.registry import build_model

    weights = settings["weights"]
    if weights == "random":
        raise TrainingError(
            "weights='random': a randomly initialised backbone cannot be rebuilt from the run "
            "folder; train on pretrained weights (the default) or a weights file"
        )
    model = build_model(settings["model"], weights)
    if model.head != "linear":
        raise TrainingError(
            f"model={settings['model']!r}: its classifier is a 1x1 convolution + ReLU before the "
            "pooling, not a linear layer on pooled features; gapcam train needs a linear head"
        )
    model = replace_classifier(model, names)
    if device is not None:
        model.module.to(device)
    return model


def _features(
    config: TrainConfig,
    settings: dict[str, Any],
    dataset: Dataset,
    model: GapModel,
    echo: Echo,
    warn: Echo,
) -> RunData:
    started = time.perf_counter()
    cache = None
    cache_info: dict[str, Any] = {"enabled": config.cache}
    if config.cache:
        key = model_key(model)
        cache = FeatureCache(config.cache_dir or cache_dir(), key, model.num_features)
        cache_info |= {"folder": str(cache.folder), "model_key": key}
    kwargs = {"batch_size": settings["batch_size"], "quiet": config.quiet}
    train = _pooled_features(model, dataset.train, cache, label="features (train)", **kwargs)
    val = _pooled_features(model, dataset.val, cache, label="features (val)", **kwargs)
    seconds = time.perf_counter() - started
    hits, misses = train.hits + val.hits, train.misses + val.misses
    cache_info |= {"hits": hits, "misses": misses}
    if cache is not None and cache.notes:
        cache_info["notes"] = cache.notes
        for note in cache.notes:
            warn(f"note: {note}")
    echo(
        f"features: {hits + misses} images ({hits} from the cache), {seconds:.1f} s "
        f"[{settings['model']}, {model.num_features} per image]"
    )
    _check_readable(dataset, train, val)
    norm = Standardizer.fit(train.features)
    timings = {"features_s": seconds}
    return RunData(config, settings, dataset, train, val, norm, {}, timings, cache_info)


def _check_readable(dataset: Dataset, train: Extracted, val: Extracted) -> None:
    from gapcam.errors import DatasetError

    present = set(train.labels.tolist())
    lost = [n for i, n in enumerate(dataset.class_names) if i not in present]
    if lost:
        raise DatasetError(
            f"{dataset.root}: no readable training image left for class(es) {', '.join(lost)} "
            f"({len(train.failed)} unreadable images skipped); fix or replace them"
        )
    if len(val.labels) == 0:
        raise DatasetError(f"{dataset.root}: no readable validation image; add some")


def _fit(run: RunData, model: GapModel, echo: Echo) -> None:
    config, settings = run.config, run.settings
    finetune = settings["finetune"] == "last-stage"
    head_epochs = config.epochs if config.epochs is not None and not finetune else HEAD_EPOCHS
    base = {k: settings[k] for k in ("optimizer", "lr", "weight_decay", "batch_size", "seed")}
    head = train_loop.Settings(epochs=head_epochs, patience=config.patience, **base)
    state = run.phases.setdefault("head", LoopState("head"))
    if "finetune" not in run.phases:
        train = (run.norm(run.train.features), run.train.labels)
        val = (run.norm(run.val.features), run.val.labels)
        train_loop.fit_head(
            train, val, model.num_classes, head, state, _reporter(echo, config.quiet, 10)
        )
    if not finetune:
        return
    tune = dataclasses.replace(head, epochs=config.epochs or FINETUNE_EPOCHS)
    if "finetune" not in run.phases:
        run.phases["finetune"] = LoopState("finetune", last=dict(state.best))
    items = list(zip(run.train.paths, run.train.labels.tolist(), strict=True))
    val_items = list(zip(run.val.paths, run.val.labels.tolist(), strict=True))
    fit_last_stage(
        model,
        items,
        val_items,
        run.norm,
        tune,
        run.phases["finetune"],
        _reporter(echo, config.quiet, 1),
        config.quiet,
    )


def _reporter(echo: Echo, quiet: bool, every: int) -> train_loop.Report:
    def report(state: LoopState, better: bool) -> None:
        row = state.history[-1]
        if quiet or not (row["epoch"] % every == 0 or row["epoch"] == 1):
            return
        echo(
            f"{state.phase:>8} epoch {row['epoch']:>3}  train loss {row['train_loss']:.3f} "
            f"acc {row['train_accuracy']:6.1%}  val loss {row['val_loss']:.3f} "
            f"acc {row['val_accuracy']:6.1%}{'  (best so far)' if better else ''}"
        )

    return report


def _restore_phases(previous: dict[str, Any], out: Path) -> dict[str, LoopState]:
    tensors = _state_tensors(out)
    phases = previous["training"].get("phases", {})
    return {name: LoopState.restore(doc, tensors) for name, doc in phases.items()}


def _norm_tensors(out: Path) -> tuple[torch.Tensor, torch.Tensor]:
    tensors = _state_tensors(out)
    return tensors["norm.mean"], tensors["norm.std"]


def _state_tensors(out: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(out / STATE), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise TrainingError(f"resume=True: cannot read {out / STATE} ({exc})") from exc

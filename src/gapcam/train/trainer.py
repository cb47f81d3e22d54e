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
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from gapcam.cache import cache_dir
from gapcam.console import safe_text
from gapcam.errors import DatasetError, ModelError, TrainingError
from gapcam.models.base import GapModel
from gapcam.models.checkpoint import METADATA, read_metadata, replace_classifier
from gapcam.models.weights import DTYPE_NAMES, FLOAT_DTYPES, Header, tensor_header
from gapcam.train import loop as train_loop
from gapcam.train.config import DEFAULTS, FINETUNE_EPOCHS, HEAD_EPOCHS, TrainConfig
from gapcam.train.data import Dataset, discover
from gapcam.train.features import Extracted, FeatureCache, model_key
from gapcam.train.features import pooled_features as _pooled_features
from gapcam.train.finetune import fit_last_stage, last_stage, stage_names
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
            f"resume=True: the run's classes {safe_text(list(previous['class_names']), 100)} "
            f"differ from the data's {safe_text(list(dataset.class_names), 100)}; start a new "
            "run (another out=, or overwrite=True)"
        )
    model = _backbone(settings, dataset.class_names, config.device)
    if settings["finetune"] == "last-stage":
        last_stage(model.module)  # an unknown architecture stops here, not after the head phase
    saved = None if previous is None else _saved_state(config.out, previous, settings, model)
    counts = ", ".join(f"{n} {c['train']}/{c['val']}" for n, c in dataset.counts().items())
    echo(f"classes (train/val images): {safe_text(counts, 1000)}  [{dataset.layout}]")
    run = _features(config, settings, dataset, model, echo, warn)
    if previous is not None and saved is not None:
        run.phases, run.norm = saved
        _rescore(run, "finetune" if "finetune" in run.phases else "head")
        recorded = previous.get("dataset")
        if not isinstance(recorded, dict) or recorded.get("sha256") != dataset_digest(run):
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
        _check_training(document)
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


def _damaged(what: str) -> TrainingError:
    return TrainingError(
        f"resume=True: {what}; the run folder is damaged, start a new run (overwrite=True)"
    )


def _check_training(document: dict[str, Any]) -> None:
    """The ``training`` part of a run's gapcam.json (what resuming reads), checked: the
    settings of the types ``DEFAULTS`` has, the phases an object (``LoopState.restore`` checks
    each)."""
    training = document["training"]
    settings = training.get("settings") if isinstance(training, dict) else None
    if not isinstance(settings, dict) or not isinstance(training.get("phases"), dict):
        raise _damaged(f"{METADATA} has no training settings and phases")
    for key, value in settings.items():
        if key in DEFAULTS and not _setting_fits(key, value):
            raise _damaged(f"{METADATA}'s training setting {key} is {safe_text(repr(value), 60)}")
    if settings.get("model", document["backbone"]) != document["backbone"]:
        raise _damaged(f"{METADATA}'s training setting model is not its backbone")


#: the largest learning rate and weight decay taken (an optimizer's values are float32 there;
#: the usual ones are 1e-4 to 1e-1, ``DEFAULTS``)
MAX_RATE = 10.0
#: what a given setting must be, for those ``_setting_fits`` bounds alike given or stored
RULES = {
    "lr": f"use a number above 0, at most {MAX_RATE:g}",
    "weight_decay": f"use a number from 0 to {MAX_RATE:g}",
    "val_fraction": "must be between 0 and 1 (e.g. 0.2)",
}


def _setting_fits(key: str, value: object) -> bool:
    """Whether a stored setting is one a run can have been trained with."""
    if key in ("model", "finetune", "optimizer"):
        return isinstance(value, str)
    if key == "weights":
        return value is None or (isinstance(value, str) and "\x00" not in value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if key in ("batch_size", "seed"):
        return isinstance(value, int) and (0 if key == "seed" else 1) <= value < 2**32
    if key == "val_fraction":
        return 0 < value < 1
    return (value >= 0 if key == "weight_decay" else value > 0) and value <= MAX_RATE  # lr too


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
                f"{safe_text(stored.get(key))}; leave it out to continue, or start a new run"
            )
        settings[key] = given if given is not None else stored.get(key, default)
    if settings["finetune"] not in FINETUNE_MODES:
        modes = ", ".join(FINETUNE_MODES)
        raise TrainingError(f"finetune={settings['finetune']!r}: use one of {modes}")
    if settings["optimizer"] not in OPTIMIZERS:
        raise TrainingError(f"optimizer={settings['optimizer']!r}: use {' or '.join(OPTIMIZERS)}")
    for key, rule in RULES.items():  # val_fraction even where the data has its val split
        if not _setting_fits(key, settings[key]):
            raise TrainingError(f"{key}={settings[key]!r}: {rule}")
    if not settings["batch_size"] > 0:
        raise TrainingError(f"batch_size={settings['batch_size']!r}: must be positive")
    if not 0 <= settings["seed"] < 2**32:
        raise TrainingError(f"seed={settings['seed']}: use a whole number from 0 to {2**32 - 1}")
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
    _check_readable(dataset, train, val, warn)
    _warn_duplicates(dataset, train, val, warn)
    norm = Standardizer.fit(train.features)
    timings = {"features_s": seconds}
    return RunData(config, settings, dataset, train, val, norm, {}, timings, cache_info)


def _check_readable(dataset: Dataset, train: Extracted, val: Extracted, warn: Echo) -> None:
    """Every class keeps a readable training image, and the validation split one image; a
    class left without a readable validation image is a warning. Each names the files."""
    present = set(train.labels.tolist())
    lost = [i for i in range(len(dataset.class_names)) if i not in present]
    if lost:
        names = ", ".join(dataset.class_names[i] for i in lost)
        failed = _failed_in(dataset.train, train.failed, set(lost))
        raise DatasetError(
            f"{safe_text(dataset.root)}: no readable training image left for class(es) "
            f"{safe_text(names, 80)} (unreadable: {_files(dataset, failed)}); fix or replace them"
        )
    if len(val.labels) == 0:
        raise DatasetError(
            f"{safe_text(dataset.root)}: no readable validation image (unreadable: "
            f"{_files(dataset, val.failed)}); fix or replace them, or add readable ones"
        )
    seen = set(val.labels.tolist())
    for index, name in enumerate(dataset.class_names):
        failed = _failed_in(dataset.val, val.failed, {index})
        if index not in seen and failed:
            warn(
                f"note: no readable validation image for class {safe_text(name, 60)} "
                f"(unreadable: {_files(dataset, failed)}); its accuracy is not measured"
            )


def _failed_in(
    items: Sequence[tuple[Path, int]], failed: Sequence[tuple[str, str]], classes: set[int]
) -> list[tuple[str, str]]:
    """The entries of ``failed`` (path, error) whose item is of one of ``classes``."""
    labels = {str(path): label for path, label in items}
    return [entry for entry in failed if labels.get(entry[0]) in classes]


def _files(dataset: Dataset, failed: Sequence[tuple[str, str]], shown: int = 3) -> str:
    """The first few of ``failed`` (path, error) as short paths under the dataset folder."""
    names = [_short(dataset, Path(path)) for path, _ in failed[:shown]]
    more = f" and {len(failed) - shown} more" if len(failed) > shown else ""
    return (", ".join(names) or "none") + more


def _short(dataset: Dataset, path: Path) -> str:
    shown = path.relative_to(dataset.root) if path.is_relative_to(dataset.root) else path
    return safe_text(shown, limit=80)


def _warn_duplicates(dataset: Dataset, train: Extracted, val: Extracted, warn: Echo) -> None:
    """A validation image with the same content (sha256) as a training image is named: the
    model has seen it, so it makes the validation accuracy look better than it is."""
    first: dict[str, Path] = {}
    for path, digest in zip(train.paths, train.digests, strict=True):
        first.setdefault(digest, path)
    pairs = [
        (path, first[digest])
        for path, digest in zip(val.paths, val.digests, strict=True)
        if digest in first
    ]
    if pairs:
        shown = ", ".join(f"{_short(dataset, v)} = {_short(dataset, t)}" for v, t in pairs[:2])
        more = f" and {len(pairs) - 2} more" if len(pairs) > 2 else ""
        warn(
            f"note: {len(pairs)} validation image(s) identical to training images ({shown}"
            f"{more}): they flatter the validation accuracy; remove one of each pair"
        )


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


def _saved_state(
    out: Path, previous: dict[str, Any], settings: dict[str, Any], model: GapModel
) -> tuple[dict[str, LoopState], Standardizer]:
    """The phases and the standardisation a run saved (before any feature is computed): the
    state file's header is checked against the model first (names, dtypes, shapes), so a
    damaged or foreign file is one line, and nothing it claims is allocated unchecked."""
    phases = previous["training"]["phases"]
    if (
        not phases
        or not set(phases) <= {"head", "finetune"}
        or ("finetune" in phases and settings["finetune"] != "last-stage")
    ):
        raise _damaged(f"{METADATA} lists the training phases {safe_text(list(phases), 80)}")
    path = out / STATE
    try:
        header = tensor_header(path, "resume=True")
    except ModelError as exc:
        raise TrainingError(str(exc)) from exc
    problem = _state_problem(header, model, list(phases))
    if problem:
        raise TrainingError(
            f"resume=True: {STATE} does not fit this run ({problem}); start a new run "
            "(overwrite=True)"
        )
    tensors = _state_tensors(path)
    restored = {}
    for name, document in phases.items():
        state = LoopState.restore(document, tensors, model.num_classes)
        if state.phase != name:
            raise _damaged(f"{METADATA}'s phase {name!r} is named {state.phase!r}")
        restored[name] = state
    return restored, Standardizer(tensors["norm.mean"], tensors["norm.std"])


def _state_problem(header: Header, model: GapModel, phases: list[str]) -> str:
    """What is wrong with a state file's tensors (or ""), as ``write_run`` names them:
    ``norm.mean/std``, ``PHASE.best.*`` and ``PHASE.last.*`` (the head, and the last stage for
    finetune), ``PHASE.optim.INDEX.NAME`` (an optimised parameter's state, float; a parameter
    without state is one the optimizer starts afresh, as it would have)."""
    classes, width = model.num_classes, model.num_features
    head: Header = {"head.weight": ("F32", (classes, width)), "head.bias": ("F32", (classes,))}
    expected: Header = {"norm.mean": ("F32", (width,)), "norm.std": ("F32", (width,))}
    optimised: dict[str, list[tuple[int, ...]]] = {}
    for phase in phases:
        tensors = dict(head)
        shapes = [(classes, width), (classes,)]
        if phase == "finetune":
            state = model.module.state_dict()
            for name in stage_names(model):
                dtype = DTYPE_NAMES.get(state[name].dtype, str(state[name].dtype))
                tensors[f"backbone.{name}"] = (dtype, tuple(state[name].shape))
            prefixes = tuple(last_stage(model.module))
            stage = model.module.named_parameters()
            shapes = [tuple(p.shape) for n, p in stage if n.startswith(prefixes)] + shapes
        for part in ("best", "last"):
            expected |= {f"{phase}.{part}.{key}": value for key, value in tensors.items()}
        optimised[phase] = shapes
    for name, (dtype, shape) in header.items():
        shown = safe_text(name, limit=80)
        if name in expected:
            wanted = expected[name]
            if (dtype, shape) != wanted:
                return f"{shown} is {dtype} {shape}, expected {wanted[0]} {wanted[1]}"
            continue
        found = re.fullmatch(r"(\w+)\.optim\.(\d+)\.(\w+)", name)
        if not found or found.group(1) not in optimised:
            return f"unexpected tensor {safe_text(repr(name), limit=80)}"
        phase, index, kind = found.group(1), int(found.group(2)), found.group(3)
        if index >= len(optimised[phase]):
            return f"{shown}: no parameter {index} is optimised"
        wanted_shape = () if kind == "step" else optimised[phase][index]
        if shape != wanted_shape or dtype not in FLOAT_DTYPES:
            return f"{shown} is {dtype} {shape}, expected a float {wanted_shape}"
    missing = sorted(set(expected) - set(header))
    return f"{missing[0]} is missing" if missing else ""


def _rescore(run: RunData, phase: str) -> None:
    """The best epoch's predictions for the validation images as they are now: recomputed for
    the head (cheap); for the fine-tuned stage they need the network, so a changed number of
    validation images is refused."""
    state = run.phases[phase]
    if len(state.best_predictions) == len(run.val.labels):
        return
    if phase == "finetune":
        raise TrainingError(
            f"resume=True: {len(run.val.labels)} readable validation images now, "
            f"{len(state.best_predictions)} when the run's best epoch was scored; restore the "
            "images or start a new run (overwrite=True)"
        )
    weight, bias = state.best["head.weight"], state.best["head.bias"]
    logits = torch.nn.functional.linear(run.norm(run.val.features), weight, bias)
    state.best_predictions = logits.argmax(dim=1).tolist()


def _state_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        reason = safe_text(exc, limit=120)
        raise TrainingError(f"resume=True: cannot read {safe_text(path)} ({reason})") from exc

"""The training loop of a linear head on pooled features: epochs, best epoch, early stopping.

The head works on standardised features ``z = (x - mean) / std`` (mean and std of the training
features), which makes one learning rate fit every backbone; ``fold`` turns it back into the
weight and bias of a plain linear layer on the raw pooled features, which is what the CAM
needs (``logit = W . GAP(f) + b``). Every epoch draws its shuffling from a generator seeded by
(seed, phase, epoch), and the optimizer state is saved with the run, so a resumed run continues
exactly where the interrupted one stopped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gapcam.errors import TrainingError
from gapcam.types import OPTIMIZERS


@dataclass(frozen=True)
class Settings:
    """Optimisation settings of one phase."""

    epochs: int = 100
    patience: int = 10
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-2
    batch_size: int = 64
    seed: int = 0


@dataclass
class LoopState:
    """Where a phase stands: epochs done, the best epoch's tensors, the last epoch's tensors."""

    phase: str
    epoch: int = 0
    best_epoch: int = 0
    best_accuracy: float = -1.0
    best_loss: float = math.inf
    since_best: int = 0
    stopped_early: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)
    best_predictions: list[int] = field(default_factory=list)
    best: dict[str, torch.Tensor] = field(default_factory=dict)
    last: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: dict[str, torch.Tensor] = field(default_factory=dict)

    def record(
        self, row: dict[str, Any], tensors: dict[str, torch.Tensor], predictions: list[int]
    ) -> bool:
        """Add an epoch; returns whether it is the new best: the lowest validation loss (ties:
        the higher accuracy). The loss, unlike the accuracy on a small validation split, moves
        with every image's confidence, so it does not stop on a lucky early epoch."""
        self.epoch = int(row["epoch"])
        self.history.append(row)
        better = row["val_loss"] < self.best_loss or (
            row["val_loss"] == self.best_loss and row["val_accuracy"] > self.best_accuracy
        )
        if better:
            self.best_epoch, self.since_best = self.epoch, 0
            self.best_accuracy, self.best_loss = row["val_accuracy"], row["val_loss"]
            self.best = {k: v.detach().clone() for k, v in tensors.items()}
            self.best_predictions = predictions
        else:
            self.since_best += 1
        return better

    def document(self) -> dict[str, Any]:
        """The JSON part (tensors go to ``tensors()``)."""
        keys = ("phase", "epoch", "best_epoch", "best_accuracy", "best_loss", "since_best")
        document = {k: getattr(self, k) for k in keys}
        document["best_loss"] = None if math.isinf(self.best_loss) else self.best_loss
        document |= {"stopped_early": self.stopped_early, "history": self.history}
        return document | {"best_predictions": self.best_predictions}

    def tensors(self) -> dict[str, torch.Tensor]:
        prefix = f"{self.phase}."
        out = {f"{prefix}best.{k}": v for k, v in self.best.items()}
        out |= {f"{prefix}last.{k}": v for k, v in self.last.items()}
        return out | {f"{prefix}optim.{k}": v for k, v in self.optimizer.items()}

    @classmethod
    def restore(cls, document: object, tensors: dict[str, torch.Tensor], classes: int) -> LoopState:
        """The state a run saved: ``document`` from gapcam.json (checked here: a damaged one
        raises a one-line TrainingError), ``tensors`` from the state file (checked by the
        caller against the model)."""
        document = check_phase_document(document, classes)
        state = cls(phase=str(document["phase"]))
        for key in ("epoch", "best_epoch", "since_best"):
            setattr(state, key, int(document[key]))
        state.best_accuracy = float(document["best_accuracy"])
        state.best_loss = math.inf if document["best_loss"] is None else document["best_loss"]
        state.stopped_early = bool(document["stopped_early"])
        state.history = list(document["history"])
        state.best_predictions = [int(p) for p in document["best_predictions"]]
        for part in ("best", "last", "optim"):
            prefix = f"{state.phase}.{part}."
            found = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
            setattr(state, "optimizer" if part == "optim" else part, found)
        return state


HISTORY_NUMBERS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "seconds")


def check_phase_document(document: object, classes: int) -> dict[str, Any]:
    """A phase as ``LoopState.document`` wrote it, or a TrainingError naming what is wrong."""

    def refuse(what: str) -> TrainingError:
        return TrainingError(
            f"resume=True: gapcam.json's training phase {what}; the run folder is damaged, "
            "start a new run (overwrite=True)"
        )

    if not isinstance(document, dict):
        raise refuse("is not an object")
    if document.get("phase") not in ("head", "finetune"):
        raise refuse("has no phase 'head' or 'finetune'")
    counts = [document.get(key) for key in ("epoch", "best_epoch", "since_best")]
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts):
        raise refuse("has no whole epoch, best_epoch and since_best")
    epoch, best_epoch = int(document["epoch"]), int(document["best_epoch"])
    history = document.get("history")
    if not isinstance(history, list) or not all(_history_row(row) for row in history):
        raise refuse("history is not a list of epochs")
    epochs = [row["epoch"] for row in history]  # 1, 2, ... epoch (its length first: no
    if len(epochs) != epoch or epochs != list(range(1, epoch + 1)):  # list of a huge count)
        raise refuse("history does not hold epochs 1 to epoch")
    if not 1 <= best_epoch <= epoch:
        raise refuse("best_epoch is not one of its epochs")
    if not _is_number(document.get("best_accuracy")) or not (
        document.get("best_loss") is None or _is_number(document.get("best_loss"))
    ):
        raise refuse("has no best_accuracy and best_loss")
    if not isinstance(document.get("stopped_early"), bool):
        raise refuse("has no stopped_early")
    predictions = document.get("best_predictions")
    if not isinstance(predictions, list) or not all(
        isinstance(p, int) and not isinstance(p, bool) and 0 <= p < classes for p in predictions
    ):
        raise refuse(f"best_predictions are not class indices below {classes}")
    return document


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _history_row(row: object) -> bool:
    return (
        isinstance(row, dict)
        and isinstance(row.get("epoch"), int)
        and not isinstance(row.get("epoch"), bool)
        and all(_is_number(row.get(key)) for key in HISTORY_NUMBERS)
    )


@dataclass(frozen=True)
class Standardizer:
    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def fit(cls, features: torch.Tensor) -> Standardizer:
        """Mean and spread of the training features. The spread has a floor (1% of the mean
        variance is added): a feature that is (almost) constant on the training images, often
        exactly 0 after a ReLU, would otherwise be scaled up without bound on other images, or
        as soon as fine-tuning moves it."""
        variance = features.var(dim=0, unbiased=False)
        floor = 0.01 * float(variance.mean()) + 1e-12
        return cls(features.mean(dim=0), (variance + floor).sqrt())

    def to(self, device: torch.device) -> Standardizer:
        return Standardizer(self.mean.to(device), self.std.to(device))

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.mean) / self.std

    def fold(self, head: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight and bias on raw features equal to ``head`` on standardised ones (computed in
        float64, so that the result does not depend on how the sum happens to be vectorised)."""
        weight = head["head.weight"].double() / self.std.double()
        bias = head["head.bias"].double() - weight @ self.mean.double()
        return weight.float(), bias.float()


def new_head(width: int, classes: int, start: dict[str, torch.Tensor] | None = None) -> nn.Linear:
    """A zero-initialised head (a deterministic start), or one loaded from ``start``."""
    head = nn.Linear(width, classes)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        if start:
            head.weight.copy_(start["head.weight"])
            head.bias.copy_(start["head.bias"])
    return head


def head_tensors(head: nn.Linear) -> dict[str, torch.Tensor]:
    weight, bias = head.weight.detach().cpu().clone(), head.bias.detach().cpu().clone()
    return {"head.weight": weight, "head.bias": bias}


def make_optimizer(groups: list[dict[str, Any]], settings: Settings) -> torch.optim.Optimizer:
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=settings.lr, weight_decay=settings.weight_decay)
    if settings.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=settings.lr, momentum=0.9, weight_decay=settings.weight_decay
        )
    raise TrainingError(f"optimizer={settings.optimizer!r}: use one of {', '.join(OPTIMIZERS)}")


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state as flat ``"<index>.<name>"`` tensors."""
    flat = {}
    for index, values in optimizer.state_dict()["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                flat[f"{index}.{name}"] = value.detach().cpu().clone()
            elif value is not None:
                flat[f"{index}.{name}"] = torch.tensor(value)
    return flat


def load_optimizer(optimizer: torch.optim.Optimizer, flat: dict[str, torch.Tensor]) -> None:
    if not flat:
        return
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value.clone()
    groups = optimizer.state_dict()["param_groups"]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def epoch_generator(settings: Settings, phase: str, epoch: int) -> torch.Generator:
    offset = 0 if phase == "head" else 1_000_000
    return torch.Generator().manual_seed(settings.seed * 10_000_019 + offset + epoch)


def scores(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float, list[int]]:
    """Mean cross-entropy, accuracy and the predicted classes."""
    if len(labels) == 0:
        return math.nan, math.nan, []
    predictions = logits.argmax(dim=1)
    loss = float(F.cross_entropy(logits, labels))
    return loss, float((predictions == labels).float().mean()), predictions.tolist()


Report = Callable[[LoopState, bool], None]


def fit_head(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    classes: int,
    settings: Settings,
    state: LoopState,
    report: Report,
) -> LoopState:
    """Train a linear head on standardised features (``train``/``val``: (features, labels))."""
    (z_train, y_train), (z_val, y_val) = train, val
    head = new_head(z_train.shape[1], classes, state.last or None)
    optimizer = make_optimizer([{"params": list(head.parameters())}], settings)
    load_optimizer(optimizer, state.optimizer)
    for epoch in epochs_left(state, settings):
        started = time.perf_counter()
        order = torch.randperm(len(y_train), generator=epoch_generator(settings, "head", epoch))
        for batch in order.split(settings.batch_size):
            loss = F.cross_entropy(head(z_train[batch]), y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            train_loss, train_accuracy, _ = scores(head(z_train), y_train)
            val_loss, val_accuracy, predictions = scores(head(z_val), y_val)
        row = {"phase": "head", "epoch": epoch, "train_loss": train_loss}
        row |= {"train_accuracy": train_accuracy, "val_loss": val_loss}
        row |= {"val_accuracy": val_accuracy, "seconds": time.perf_counter() - started}
        better = state.record(row, head_tensors(head), predictions)
        state.last, state.optimizer = head_tensors(head), optimizer_tensors(optimizer)
        report(state, better)
    return state


def epochs_left(state: LoopState, settings: Settings) -> Iterable[int]:
    """The epochs still to run; stops early after ``patience`` epochs without a new best."""
    if state.since_best >= settings.patience:  # asked to go on after an early stop
        state.since_best, state.stopped_early = 0, False
    while state.epoch < settings.epochs:
        if state.epoch > 0 and state.since_best >= settings.patience:
            state.stopped_early = True
            return
        yield state.epoch + 1

"""What ``gapcam train`` is asked to do: ``TrainConfig`` and the defaults of a run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gapcam.types import DEFAULT_MODEL

#: Settings that define a run: on ``resume`` they come from the run, and may not be changed.
DEFAULTS: dict[str, Any] = {
    "model": DEFAULT_MODEL,
    "weights": None,
    "finetune": "none",
    "optimizer": "adamw",
    "lr": 1e-3,
    "weight_decay": 1e-2,
    "batch_size": 32,
    "val_fraction": 0.2,
    "seed": 0,
}
HEAD_EPOCHS, FINETUNE_EPOCHS = 100, 10


@dataclass(frozen=True)
class TrainConfig:
    """What ``gapcam train`` was asked to do. ``None`` means the default (or, on ``resume``,
    the run's own value); see ``DEFAULTS``."""

    data: Path
    out: Path
    model: str | None = None
    weights: str | None = None
    finetune: str | None = None
    optimizer: str | None = None
    lr: float | None = None
    weight_decay: float | None = None
    batch_size: int | None = None
    val_fraction: float | None = None
    seed: int | None = None
    epochs: int | None = None
    patience: int = 10
    cache_dir: Path | None = None
    cache: bool = True
    resume: bool = False
    overwrite: bool = False
    overlays: int = 8
    device: str | None = None
    quiet: bool = False

    def __post_init__(self) -> None:  # accept str paths from Python callers
        for name in ("data", "out", "cache_dir"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))

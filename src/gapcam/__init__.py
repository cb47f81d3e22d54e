"""gapcam: class activation maps and boxes for CNNs that end in global average pooling.

Importing ``gapcam`` is cheap: the public names below load their modules (and torch) on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from gapcam._version import __version__

if TYPE_CHECKING:
    from gapcam.boxes import box_iou, boxes_from_map, boxes_from_mask
    from gapcam.errors import (
        ClassSelectionError,
        DatasetError,
        GapcamError,
        ImageError,
        ModelError,
        OutputError,
        TrainingError,
        UnsupportedModelError,
        VideoError,
    )
    from gapcam.images import load_image
    from gapcam.localizer import Localizer
    from gapcam.models import GapModel, build_model, from_module
    from gapcam.models.checkpoint import load_checkpoint
    from gapcam.result import Result
    from gapcam.train import TrainConfig, train_classifier
    from gapcam.types import Box, ClassMap, Prediction, Preprocess

_LOCATIONS = {
    "Box": "gapcam.types",
    "ClassMap": "gapcam.types",
    "ClassSelectionError": "gapcam.errors",
    "DatasetError": "gapcam.errors",
    "GapModel": "gapcam.models",
    "GapcamError": "gapcam.errors",
    "ImageError": "gapcam.errors",
    "Localizer": "gapcam.localizer",
    "ModelError": "gapcam.errors",
    "OutputError": "gapcam.errors",
    "Prediction": "gapcam.types",
    "Preprocess": "gapcam.types",
    "Result": "gapcam.result",
    "TrainConfig": "gapcam.train",
    "TrainingError": "gapcam.errors",
    "UnsupportedModelError": "gapcam.errors",
    "VideoError": "gapcam.errors",
    "box_iou": "gapcam.boxes",
    "boxes_from_map": "gapcam.boxes",
    "boxes_from_mask": "gapcam.boxes",
    "build_model": "gapcam.models",
    "from_module": "gapcam.models",
    "load_checkpoint": "gapcam.models.checkpoint",
    "load_image": "gapcam.images",
    "train_classifier": "gapcam.train",
}

__all__ = sorted([*_LOCATIONS, "__version__"])


def __getattr__(name: str) -> Any:
    module = _LOCATIONS.get(name)
    if module is None:
        raise AttributeError(f"module 'gapcam' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__

"""Frozen value objects passed between the layers. No torch import here."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

ResizeMode = Literal["stretch", "letterbox"]

# The choices the library accepts, here so that the command line can offer them without
# importing torch. Each is checked where it is used (the module named beside it).

#: the embedded default model (``gapcam.models``)
DEFAULT_MODEL = "efficientnet_lite0"
#: how an image is fitted to the network input (``gapcam.images``)
RESIZE_MODES: tuple[str, ...] = ("stretch", "letterbox")
#: who runs the network (``gapcam.backends``)
BACKENDS: tuple[str, ...] = ("auto", "eager", "onnx")
#: the forward pass's precision (``gapcam.backends``)
PRECISIONS: tuple[str, ...] = ("float32", "bfloat16", "float16", "int8")
#: overlay image formats (``gapcam.outputs``); ``auto``: JPEG for JPEG photos, else PNG
OVERLAY_FORMATS: tuple[str, ...] = ("auto", "png", "jpg")
#: file name suffixes that ``gapcam localize`` reads as videos (``gapcam.clips``, PyAV); folder
#: and glob expansion picks them up next to ``gapcam.images.IMAGE_SUFFIXES``
VIDEO_SUFFIXES = frozenset(
    {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".wmv", ".ogv"}
)
#: annotation layouts ``gapcam evaluate`` reads (``gapcam.eval.datasets``)
DATASET_LAYOUTS: tuple[str, ...] = ("auto", "wsol", "voc", "csv")
#: what ``gapcam train`` trains (``gapcam.train.finetune``)
FINETUNE_MODES: tuple[str, ...] = ("none", "last-stage")
#: the head's optimizers (``gapcam.train.loop``)
OPTIMIZERS: tuple[str, ...] = ("adamw", "sgd")
#: normalisations of a map before its box threshold (``gapcam.localizer``)
BOX_NORMALIZATIONS: tuple[str, ...] = ("minmax", "max")
#: input pixels per cell of the last feature map: 32 is the plain network, 16 and 8 run its
#: last stride-2 stage(s) dilated (``gapcam.models.dense``)
OUTPUT_STRIDES: tuple[int, ...] = (32, 16, 8)
#: how a feature grid lies over the network input, per axis (rows, columns): ``(scale,
#: offset)`` such that the input fraction x is at the grid fraction ``scale * x + offset``
#: (cell j of an m-cell grid spans the grid fractions j / m to (j + 1) / m). ``CENTRED``, a
#: plain network's grid, evenly covers the input (bilinear upsampling, align_corners=False);
#: a dilated network's grid is drawn so that its plain cells land there too (``gapcam.cam.
#: placed``, ``gapcam.models.base.Subgrid.placement``)
Placement = tuple[tuple[float, float], tuple[float, float]]
CENTRED: Placement = ((1.0, 0.0), (1.0, 0.0))
#: named view settings (``Localizer.from_preset``, ``--preset``): ``cam`` is the paper's single
#: pass (the default), ``fine`` a cheap step up, ``best`` the most the quality ladder found
#: worth its cost. ``PRESETS`` is for any model; ``MODEL_PRESETS`` holds the ones measured for
#: the embedded models on the ILSVRC dev set (docs/evaluate.md, the quality ladder): a
#: preset a model's curve does not justify is its single pass (Lite1 and Lite2 have no step
#: between their single pass and ``best``). Scales are factors of the model's input size.
#: The generic presets are the view settings that were best for Lite0 before dense maps
#: (not every network can run dilated: DenseNets cannot).
PRESETS: dict[str, dict[str, Any]] = {
    "cam": {},
    "fine": {"input_size": 288},
    "best": {"scales": (1.0, 1.5)},
}
MODEL_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "efficientnet_lite0": {
        "cam": {},
        "fine": {"input_size": 288, "output_stride": 16},
        "best": {"input_size": 288, "output_stride": 16, "hflip": True},
    },
    "efficientnet_lite1": {
        "cam": {},
        "fine": {},
        "best": {"scales": (1.0, 1.5), "output_stride": 16},
    },
    "efficientnet_lite2": {
        "cam": {},
        "fine": {},
        "best": {"scales": (1.0, 1.5)},
    },
}


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in original-image pixel coordinates.

    Pixel-edge convention: ``x0, y0`` is the top-left corner of the top-left pixel of the
    region and ``x1, y1`` the bottom-right corner of its bottom-right pixel, so a region made
    of the single pixel (col 3, row 5) is ``Box(3, 5, 4, 6)``; width is ``x1 - x0``.
    ``area`` is the number of pixels of the connected component the box was made from
    (0 for boxes that do not come from a component, such as ground truth).
    """

    x0: float
    y0: float
    x1: float
    y1: float
    area: int = 0

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    def as_list(self) -> list[float]:
        return [self.x0, self.y0, self.x1, self.y1]


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the model's input tensor; it travels with the weights.

    ``size`` is (height, width) of the network input. ``resize``: ``"stretch"`` resizes the
    whole image to ``size`` (every pixel of the photo gets a map value; the CAM default) and
    ``"letterbox"`` keeps the aspect ratio and pads (with the mean colour) to ``size``.
    Pixel values are scaled to [0, 1], then ``(x - mean) / std`` per channel.
    """

    size: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    resize: str = "stretch"
    interpolation: str = "bilinear"

    def replace(self, **changes: Any) -> Preprocess:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Prediction:
    """One class's score for one image."""

    index: int
    name: str
    probability: float
    logit: float


@dataclass(frozen=True)
class ClassMap:
    """The CAM of one class for one image, and the boxes drawn from it.

    ``low_res`` is the raw map at the feature resolution (h x w, float32, not normalised);
    ``boxes`` come from the normalised map upsampled to the original image, largest first
    (``boxes[0]`` is the CAM paper's box of the largest connected component).
    """

    prediction: Prediction
    low_res: Any  # numpy.ndarray (h, w) float32
    boxes: tuple[Box, ...]
    raw_min: float
    raw_max: float


@dataclass(frozen=True)
class Settings:
    """The settings a result was made with (recorded in JSON outputs)."""

    model: str
    threshold: float
    normalize: str
    min_area: float
    resize: str
    input_size: tuple[int, int]
    extras: dict[str, Any] = field(default_factory=dict)

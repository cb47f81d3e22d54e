"""What gapcam knows about one image: predictions, class maps and boxes, and how to draw them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from gapcam import cam, outputs, overlay
from gapcam.types import Box, ClassMap, Prediction, Settings


@dataclass(frozen=True)
class Result:
    """Everything gapcam knows about one image."""

    name: str
    image: Image.Image
    predictions: tuple[Prediction, ...]
    maps: tuple[ClassMap, ...]
    settings: Settings
    #: where the maps' grid lies in the original image (``cam.upsample``): the image's place
    #: in the model input, through a dilated grid's ``Subgrid.placement`` (``cam.placed``)
    region: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)
    path: Path | None = None
    notes: tuple[str, ...] = ()
    #: the input file's format as Pillow names it ("JPEG", "PNG", ...), None for arrays
    source_format: str | None = None
    kept_maps: tuple[np.ndarray, ...] | None = field(default=None, repr=False, compare=False)
    box_maps: tuple[np.ndarray, ...] = field(default=(), repr=False, compare=False)
    map_device: str = field(default="cpu", repr=False, compare=False)

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size

    @property
    def normalized(self) -> tuple[np.ndarray, ...]:
        """The normalised maps at the original image size (H x W float32), one per map.

        Kept from the forward pass for images up to ``KEEP_MAPS_PIXELS``; for larger ones they
        are made again from ``low_res`` on first use (the same computation on the same device,
        the same values), so a queue of results waiting to be written does not hold them.
        Boxes and overlays do not need them (``box_maps``, ``MAP_PIXELS``): for a photo of many
        megapixels they cost 4 bytes per pixel per map, made only when asked for.
        """
        if self.kept_maps is not None:
            return self.kept_maps
        low = torch.from_numpy(np.stack([m.low_res for m in self.maps]))[None]
        width, height = self.size
        maps = normalized_maps(low.to(self.map_device), (height, width), self.region, self.settings)
        object.__setattr__(self, "kept_maps", maps)  # made once, then kept
        return maps

    @property
    def top(self) -> Prediction:
        return self.predictions[0]

    def cam(self, index: int = 0) -> np.ndarray:
        """The normalised map of ``maps[index]`` at the original image size (H x W float32)."""
        return self.normalized[index]

    def raw_cam(self, index: int = 0) -> np.ndarray:
        """The raw (not normalised) map of ``maps[index]`` upsampled to the image (H x W)."""
        low = torch.from_numpy(self.maps[index].low_res)[None, None]
        width, height = self.size
        return cam.upsample(low, (height, width), self.region)[0, 0].numpy()

    def overlay(
        self, index: int = 0, *, alpha: float = 0.5, cmap: str = "jet", boxes: bool = True
    ) -> Image.Image:
        """The CAM figure for ``maps[index]``: heatmap, box(es), caption. The heatmap is the
        map its boxes were computed on (``box_maps``), resized to the figure."""
        class_map = self.maps[index]
        p = class_map.prediction
        caption = f"{p.name}  {p.probability:.1%}"
        heat = self.box_maps[index] if self.box_maps else self.normalized[index]
        return overlay.render(
            self.image,
            heat,
            class_map.boxes if boxes else (),
            caption,
            alpha,
            cmap,
        )

    def figure(self, *, alpha: float = 0.5, cmap: str = "jet", boxes: bool = True) -> Image.Image:
        """One panel per mapped class (a single overlay when there is one class)."""
        panels = [
            self.overlay(i, alpha=alpha, cmap=cmap, boxes=boxes) for i in range(len(self.maps))
        ]
        return panels[0] if len(panels) == 1 else overlay.grid(panels)

    def _repr_png_(self) -> bytes:
        """The figure (``figure()``) as PNG bytes: how a notebook (IPython, Jupyter) shows a
        result."""
        return outputs.encode_image(self.figure(), "png")

    def __repr__(self) -> str:
        """One line: the name, the size, the top prediction and each map's class and box
        (the arrays stay out of it; ``to_dict()`` has every number)."""
        width, height = self.size
        top = self.predictions[0] if self.predictions else None
        best = f"{top.name!r} ({top.index}) {top.probability:.1%}" if top else "none"
        maps = ", ".join(
            f"{m.prediction.name!r}: " + (f"box {m.boxes[0].as_list()}" if m.boxes else "no box")
            for m in self.maps
        )
        return f"Result({self.name!r}, {width}x{height}, top {best}, maps [{maps}])"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: ``gapcam.schema.RESULT_FIELDS`` (docs/json.md)."""
        width, height = self.size
        return {
            "input": self.name,
            "width": width,
            "height": height,
            "predictions": [prediction_dict(p) for p in self.predictions],
            "maps": [
                {
                    **prediction_dict(m.prediction),
                    "boxes": [box_dict(b) for b in m.boxes],
                    "raw_min": m.raw_min,
                    "raw_max": m.raw_max,
                    "feature_size": list(m.low_res.shape),
                }
                for m in self.maps
            ],
            "notes": list(self.notes),
        }


#: Results keep their full-size normalised maps up to this many pixels (4 bytes per pixel per
#: map); for larger images ``Result.normalized`` makes them again when asked.
KEEP_MAPS_PIXELS = 1 << 21

#: Boxes come from the normalised maps at the image's own size for images of up to this many
#: pixels (every ordinary photo; the boxes are those of the full-size map, exactly). A larger
#: image's maps are made at its size scaled down to about this many pixels (``map_size``) and
#: its boxes scaled back up, outwards to whole pixels (``scale_boxes``): a box edge moves by
#: less than one map pixel, under 1/1400 of the image's side, while the map itself is the
#: bilinear upsampling of a feature grid of 7 to 20 cells a side, so the finer map holds
#: nothing more. Overlays are drawn from the same maps; the memory of a map no longer grows
#: with the image (8 MB per mapped class at most, instead of 480 MB at 120 megapixels).
MAP_PIXELS = 1 << 21


def map_size(width: int, height: int) -> tuple[int, int]:
    """(height, width) of the maps the boxes of a ``width`` x ``height`` image come from."""
    if width * height <= MAP_PIXELS:
        return height, width
    scale = math.sqrt(MAP_PIXELS / (width * height))
    rows = min(height, max(1, round(height * scale)))
    columns = min(width, max(1, round(width * scale)))
    if rows == 1:  # a sliver: its one row takes the whole allowance
        columns = min(width, MAP_PIXELS)
    elif columns == 1:
        rows = min(height, MAP_PIXELS)
    return rows, columns


def scale_boxes(
    boxes: tuple[Box, ...], size: tuple[int, int], image: tuple[int, int]
) -> tuple[Box, ...]:
    """Pixel-edge boxes on a map of ``size`` (height, width) as boxes on the ``image`` (height,
    width) it covers: edges moved outwards to whole image pixels, areas scaled."""
    (rows, columns), (height, width) = size, image
    if (rows, columns) == (height, width):
        return boxes
    return tuple(
        Box(
            int(b.x0) * width // columns,
            int(b.y0) * height // rows,
            -(-int(b.x1) * width // columns),
            -(-int(b.y1) * height // rows),
            round(b.area * (width * height) / (columns * rows)),
        )
        for b in boxes
    )


def normalized_maps(
    low: torch.Tensor,
    size: tuple[int, int],
    region: tuple[float, float, float, float],
    settings: Settings,
) -> tuple[np.ndarray, ...]:
    """1 x k x h x w maps -> k normalised H x W float32 arrays in original image coordinates."""
    return normalized_batch(low, size, region, settings)[0]


def normalized_batch(
    low: torch.Tensor,
    size: tuple[int, int],
    region: tuple[float, float, float, float],
    settings: Settings,
) -> list[tuple[np.ndarray, ...]]:
    """N x k x h x w maps of N images of the same size and region -> for each image, its k
    normalised H x W float32 arrays: one upsampling and one normalisation for them all, the
    same values as image by image. Each image gets its own array (copied out of the batch's
    when N > 1), so a Result holds its own maps only, as the memory budget charges them."""
    up = cam.normalize(cam.upsample(low, size, region), settings.normalize).cpu().numpy()
    return [tuple(image if len(up) == 1 else image.copy()) for image in up]


def box_dict(box: Box) -> dict[str, Any]:
    """One box as the JSON writes it (``gapcam.schema.BOX``)."""
    return {"xyxy": box.as_list(), "area": box.area}


def prediction_dict(p: Prediction) -> dict[str, Any]:
    return {"index": p.index, "name": p.name, "probability": p.probability, "logit": p.logit}

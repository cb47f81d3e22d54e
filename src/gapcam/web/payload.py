"""A localisation Result -> the JSON answer of ``POST /api/localize``.

Each class's normalised map travels as an 8-bit grayscale PNG (a data URL) at a capped size, so
the page can colour it, blend it and threshold it without another round trip. The boxes in the
answer are computed here, on the full-resolution float maps, at the requested threshold.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
from PIL import Image

from gapcam.boxes import boxes_from_map
from gapcam.result import Result, box_dict


def data_url(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    if fmt == "PNG":
        image.save(buffer, format="PNG", compress_level=6)
    else:
        image.save(buffer, format="JPEG", quality=88)
    mime = "image/png" if fmt == "PNG" else "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def capped_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) scaled down so that neither side exceeds ``max_side``."""
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def map_image(normalized: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """An H x W map in [0, 1] -> an 8-bit grayscale image of ``size`` (width, height)."""
    height, width = normalized.shape
    values = np.ascontiguousarray(normalized, dtype=np.float32)
    if size != (width, height):
        values = np.asarray(
            Image.fromarray(values).resize(size, Image.Resampling.BILINEAR), dtype=np.float32
        )
    return Image.fromarray(np.clip(values * 255.0 + 0.5, 0, 255).astype(np.uint8))


def build(
    result: Result, *, threshold: float, min_area: float, map_side: int, preview_side: int
) -> dict[str, Any]:
    """The API answer for one result but its ``elapsed_ms`` (``schemas.LOCALIZE_ANSWER``)."""
    entry = result.to_dict()
    width, height = result.size
    map_size = capped_size(width, height, map_side)
    for class_map, normalized in zip(entry["maps"], result.normalized, strict=True):
        boxes = boxes_from_map(normalized, threshold, min_area)
        class_map["boxes"] = [box_dict(b) for b in boxes]
        class_map["map_png"] = data_url(map_image(normalized, map_size))
    preview = None
    if preview_side > 0:
        image = result.image
        shown = capped_size(width, height, preview_side)
        if shown != (width, height):
            image = image.resize(shown, Image.Resampling.BILINEAR)
        preview = data_url(image, "JPEG")
    return {
        "input": entry["input"],
        "width": width,
        "height": height,
        "model": result.settings.model,
        "threshold": threshold,
        "min_area": min_area,
        "normalize": result.settings.normalize,
        "predictions": entry["predictions"],
        "maps": entry["maps"],
        "map_width": map_size[0],
        "map_height": map_size[1],
        "preview": preview,
        "notes": entry["notes"],
    }

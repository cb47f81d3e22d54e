"""Heatmap colouring, blending, box and caption drawing, grids. Images in, images out; no I/O."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from gapcam.types import Box

BOX_COLOURS = ((0, 255, 0), (255, 255, 0), (0, 255, 255), (255, 0, 255))


@lru_cache(maxsize=16)
def colormap_lut(name: str = "jet") -> np.ndarray:
    """A 256 x 3 uint8 lookup table for a matplotlib colormap name."""
    import matplotlib

    try:
        cmap = matplotlib.colormaps[name]
    except KeyError as exc:
        known = ", ".join(sorted(n for n in matplotlib.colormaps if not n.endswith("_r"))[:12])
        raise ValueError(f"cmap={name!r}: not a matplotlib colormap (e.g. {known}, ...)") from exc
    table = cmap(np.linspace(0.0, 1.0, 256))[:, :3]
    return np.ascontiguousarray((table * 255.0).round().astype(np.uint8))


#: Overlays are drawn with their shorter side at least MIN_SIDE pixels, their longer side at
#: most MAX_SIDE and at most MAX_PIXELS pixels in all (an 8x8 icon is enlarged so its caption
#: fits; a 12-megapixel photo is drawn at 2 megapixels). MAX_PIXELS is the size of a large
#: image's maps (``gapcam.result.MAP_PIXELS``, the same number), so its heatmap is drawn at
#: its own resolution, never resampled: the map is a bilinear upsampling of a grid of 7 to 20
#: cells a side, and a larger figure shows nothing more of where the network looked, at up to
#: 7x the cost of drawing and encoding it (docs/speed.md, "Overlays"). Boxes in results stay in
#: original pixels.
MIN_SIDE, MAX_SIDE, MAX_PIXELS = 224, 4096, 1 << 21


def colorize(normalized: np.ndarray, cmap: str = "jet") -> np.ndarray:
    """H x W map in [0, 1] -> H x W x 3 uint8 through a 256-entry lookup table."""
    return np.array(heat_image(normalized, cmap))  # a writable array, as before


def heat_image(normalized: np.ndarray, cmap: str = "jet") -> Image.Image:
    """``colorize`` as an RGB image: the map's 8-bit levels as a palette image of the colormap's
    lookup table, expanded by Pillow (one pass in C instead of a gather of three bytes a pixel
    in numpy)."""
    index = np.multiply(normalized, 255.0, dtype=np.float32)
    index += 0.5
    np.clip(index, 0, 255, out=index)
    levels = Image.fromarray(index.astype(np.uint8), "L")
    levels.putpalette(_palette(cmap))
    return levels.convert("RGB")


@lru_cache(maxsize=16)
def _palette(name: str) -> bytes:
    return colormap_lut(name).tobytes()


def blend(image: Image.Image, heat: np.ndarray | Image.Image, alpha: float = 0.5) -> Image.Image:
    """``(1 - alpha) * image + alpha * heat`` for an RGB image and an H x W x 3 uint8 heatmap
    (an array or an RGB image; computed by Pillow in 8 bits: no full-size float copies of
    large photos)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha}: must be between 0 and 1")
    return Image.blend(
        image, heat if isinstance(heat, Image.Image) else Image.fromarray(heat), alpha
    )


def display_scale(
    size: tuple[int, int],
    min_side: int = MIN_SIDE,
    max_side: int = MAX_SIDE,
    max_pixels: int = MAX_PIXELS,
) -> float:
    """The factor that brings an image of ``size`` (width, height) within the display bounds."""
    width, height = size
    if width * height > max_pixels:
        return min(math.sqrt(max_pixels / (width * height)), max_side / max(width, height))
    if max(width, height) > max_side:
        return max_side / max(width, height)
    if min(width, height) < min_side:
        return min(min_side / min(width, height), max_side / max(width, height))
    return 1.0


def fit_for_display(
    image: Image.Image, normalized: np.ndarray, boxes: Sequence[Box]
) -> tuple[Image.Image, np.ndarray, tuple[Box, ...]]:
    """Image, map and boxes rescaled together by ``display_scale`` (unchanged when 1). The map
    may have a size of its own (a large image's, ``gapcam.result.map_size``): it is brought to
    the figure's size, and left as it is when it has that size already."""
    scale = display_scale(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    method = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.BILINEAR
    if normalized.shape != (size[1], size[0]):
        normalized = np.asarray(
            Image.fromarray(np.asarray(normalized, dtype=np.float32), "F").resize(size, method)
        )
    if scale == 1.0:
        return image, normalized, tuple(boxes)
    sx, sy = size[0] / image.width, size[1] / image.height
    scaled = tuple(Box(b.x0 * sx, b.y0 * sy, b.x1 * sx, b.y1 * sy, b.area) for b in boxes)
    return image.resize(size, method), normalized, scaled


def _line_width(image: Image.Image) -> int:
    return max(2, round(min(image.size) / 150))


def draw_boxes(image: Image.Image, boxes: Sequence[Box], primary_only: bool = False) -> Image.Image:
    """Draw boxes (the first, the largest component, thickest) on a copy of ``image``."""
    out = image.copy()
    draw = ImageDraw.Draw(out)
    width = _line_width(image)
    for rank, box in enumerate(boxes[:1] if primary_only else boxes):
        colour = BOX_COLOURS[0] if rank == 0 else BOX_COLOURS[1]
        line = width if rank == 0 else max(1, width // 2)
        draw.rectangle((box.x0, box.y0, box.x1 - 1, box.y1 - 1), outline=colour, width=line)
    return out


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


#: a caption is cut to this many characters before it is measured (far more than the widest
#: figure holds: about 28 times the font size), so any class name costs the same
CAPTION_LIMIT = 200
#: what would break the one line of a caption (Pillow draws a newline as a second line), shown
#: escaped as ``gapcam.console.safe_text`` shows it; callers pass class names through that
_BREAKS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _one_line(text: str) -> str:
    """``text`` as one bounded line: line breaks and other control characters escaped
    (``\\n``, ``\\x1b``), at most ``CAPTION_LIMIT`` characters and an ellipsis."""
    line = _BREAKS.sub(lambda m: ascii(m.group(0))[1:-1], text[: CAPTION_LIMIT + 1])
    return line if len(line) <= CAPTION_LIMIT else line[:CAPTION_LIMIT] + "…"


def add_caption(image: Image.Image, text: str) -> Image.Image:
    """Put ``text`` on a dark band above the image (the image itself is not covered), on one
    line (``_one_line``), shortened with an ellipsis to the width of the image."""
    size = max(12, round(image.width / 28))
    font = _font(size)
    band = round(size * 1.6)
    out = Image.new("RGB", (image.width, image.height + band), (20, 20, 20))
    out.paste(image, (0, band))
    draw = ImageDraw.Draw(out)
    text = _one_line(text)
    while len(text) > 4 and draw.textlength(text, font=font) > image.width - size:
        text = text[:-2].rstrip() + "…" if not text.endswith("…") else text[:-2] + "…"
    draw.text((size // 2, (band - size) // 2), text, fill=(255, 255, 255), font=font)
    return out


def render(
    image: Image.Image,
    normalized: np.ndarray,
    boxes: Sequence[Box] = (),
    caption: str | None = None,
    alpha: float = 0.5,
    cmap: str = "jet",
) -> Image.Image:
    """The CAM figure: heatmap blended on the photo, boxes, and a caption band."""
    image, normalized, boxes = fit_for_display(image, normalized, boxes)
    out = blend(image, heat_image(normalized, cmap), alpha)
    if boxes:
        out = draw_boxes(out, boxes)
    if caption:
        out = add_caption(out, caption)
    return out


def grid(panels: Sequence[Image.Image], columns: int | None = None, gap: int = 4) -> Image.Image:
    """Panels side by side (``columns`` per row, default all in one row up to 5)."""
    if not panels:
        raise ValueError("grid needs at least one panel")
    columns = columns or min(len(panels), 5)
    rows = -(-len(panels) // columns)
    cell_w = max(p.width for p in panels)
    cell_h = max(p.height for p in panels)
    out = Image.new(
        "RGB",
        (columns * cell_w + (columns - 1) * gap, rows * cell_h + (rows - 1) * gap),
        (255,) * 3,
    )
    for i, panel in enumerate(panels):
        row, col = divmod(i, columns)
        out.paste(panel, (col * (cell_w + gap), row * (cell_h + gap)))
    return out

"""A synthetic weakly-supervised localization dataset with known boxes (``gapcam synth``).

Each image holds one object of its class (circle, square, triangle, star, stripes, cross) at
a random position, scale and rotation, in a random colour, on a cluttered background (colour
gradient, noise, random lines, soft blobs). Colours are drawn from one palette for objects and
clutter alike, so colour says nothing about the class: only the shape does.

Layout written under ``OUT``::

    OUT/train/<class>/<class>-0000.png ...   OUT/train/boxes.csv
    OUT/val/<class>/<class>-0000.png ...     OUT/val/boxes.csv
    OUT/synth.json                            the settings, for the record

``boxes.csv`` has a header line ``path,label,x0,y0,x1,y1`` and one row per image: the path
relative to the CSV's folder, the class name, and the tight box of the drawn object's pixels in
inclusive pixel coordinates (``x1``/``y1`` are the last column/row of the object), the
convention of the CSV layout that ``gapcam evaluate`` reads (wsolevaluation's). In memory,
``Sample.box`` uses gapcam's pixel-edge convention (``x1``/``y1`` exclusive, see ``gapcam.boxes``).
Every image comes from its own seeded generator (seed, split, class, index), so the same seed
gives the same files, and asking for more images keeps the first ones unchanged.
"""

from __future__ import annotations

import json
import math
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from gapcam.errors import OutputError

SHAPES = ("circle", "square", "triangle", "star", "stripes", "cross")
SPLITS = {"train": 0, "val": 1}
CSV_NAME = "boxes.csv"
CSV_HEADER = "path,label,x0,y0,x1,y1"
#: image sides ``generate`` accepts (each image is drawn in memory, with float noise: about
#: 40 bytes a pixel, 170 MB at the largest)
MIN_SIZE, MAX_SIZE = 32, 2048

#: Object and clutter colours: one shared palette, so colour is no clue to the class.
PALETTE = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (250, 250, 250),
    (20, 20, 20),
)


@dataclass(frozen=True)
class Sample:
    """One rendered image, its object mask (H x W bool), object colour and true box."""

    image: Image.Image
    mask: np.ndarray
    colour: tuple[int, int, int]
    box: tuple[int, int, int, int]


def render_sample(shape: str, size: int, rng: np.random.Generator) -> Sample:
    """One ``size`` x ``size`` image of ``shape`` on clutter; its box encloses the object exactly."""
    if shape not in SHAPES:
        raise ValueError(f"shape {shape!r}: use one of {', '.join(SHAPES)}")
    canvas = _background(size, rng)
    _clutter(canvas, size, rng)
    noisy = np.asarray(canvas, dtype=np.float32) + rng.normal(0.0, 10.0, (size, size, 3))
    array = np.clip(noisy, 0, 255).astype(np.uint8)
    mask = _shape_mask(shape, size, rng)
    colour = _contrasting_colour(array, mask, rng)
    array[mask] = colour
    rows, cols = np.nonzero(mask)
    box = (int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1)
    return Sample(Image.fromarray(array), mask, colour, box)


def _background(size: int, rng: np.random.Generator) -> Image.Image:
    a, b = rng.uniform(40, 215, 3), rng.uniform(40, 215, 3)
    ramp = np.linspace(0.0, 1.0, size)[:, None]
    angle = rng.uniform(0, 2 * math.pi)
    t = (np.cos(angle) * ramp + np.sin(angle) * ramp.T + 1.0) / 2.0
    array = a[None, None, :] * (1 - t[..., None]) + b[None, None, :] * t[..., None]
    return Image.fromarray(array.astype(np.uint8))


def _clutter(canvas: Image.Image, size: int, rng: np.random.Generator) -> None:
    blobs = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(blobs)
    for _ in range(int(rng.integers(2, 5))):
        cx, cy = rng.uniform(0, size, 2)
        rx, ry = rng.uniform(0.05, 0.2, 2) * size
        colour = PALETTE[int(rng.integers(len(PALETTE)))]
        draw.ellipse(
            (cx - rx, cy - ry, cx + rx, cy + ry), fill=(*colour, int(rng.integers(70, 150)))
        )
    blurred = blobs.filter(ImageFilter.GaussianBlur(size / 40))
    canvas.paste(blurred, (0, 0), blurred)
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0, x1, y1 = rng.uniform(0, size, 4)
        colour = PALETTE[int(rng.integers(len(PALETTE)))]
        draw.line((x0, y0, x1, y1), fill=colour, width=int(rng.integers(1, 4)))


def _contrasting_colour(
    array: np.ndarray, mask: np.ndarray, rng: np.random.Generator
) -> tuple[int, int, int]:
    """A palette colour far enough from the background under the object to be seen."""
    under = array[mask].astype(np.float32).mean(axis=0)
    order = rng.permutation(len(PALETTE))
    for index in order:
        colour = np.array(PALETTE[index], dtype=np.float32)
        if float(np.abs(colour - under).sum()) > 150.0:
            return PALETTE[index]
    return PALETTE[int(order[0])]


def _shape_mask(shape: str, size: int, rng: np.random.Generator) -> np.ndarray:
    radius = rng.uniform(0.14, 0.3) * size
    cx, cy = rng.uniform(radius + 1, size - radius - 1, 2)
    theta = rng.uniform(0, 2 * math.pi)
    if shape == "stripes":
        return _stripes(size, cx, cy, radius, theta)
    image = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=255)
    else:
        draw.polygon(_polygon(shape, cx, cy, radius, theta), fill=255)
    return np.asarray(image) > 0


def _polygon(
    shape: str, cx: float, cy: float, radius: float, theta: float
) -> list[tuple[float, float]]:
    if shape == "square":
        points = [(radius, math.pi / 4 + k * math.pi / 2) for k in range(4)]
    elif shape == "triangle":
        points = [(radius, k * 2 * math.pi / 3) for k in range(3)]
    elif shape == "star":
        points = [(radius if k % 2 == 0 else 0.42 * radius, k * math.pi / 5) for k in range(10)]
    else:  # cross: a plus sign with arms 0.6 * radius wide
        w, r = 0.3, 1.0
        corners = [(w, r), (w, w), (r, w), (r, -w), (w, -w), (w, -r)]
        corners += [(-w, -r), (-w, -w), (-r, -w), (-r, w), (-w, w), (-w, r)]
        points = [(radius * math.hypot(x, y), math.atan2(y, x)) for x, y in corners]
    return [(cx + r * math.cos(a + theta), cy + r * math.sin(a + theta)) for r, a in points]


def _stripes(size: int, cx: float, cy: float, radius: float, theta: float) -> np.ndarray:
    """Parallel bands filling a rotated square patch: a texture, not a silhouette."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    u = (xs - cx) * math.cos(theta) + (ys - cy) * math.sin(theta)
    v = -(xs - cx) * math.sin(theta) + (ys - cy) * math.cos(theta)
    half = radius / math.sqrt(2)
    period = max(4.0, radius / 2.5)
    inside = (np.abs(u) <= half) & (np.abs(v) <= half)
    return inside & (np.floor((u + half) / period) % 2 == 0)


def generate(
    out: str | Path,
    *,
    classes: int | Sequence[str] = 3,
    per_class: int = 40,
    val_per_class: int | None = None,
    size: int = 160,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, int]:
    """Write the dataset under ``out``; returns the number of images per split."""
    names = _class_names(classes)
    val_count = max(2, per_class // 4) if val_per_class is None else val_per_class
    if per_class < 1:
        raise OutputError(f"per_class={per_class}: give at least 1 image per class")
    if val_count < 1:
        raise OutputError(f"val_per_class={val_count}: give at least 1 image per class")
    if size < MIN_SIZE:
        raise OutputError(f"size={size}: give a size of at least {MIN_SIZE} pixels")
    if size > MAX_SIZE:
        raise OutputError(f"size={size}: at most {MAX_SIZE} pixels a side; give a smaller size=")
    root = Path(out)
    _check_target(root, overwrite)
    root.parent.mkdir(parents=True, exist_ok=True)
    # written into a folder of its own beside OUT and renamed to OUT when whole: an interrupted
    # run leaves no partial dataset, and an existing one is replaced only then
    staging = root.parent / f".{root.name[:200]}.synth-{uuid.uuid4().hex[:12]}"
    staging.mkdir()  # with the umask's mode, as the folder it becomes
    try:
        counts = _write(staging, names, per_class, val_count, size, seed)
        _check_target(root, overwrite)  # as it is now
        _replace(root, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return counts


def _write(
    root: Path, names: tuple[str, ...], per_class: int, val_count: int, size: int, seed: int
) -> dict[str, int]:
    from gapcam._version import __version__
    from gapcam.outputs import atomic_write, encode_image

    counts = {}
    for split, count in (("train", per_class), ("val", val_count)):
        rows = [CSV_HEADER]
        for name in names:
            for index in range(count):
                rng = np.random.default_rng([seed, SPLITS[split], SHAPES.index(name), index])
                sample = render_sample(name, size, rng)
                relative = f"{name}/{name}-{index:04d}.png"
                atomic_write(root / split / relative, encode_image(sample.image), overwrite=True)
                x0, y0, x1, y1 = sample.box
                rows.append(",".join([relative, name, *map(str, (x0, y0, x1 - 1, y1 - 1))]))
        atomic_write(root / split / CSV_NAME, ("\n".join(rows) + "\n").encode(), overwrite=True)
        counts[split] = count * len(names)
    settings = {"classes": list(names), "per_class": per_class, "val_per_class": val_count}
    document = {"generator": "gapcam.synthetic", "gapcam_version": __version__, "seed": seed}
    document |= {"size": size, **settings, "csv_header": CSV_HEADER}
    atomic_write(
        root / "synth.json", (json.dumps(document, indent=2) + "\n").encode(), overwrite=True
    )
    return counts


def _class_names(classes: int | Sequence[str]) -> tuple[str, ...]:
    if isinstance(classes, int):
        if not 2 <= classes <= len(SHAPES):
            raise OutputError(f"classes={classes!r}: give 2 to {len(SHAPES)} classes")
        return SHAPES[:classes]
    names = tuple(classes)
    unknown = [n for n in names if n not in SHAPES]
    if unknown or len(set(names)) != len(names) or len(names) < 2:
        raise OutputError(
            f"classes {list(names)}: give 2 or more distinct names from {', '.join(SHAPES)}"
        )
    return names


def _check_target(root: Path, overwrite: bool) -> None:
    """Refuse a non-empty folder; with ``overwrite``, replace only a dataset made by gapcam."""
    if root.exists() and not root.is_dir():
        raise OutputError(f"{root}: is a file; give a folder for the dataset")
    if not root.is_dir() or not any(root.iterdir()):
        return
    if not overwrite:
        raise OutputError(
            f"{root}: folder is not empty; pass overwrite=True or choose another folder"
        )
    if not (root / "synth.json").is_file():
        raise OutputError(
            f"{root}: not a dataset made by `gapcam synth` (no synth.json); refusing to "
            "delete its contents even with overwrite=True; choose another folder"
        )


def _replace(root: Path, staging: Path) -> None:
    """``staging`` renamed to ``root``; an empty folder or a dataset there (``_check_target``
    allowed it) removed once the new one is in its place."""
    if not root.exists():
        staging.rename(root)
        return
    old = staging.with_name(staging.name + ".old")
    root.rename(old)
    try:
        staging.rename(root)
    except BaseException:
        old.rename(root)
        raise
    shutil.rmtree(old, ignore_errors=True)

"""What every reader shares: parsed entries, the problem list, validation against the images."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from gapcam.errors import GapcamError

BoxValues = tuple[float, float, float, float]

#: Turns a label as written in the annotations (index, name, WordNet id) into a class index;
#: raises a GapcamError saying why when it cannot.
Resolve = Callable[[str], int]

MAX_LISTED = 25


@dataclass(frozen=True)
class Sample:
    """One image and class to evaluate, with its ground truth.

    ``boxes`` are inclusive pixel coordinates as annotated; ``size`` is (width, height) of the
    image as gapcam shows it (EXIF orientation applied).
    """

    name: str
    path: Path
    label: int
    boxes: tuple[BoxValues, ...]
    size: tuple[int, int]
    masks: tuple[Path, ...] = ()
    ignore: Path | None = None


@dataclass(frozen=True)
class Dataset:
    """The samples of a validated annotation set, and the problems of what was left out."""

    source: Path
    layout: str
    samples: tuple[Sample, ...]
    skipped: tuple[str, ...] = ()
    class_table: tuple[tuple[int, str, str], ...] = ()  # (index, WordNet id, file:line)

    @property
    def box_count(self) -> int:
        return sum(len(s.boxes) for s in self.samples)


@dataclass
class Entry:
    """An annotated image as parsed, before validation. ``image`` is the image's id in the
    annotations (problems are tied to it), ``name`` the sample's name, ``where`` a file:line."""

    image: str
    path: Path
    where: str
    name: str = ""
    label: str | None = None
    label_where: str = ""
    boxes: list[tuple[BoxValues, str]] = field(default_factory=list)
    size: tuple[int, int] | None = None
    size_where: str = ""
    masks: list[tuple[Path, str]] = field(default_factory=list)
    ignore: Path | None = None

    def __post_init__(self) -> None:
        self.name = self.name or self.image


class Problems:
    """Problems found while reading, each tied to an image id (or to none)."""

    def __init__(self) -> None:
        self.found: list[tuple[str, str | None]] = []
        self.images: set[str] = set()

    @property
    def messages(self) -> list[str]:
        return [message for message, _ in self.found]

    def add(self, where: str, message: str, image: str | None = None) -> None:
        self.found.append((f"{where}: {message}", image))
        if image is not None:
            self.images.add(image)

    def keep_only(self, images: set[str]) -> None:
        """Forget the problems of other images (those left out by a limit)."""
        self.found = [(m, i) for m, i in self.found if i is None or i in images]
        self.images &= images

    def report(self, source: Path) -> str:
        listed = "\n  ".join(self.messages[:MAX_LISTED])
        extra = len(self.messages) - MAX_LISTED
        more = f"\n  ... and {extra} more" if extra > 0 else ""
        return (
            f"{source}: {len(self.messages)} problem(s) in the annotations, and no metric is "
            "reported over silently dropped images. Fix them, or pass skip_invalid=True to leave "
            f"the affected images out (the results then list them):\n  {listed}{more}"
        )


def read_lines(path: Path) -> list[tuple[str, list[str]]]:
    """Non-blank lines of a comma-separated text file as (``file:line``, stripped fields)."""
    from gapcam.errors import DatasetError

    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read it as UTF-8 text ({exc})") from exc
    return [
        (f"{path}:{number}", [cell.strip() for cell in line.split(",")])
        for number, line in enumerate(text.splitlines(), 1)
        if line.strip()
    ]


def parse_box(cells: Sequence[str], where: str, problems: Problems, image: str) -> BoxValues | None:
    """Four finite numbers (x0, y0, x1, y1), or None after reporting the bad one."""
    values = []
    for axis, text in zip(("x0", "y0", "x1", "y1"), cells, strict=True):
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            problems.add(where, f"{image}: {axis}={text!r} is not a number", image)
            return None
        values.append(value)
    return (values[0], values[1], values[2], values[3])


def parse_int(text: str, what: str, where: str, problems: Problems, image: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        problems.add(where, f"{image}: {what}={text!r} is not an integer", image)
        return None


def validate(entry: Entry, resolve: Resolve, problems: Problems) -> Sample | None:
    """Check one parsed entry against its image and the label resolver."""
    label = None
    if entry.label is None:
        problems.add(entry.where, f"{entry.image}: no class label", entry.image)
    else:
        try:
            label = resolve(entry.label)
        except GapcamError as exc:
            problems.add(entry.label_where, f"{entry.image}: unknown label ({exc})", entry.image)
    size = image_size(entry, problems)
    if not entry.boxes and not entry.masks and entry.image not in problems.images:
        problems.add(entry.where, f"{entry.image}: no box (nor mask) for this image", entry.image)
    for mask, where in entry.masks:
        if not mask.is_file():
            problems.add(where, f"{entry.image}: mask file {mask} is missing", entry.image)
    if size is not None:
        for box, where in entry.boxes:
            check_box(box, size, where, entry.image, problems)
    if label is None or size is None:
        return None
    return Sample(
        entry.name,
        entry.path,
        label,
        tuple(box for box, _ in entry.boxes),
        size,
        tuple(mask for mask, _ in entry.masks),
        entry.ignore,
    )


def check_box(
    box: BoxValues, size: tuple[int, int], where: str, image: str, problems: Problems
) -> None:
    """x1 >= x0, y1 >= y0, and inside the image: 0 <= x <= width, 0 <= y <= height."""
    x0, y0, x1, y1 = box
    width, height = size
    shown = f"box ({x0:g}, {y0:g}, {x1:g}, {y1:g})"
    if x1 < x0 or y1 < y0:
        problems.add(where, f"{image}: {shown} has {'x1 < x0' if x1 < x0 else 'y1 < y0'}", image)
    elif min(x0, y0) < 0 or x1 > width or y1 > height:
        problems.add(where, f"{image}: {shown} is outside the {width}x{height} image", image)


def image_size(entry: Entry, problems: Problems) -> tuple[int, int] | None:
    """(width, height) from the image's header, EXIF orientation applied; None if unreadable."""
    if not entry.path.is_file():
        problems.add(entry.where, f"{entry.image}: image file {entry.path} is missing", entry.image)
        return None
    try:
        with Image.open(entry.path) as image:
            raw = image.size
            turned = image.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        message = f"{entry.image}: {entry.path} is not a readable image ({exc})"
        problems.add(entry.where, message, entry.image)
        return None
    size = (raw[1], raw[0]) if turned else raw
    if entry.size is not None and entry.size != size:
        hint = " (the annotation ignores its EXIF rotation)" if entry.size == raw else ""
        problems.add(
            entry.size_where,
            f"{entry.image}: annotated as {entry.size[0]}x{entry.size[1]} but the image is "
            f"{size[0]}x{size[1]}{hint}",
            entry.image,
        )
    return size

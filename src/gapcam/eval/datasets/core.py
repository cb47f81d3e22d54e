"""What every reader shares: parsed entries, the problem list, validation against the images."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from gapcam.console import safe_text
from gapcam.errors import DatasetError, GapcamError
from gapcam.images import DEFAULT_MAX_PIXELS

BoxValues = tuple[float, float, float, float]

#: Turns a label as written in the annotations (index, name, WordNet id) into a class index;
#: raises a GapcamError saying why when it cannot.
Resolve = Callable[[str], int]

MAX_LISTED = 25
#: the longest line of a problem as listed (what the annotations quote in it is cut)
MAX_PROBLEM = 300
#: the largest annotation file read (a list, a CSV; one XML file has its own, smaller limit)
MAX_ANNOTATION_BYTES = 64 * 1024 * 1024


#: the suffixes of the annotation files ``Dataset.input_files`` finds in a dataset's folder
ANNOTATION_SUFFIXES = frozenset({".txt", ".csv", ".xml"})


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

    def input_files(self) -> Iterator[Path]:
        """The files this set was read from: its annotation files (the CSV, or every
        ``ANNOTATION_SUFFIXES`` file in its folder's tree), the samples' images and masks."""
        if self.source.is_file():
            yield self.source
        else:
            for folder, _, names in os.walk(self.source):  # links to folders not followed
                for name in names:
                    if os.path.splitext(name)[1].lower() in ANNOTATION_SUFFIXES:
                        yield Path(folder, name)
        for sample in self.samples:
            yield sample.path
            yield from sample.masks
            if sample.ignore is not None:
                yield sample.ignore


@dataclass
class Entry:
    """An annotated image as parsed, before validation. ``image`` is the image's id in the
    annotations (problems are tied to it), ``name`` the sample's name, ``where`` a file:line."""

    image: str
    path: Path | None  # None: the annotations name a path outside the root (a problem listed)
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
        """One problem at ``where`` (file:line), listed on one printable line (``safe_text``:
        what the annotations quote in it may hold anything)."""
        self.found.append((safe_text(f"{where}: {message}", limit=MAX_PROBLEM), image))
        if image is not None:
            self.images.add(image)

    def keep_only(self, images: set[str]) -> None:
        """Forget the problems of other images (those left out by a limit)."""
        self.found = [(m, i) for m, i in self.found if i is None or i in images]
        self.images &= images

    def error(self, source: Path) -> DatasetError:
        """What to do, with the problems as its ``details`` (``listed``)."""
        summary = (
            f"{safe_text(source)}: {len(self.messages)} problem(s) in the annotations; no metric "
            "is reported over silently dropped images: fix them, or pass skip_invalid=True to "
            "leave the affected images out (the results then list them)"
        )
        return DatasetError(summary, details=self.listed())

    def listed(self) -> tuple[str, ...]:
        """The first ``MAX_LISTED`` problems, one printable line each, and how many more."""
        extra = len(self.messages) - MAX_LISTED
        more = [f"... and {extra} more"] if extra > 0 else []
        return (*self.messages[:MAX_LISTED], *more)


def read_text(path: Path, limit: int = MAX_ANNOTATION_BYTES) -> str:
    """An annotation file as text: UTF-8 (a byte-order mark allowed), at most ``limit`` bytes;
    else a one-line DatasetError."""
    try:
        with path.open("rb") as stream:
            data = stream.read(limit + 1)
    except OSError as exc:
        raise DatasetError(f"{safe_text(path)}: cannot read it ({exc.strerror or exc})") from exc
    if len(data) > limit:
        raise DatasetError(
            f"{safe_text(path)}: over {limit:,} bytes; not an annotation file gapcam reads"
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{safe_text(path)}: cannot read it as UTF-8 text ({exc})") from exc


def locate(root: Path, text: str) -> Path | None:
    """``root / text``, the file an annotation names, when it stays inside ``root``; else None.

    Inside means: the path resolved (symlinks and ``..`` followed to where they really lead) is
    under the resolved root, or ``text`` only descends from the root (no ``..``: a symlink the
    dataset itself holds is followed, as its owner meant; annotations cannot leave the tree).
    An absolute ``text`` counts only when it is under the root.
    """
    if "\x00" in text:
        return None
    path = root / text
    try:
        base = os.path.realpath(root)
        if Path(os.path.realpath(path)).is_relative_to(base):
            return path
    except (OSError, ValueError):
        return None
    plain = ".." not in Path(text).parts
    return (
        path
        if plain and Path(os.path.abspath(path)).is_relative_to(os.path.abspath(root))
        else None
    )


def outside(image: str, text: str, root: Path) -> str:
    """The problem of an annotated path (``text``, the image's own or a mask's) that leaves
    ``root``."""
    named = "the path" if text == image else f"path {text!r}"
    return (
        f"{image}: {named} leaves {root}; refused (keep paths inside it, or pass images= a "
        "folder holding them)"
    )


def read_lines(path: Path) -> list[tuple[str, list[str]]]:
    """Non-blank lines of a comma-separated text file as (``file:line``, stripped fields)."""
    text = read_text(path)
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
        problem = mask_problem(mask)
        if problem is not None:
            problems.add(where, f"{entry.image}: {problem}", entry.image)
    if size is not None:
        for box, where in entry.boxes:
            check_box(box, size, where, entry.image, problems)
    if label is None or size is None or entry.path is None:
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
    """(width, height) from the image's header, EXIF orientation applied; None if unreadable.

    Pillow's warnings while reading a header (a decompression-bomb size, odd EXIF data) are
    not printed: the pixel limit is checked here, and the image's own reading later names
    anything else."""
    if entry.path is None:
        return None
    if not entry.path.is_file():
        problems.add(entry.where, f"{entry.image}: image file {entry.path} is missing", entry.image)
        return None
    try:
        raw, turned = _header(entry.path)
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        message = f"{entry.image}: {entry.path} is not a readable image ({exc})"
        problems.add(entry.where, message, entry.image)
        return None
    except Image.DecompressionBombError:  # over twice Pillow's own limit
        problems.add(entry.where, f"{entry.image}: {too_large(entry.path)}", entry.image)
        return None
    if raw[0] * raw[1] > DEFAULT_MAX_PIXELS:
        problems.add(entry.where, f"{entry.image}: {too_large(entry.path, raw)}", entry.image)
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


def _header(path: Path, orientation: bool = True) -> tuple[tuple[int, int], bool]:
    """(width, height) as stored, and whether the EXIF orientation turns it by 90 degrees
    (looked up only within the pixel limit: Pillow decodes a PNG to find its EXIF)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(path) as image:
            size = image.size
            if not orientation or size[0] * size[1] > DEFAULT_MAX_PIXELS:
                return size, False
            return size, image.getexif().get(0x0112, 1) in (5, 6, 7, 8)


def too_large(path: Path, size: tuple[int, int] | None = None) -> str:
    """The problem of a file whose header declares more than ``DEFAULT_MAX_PIXELS`` pixels."""
    shown = f" is {size[0]}x{size[1]} pixels," if size else ""
    return (
        f"{path}{shown} over the limit of {DEFAULT_MAX_PIXELS:,} pixels (decompression-bomb "
        "guard); nothing of it was decoded"
    )


def mask_problem(path: Path) -> str | None:
    """Why the mask file ``path`` cannot be used (missing, unreadable, too large), or None."""
    if not path.is_file():
        return f"mask file {path} is missing"
    try:
        size, _ = _header(path, orientation=False)
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        return f"mask {path} is not a readable image ({exc})"
    except Image.DecompressionBombError:
        return f"mask {too_large(path)}"
    if size[0] * size[1] > DEFAULT_MAX_PIXELS:
        return f"mask {too_large(path, size)}"
    return None

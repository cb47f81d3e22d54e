"""Box-annotated evaluation sets in three layouts; every malformed entry named by file and line.

- ``wsol``: the metadata layout of clovaai/wsolevaluation: ``image_ids.txt`` (one image path a
  line), ``class_labels.txt`` (``path,label``), ``localization.txt`` (``path,x0,y0,x1,y1``, one
  line per box; or ``path,mask,ignore`` lines for masks), optional ``image_sizes.txt``
  (``path,width,height``) and ``class_names.txt`` (``index,wordnet_id,name``);
- ``voc``: Pascal VOC / ImageNet XML files (``Annotations/`` or the folder itself), images found
  beside them, in ``JPEGImages/``, ``images/`` or ImageNet's ``Data/`` mirror;
- ``csv``: one file of ``path,label,x0,y0,x1,y1`` rows, one per box (optional header row).

Boxes are inclusive pixel coordinates (wsolevaluation's convention), used as given, floats too;
a box must satisfy ``0 <= x0 <= x1 <= width`` (and the same for y). Labels go through the
caller's ``resolve`` function (this package knows no models). An image whose objects carry
several labels becomes one sample per label (``image#label``). Every problem (missing image,
box outside the image, x1 < x0, unknown label, bad number, ...) is collected with its
``file:line``; then one ``DatasetError`` lists them all, unless ``skip_invalid`` is set: the
affected images are then left out and the problems listed in ``Dataset.skipped``.

Annotation files are untrusted text. Every path they name (an image, a mask, a VOC
``<filename>``) must stay inside the root it is relative to: the dataset folder (the CSV's
folder), or ``images`` when given; ``../../etc/passwd`` or an absolute path elsewhere is a
problem like any other, and the file is never opened. The rule (``core.locate``): the path,
resolved, lies under the resolved root, or it only descends from the root (no ``..``). So a
symlink inside the dataset (an image folder linked from another disk) is followed: it is the
dataset owner's choice, and annotations cannot climb out through it. Files are read with
limits (``core.MAX_ANNOTATION_BYTES``; 1 MiB for one XML file); images and masks whose header
declares more than ``gapcam.images.DEFAULT_MAX_PIXELS`` pixels are problems, found from the
header alone; every listed problem is one printable line of at most ``core.MAX_PROBLEM``
characters (``gapcam.console.safe_text``).
"""

from __future__ import annotations

from pathlib import Path

from gapcam.console import safe_text
from gapcam.errors import DatasetError
from gapcam.eval.datasets.core import (
    Dataset,
    Entry,
    Problems,
    Resolve,
    Sample,
    validate,
)
from gapcam.types import DATASET_LAYOUTS

LAYOUTS = DATASET_LAYOUTS

__all__ = ["LAYOUTS", "Dataset", "Sample", "detect_layout", "load_dataset"]


def load_dataset(
    data: str | Path,
    resolve: Resolve,
    *,
    layout: str = "auto",
    split: str | None = None,
    images: str | Path | None = None,
    limit: int | None = None,
    skip_invalid: bool = False,
) -> Dataset:
    """Read and validate an annotation set.

    ``images``: the folder image (and mask) paths are relative to, when not the data folder
    (the CSV's folder for a CSV); ``limit``: keep the first N annotated images, in file order,
    before the images are checked; ``split``: a wsolevaluation split folder, a VOC
    ``ImageSets/Main/SPLIT.txt`` or ImageNet's ``Annotations/CLS-LOC/SPLIT``.
    """
    source = Path(data)
    if not source.exists():
        raise DatasetError(
            f"{safe_text(source)}: no such file or folder; give a dataset folder or CSV file"
        )
    if layout not in LAYOUTS:
        raise DatasetError(f"layout={layout!r}: use one of {', '.join(LAYOUTS)}")
    chosen = detect_layout(source, split) if layout == "auto" else layout
    problems = Problems()
    entries, table = _read(source, chosen, split, Path(images) if images else None, problems)
    if limit is not None:
        entries = _first_images(entries, limit)
        problems.keep_only({entry.image for entry in entries})
    checked = [(entry.image, validate(entry, resolve, problems)) for entry in entries]
    if problems.messages and not skip_invalid:
        raise problems.error(source)
    samples = tuple(s for image, s in checked if s is not None and image not in problems.images)
    if not samples:
        raise DatasetError(
            f"{safe_text(source)}: no image left to evaluate", details=problems.listed()
        )
    return Dataset(source, chosen, samples, tuple(problems.messages), table)


def _read(
    source: Path, layout: str, split: str | None, images: Path | None, problems: Problems
) -> tuple[list[Entry], tuple[tuple[int, str, str], ...]]:
    from gapcam.eval.datasets import readers, voc

    if layout == "wsol":
        folder = source / split if split else source
        return readers.read_wsol(folder, images or folder, problems)
    if layout == "voc":
        if not source.is_dir():
            raise DatasetError(f"{safe_text(source)}: the voc layout needs a folder")
        return voc.read_voc(source, split, images, problems), ()
    csv_file = source if source.is_file() else _only_csv(source)
    return readers.read_csv(csv_file, images or csv_file.parent, problems), ()


def _first_images(entries: list[Entry], limit: int) -> list[Entry]:
    """The entries of the first ``limit`` distinct images."""
    kept: dict[str, None] = {}
    for entry in entries:
        if entry.image not in kept and len(kept) >= limit:
            continue
        kept[entry.image] = None
    return [entry for entry in entries if entry.image in kept]


def detect_layout(source: Path, split: str | None = None) -> str:
    """``wsol``, ``voc`` or ``csv`` from what the file or folder holds."""
    if source.is_file():
        if source.suffix.lower() == ".csv":
            return "csv"
        raise DatasetError(
            f"{safe_text(source)}: a file must be a .csv of path,label,x0,y0,x1,y1 rows"
        )
    if (source / "image_ids.txt").is_file() or (
        split and (source / split / "image_ids.txt").is_file()
    ):
        return "wsol"
    splits = sorted(p.parent.name for p in source.glob("*/image_ids.txt"))
    if splits:
        raise DatasetError(
            f"{safe_text(source)}: wsolevaluation metadata for the splits "
            f"{safe_text(', '.join(splits))}; pick one with split="
        )
    if (source / "Annotations").is_dir() or next(source.glob("*.xml"), None) is not None:
        return "voc"
    if len(list(source.glob("*.csv"))) == 1:
        return "csv"
    raise DatasetError(
        f"{safe_text(source)}: not a known layout; expected wsolevaluation metadata "
        "(image_ids.txt, class_labels.txt, localization.txt), VOC/ImageNet XML (Annotations/ "
        "or *.xml files) "
        "or one CSV file of path,label,x0,y0,x1,y1 rows; or pass layout="
    )


def _only_csv(folder: Path) -> Path:
    found = sorted(folder.glob("*.csv"))
    if len(found) != 1:
        raise DatasetError(
            f"{safe_text(folder)}: expected exactly one .csv file in it, found {len(found)}"
        )
    return found[0]

"""Find the classes and images of a training folder and split them into train and validation.

Two layouts are understood, one subfolder per class (the folder name is the class name)::

    DATA/<class>/*.jpg                         split by gapcam: a seeded, per-class share for val
    DATA/train/<class>/*  DATA/val/<class>/*   the user's split (``valid`` or ``validation``
                                               also name the validation folder)

Images are found recursively by suffix (``gapcam.images.IMAGE_SUFFIXES``); other files and
folders whose name starts with a dot are ignored. Problems that make training meaningless (no
class folders, one class, an empty class, class folders that differ between the splits) raise
``DatasetError`` naming the folders and saying how to fix them. A folder name becomes a class
name in the run, so it must be one (``gapcam.models.checkpoint.class_name_problem``): a name
with a control character (a newline, an escape sequence) is refused, not rewritten.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from gapcam.console import safe_text
from gapcam.errors import DatasetError
from gapcam.images import IMAGE_SUFFIXES
from gapcam.models.checkpoint import MAX_CLASSES, class_name_problem

VAL_NAMES = ("val", "valid", "validation")

Item = tuple[Path, int]


@dataclass(frozen=True)
class Dataset:
    """Class names (sorted folder names) and the (path, class index) items of each split."""

    root: Path
    class_names: tuple[str, ...]
    train: tuple[Item, ...]
    val: tuple[Item, ...]
    layout: str

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per class and split: ``{class: {"train": n, "val": m}}``."""
        table = {name: {"train": 0, "val": 0} for name in self.class_names}
        for split, items in (("train", self.train), ("val", self.val)):
            for _, label in items:
                table[self.class_names[label]][split] += 1
        return table


def discover(root: str | Path, val_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """The dataset under ``root`` (see the module docstring for the layouts)."""
    root = Path(root)
    if not root.is_dir():
        what = "is a file" if root.exists() else "no such folder"
        raise DatasetError(
            f"{safe_text(root)}: {what}; give a folder with one subfolder of images per class"
        )
    train_dir = root / "train"
    val_dir = next((root / n for n in VAL_NAMES if (root / n).is_dir()), None)
    if train_dir.is_dir() and val_dir is not None:
        return _explicit_split(root, train_dir, val_dir)
    if val_dir is not None:
        raise DatasetError(
            f"{safe_text(root)}: has {val_dir.name}/ but no train/; add train/<class>/ folders, "
            "or put all classes directly under the folder for a seeded split"
        )
    source = train_dir if train_dir.is_dir() else root
    if not 0.0 < val_fraction < 1.0:
        raise DatasetError(f"val_fraction={val_fraction}: must be between 0 and 1 (e.g. 0.2)")
    classes = _class_folders(source)
    _check_classes(source, classes)
    train, val = _seeded_split(classes, val_fraction, seed, source)
    layout = f"seeded split of {source}: {val_fraction:.0%} of each class for val"
    return Dataset(root, tuple(classes), train, val, layout)


def _explicit_split(root: Path, train_dir: Path, val_dir: Path) -> Dataset:
    train_classes, val_classes = _class_folders(train_dir), _class_folders(val_dir)
    only_train = sorted(set(train_classes) - set(val_classes))
    only_val = sorted(set(val_classes) - set(train_classes))
    if only_train or only_val:
        parts = []
        if only_train:
            parts.append(f"only in train/: {', '.join(only_train)}")
        if only_val:
            parts.append(f"only in {val_dir.name}/: {', '.join(only_val)}")
        raise DatasetError(
            f"{safe_text(root)}: the class folders of train/ and {val_dir.name}/ differ "
            f"({safe_text('; '.join(parts))}); "
            "give both splits the same class folders"
        )
    _check_classes(train_dir, train_classes)
    _check_classes(val_dir, val_classes)
    names = tuple(train_classes)
    train = tuple((p, i) for i, n in enumerate(names) for p in train_classes[n])
    val = tuple((p, i) for i, n in enumerate(names) for p in val_classes[n])
    return Dataset(root, names, train, val, f"train/ and {val_dir.name}/ folders")


def _class_folders(folder: Path) -> dict[str, list[Path]]:
    """Sorted class folder name -> sorted image paths under it (recursively)."""
    classes = {}
    for child in sorted(folder.iterdir()):
        if child.is_dir() and not child.name.startswith("."):
            classes[child.name] = sorted(
                p
                for p in child.rglob("*")
                if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith(".")
            )
    return classes


def _check_classes(folder: Path, classes: dict[str, list[Path]]) -> None:
    shown = safe_text(folder)
    for name in classes:
        problem = class_name_problem(name)
        if problem is not None:
            raise DatasetError(
                f"{shown}: class folder {safe_text(repr(name), limit=80)} {problem}; rename it "
                "(the folder name is the class name)"
            )
    if len(classes) > MAX_CLASSES:
        raise DatasetError(
            f"{shown}: {len(classes):,} class folders, over the limit of {MAX_CLASSES:,}"
        )
    if not classes:
        loose = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
        hint = f" (found {len(loose)} images directly in it)" if loose else ""
        raise DatasetError(
            f"{shown}: no class subfolders{hint}; put the images of each class in their own "
            "subfolder, e.g. DATA/cat/*.jpg and DATA/dog/*.jpg"
        )
    empty = [name for name, paths in classes.items() if not paths]
    if empty:
        raise DatasetError(
            f"{shown}: class folder(s) with no images: {', '.join(empty)}; add images "
            f"({', '.join(sorted(IMAGE_SUFFIXES))}) or remove the folder(s)"
        )
    if len(classes) < 2:
        raise DatasetError(
            f"{shown}: found only one class folder ({next(iter(classes))}); a classifier needs "
            "at least 2 classes, one subfolder each"
        )


def _seeded_split(
    classes: dict[str, list[Path]], fraction: float, seed: int, folder: Path
) -> tuple[tuple[Item, ...], tuple[Item, ...]]:
    """Per class, the files whose seeded hash ranks first go to val (at least one each).

    Ranking by a hash of (seed, relative path) keeps a file's split when others are added.
    """
    small = [name for name, paths in classes.items() if len(paths) < 2]
    if small:
        raise DatasetError(
            f"{safe_text(folder)}: class(es) with a single image: {', '.join(small)}; a seeded "
            "split needs at least 2 images per class (one for validation)"
        )
    train: list[Item] = []
    val: list[Item] = []
    for label, paths in enumerate(classes.values()):
        ranked = sorted(paths, key=lambda p: _rank(seed, p.relative_to(folder)))
        count = min(len(paths) - 1, max(1, round(fraction * len(paths))))
        chosen = set(ranked[:count])
        train += [(p, label) for p in paths if p not in chosen]
        val += [(p, label) for p in paths if p in chosen]
    return tuple(train), tuple(val)


def _rank(seed: int, relative: Path) -> str:
    return hashlib.sha256(f"{seed}:{relative.as_posix()}".encode()).hexdigest()

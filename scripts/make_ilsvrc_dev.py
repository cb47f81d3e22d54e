#!/usr/bin/env python3
"""Build the ILSVRC dev set (for $GAPCAM_ILSVRC_DEV) from the two public downloads.

    python scripts/make_ilsvrc_dev.py --images ILSVRC2012_img_val \\
        --metadata wsolevaluation/metadata/ILSVRC/test --out ~/data/ilsvrc-val-dev \\
        [--synsets LOC_synset_mapping.txt] [--count 300 --seed 0 | --ids FILE] [--size 227]

    # the very 300 images of the reference figures and the CI gate (docs/evaluate.md):
    python scripts/make_ilsvrc_dev.py ... --ids scripts/ilsvrc_dev_ids.txt

Inputs:

- ``--images``: the ILSVRC-2012 validation images, ``ILSVRC2012_val_XXXXXXXX.JPEG`` in one folder
  (ImageNet's ``ILSVRC2012_img_val.tar``, extracted);
- ``--metadata``: clovaai/wsolevaluation's ``metadata/ILSVRC/test/``: ``image_ids.txt``,
  ``class_labels.txt`` (labels 0..999 in sorted-WordNet-id order), ``image_sizes.txt`` and
  ``localization.txt`` (inclusive pixel boxes of the original images), paths like
  ``val/ILSVRC2012_val_00000001.JPEG`` (matched to ``--images`` by file name);
- ``--synsets`` (optional): ImageNet's ``LOC_synset_mapping.txt`` (``n01440764 tench, ...``, one
  line per class, sorted), for the WordNet ids of ``class_names.txt``.

It picks ``--count`` of the annotated images found in ``--images``, at random but the same for
the same ``--seed`` (or exactly the file names listed in ``--ids``, one a line: the repository's
``scripts/ilsvrc_dev_ids.txt`` lists those of the reference set), and writes into ``--out`` (which must not exist) the wsolevaluation layout
that ``gapcam evaluate`` reads:

- ``images/ILSVRC2012_val_XXXXXXXX.JPEG``: resized to ``--size`` x ``--size`` with Pillow's
  bilinear filter (which averages over the source pixels when it shrinks), RGB, JPEG quality
  95; ``--size 0`` copies the files unchanged;
- ``image_ids.txt``, ``class_labels.txt`` (``path,label``), ``image_sizes.txt``
  (``path,width,height``) and ``localization.txt`` (``path,x0,y0,x1,y1``, one line per box), the
  boxes scaled by ``size / width`` and ``size / height`` and written with one decimal;
- ``class_names.txt`` (``index,wordnet_id,name``, names from gapcam's ImageNet class list), only
  with ``--synsets``: gapcam checks its WordNet ids against the model's classes, so it is left
  out rather than written with ids it does not know (the file is optional);
- ``README.md``: where the set comes from, and its licence.

ImageNet images are for non-commercial research and evaluation: never commit them to a
repository. Standard library and Pillow only (gapcam for the class names, with ``--synsets``).
Exit code 0 when the set is written, 2 (with one line saying why) when it cannot be.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

METADATA = ("image_ids.txt", "class_labels.txt", "image_sizes.txt", "localization.txt")
CLASSES = 1000
WORDNET_ID = re.compile(r"n\d{8}")
JPEG_QUALITY = 95
BoxValues = tuple[float, float, float, float]


class BuildError(Exception):
    """Why the set cannot be built: one line that names the file (and line) at fault."""


@dataclass
class Source:
    """One annotated validation image, as wsolevaluation describes it."""

    name: str  # ILSVRC2012_val_00000001.JPEG
    label: int = -1
    size: tuple[int, int] = (0, 0)  # (width, height) of the original
    boxes: list[BoxValues] = field(default_factory=list)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=Path, required=True, help="the ILSVRC-2012 validation images")
    p.add_argument(
        "--metadata", type=Path, required=True, help="wsolevaluation's metadata/ILSVRC/test"
    )
    p.add_argument("--out", type=Path, required=True, help="the new dev set folder")
    p.add_argument("--synsets", type=Path, help="LOC_synset_mapping.txt (for class_names.txt)")
    p.add_argument("--count", type=int, default=300, help="images to pick (default: 300)")
    p.add_argument("--size", type=int, default=227, help="side in pixels (default: 227; 0: keep)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pick (default: 0)")
    p.add_argument(
        "--ids",
        type=Path,
        help="pick exactly these images (file names, one a line) instead of --count/--seed",
    )
    return p.parse_args(argv)


def rows(path: Path, count: int, expected: str) -> list[tuple[str, list[str]]]:
    """(``file:line``, fields) of the non-blank lines of a comma-separated file."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise BuildError(f"{path}: cannot read it ({exc})") from exc
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        cells = [cell.strip() for cell in line.split(",")]
        if len(cells) != count:
            raise BuildError(f"{path}:{number}: {len(cells)} fields; expected {expected}")
        found.append((f"{path}:{number}", cells))
    return found


def number(text: str, where: str, kind: type[int] | type[float]) -> int | float:
    try:
        return kind(text)
    except ValueError:
        raise BuildError(f"{where}: {text!r} is not a number") from None


def read_metadata(folder: Path) -> dict[str, Source]:
    """The annotated images by file name, in ``image_ids.txt`` order."""
    missing = [name for name in METADATA if not (folder / name).is_file()]
    if missing:
        raise BuildError(
            f"{folder}: missing {', '.join(missing)}; --metadata is wsolevaluation's "
            "metadata/ILSVRC/test folder"
        )
    sources: dict[str, Source] = {}
    by_path: dict[str, Source] = {}
    for where, (path,) in rows(folder / "image_ids.txt", 1, "one image path"):
        name = Path(path).name
        if name in sources:
            raise BuildError(f"{where}: {name} is listed twice")
        sources[name] = by_path[path] = Source(name)

    def source(path: str, where: str) -> Source:
        if path not in by_path:
            raise BuildError(f"{where}: {path} is not listed in image_ids.txt")
        return by_path[path]

    for where, (path, label) in rows(folder / "class_labels.txt", 2, "path,label"):
        value = int(number(label, where, int))
        if not 0 <= value < CLASSES:
            raise BuildError(f"{where}: label {value} is not an ImageNet-1k class (0..999)")
        source(path, where).label = value
    for where, (path, width, height) in rows(folder / "image_sizes.txt", 3, "path,width,height"):
        size = (int(number(width, where, int)), int(number(height, where, int)))
        if min(size) <= 0:
            raise BuildError(f"{where}: size {size[0]}x{size[1]} is not an image size")
        source(path, where).size = size
    for where, (path, *values) in rows(folder / "localization.txt", 5, "path,x0,y0,x1,y1"):
        x0, y0, x1, y1 = (float(number(value, where, float)) for value in values)
        source(path, where).boxes.append((x0, y0, x1, y1))
    for source_ in sources.values():
        if source_.label < 0 or source_.size == (0, 0) or not source_.boxes:
            raise BuildError(f"{folder}: {source_.name} lacks a label, a size or a box")
    return sources


def read_synsets(path: Path) -> list[str]:
    """The 1000 WordNet ids of ``LOC_synset_mapping.txt``, which must be in sorted order (the
    order of wsolevaluation's labels)."""
    try:
        lines = [line.split() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise BuildError(f"{path}: cannot read it ({exc})") from exc
    ids = [words[0] for words in lines if words]
    bad = next((i for i, wnid in enumerate(ids) if not WORDNET_ID.fullmatch(wnid)), None)
    if bad is not None:
        raise BuildError(f"{path}: {ids[bad]!r} is not a WordNet id (n########)")
    if len(ids) != CLASSES or ids != sorted(ids):
        raise BuildError(f"{path}: expected the {CLASSES} ImageNet-1k WordNet ids, sorted")
    return ids


def pick(sources: dict[str, Source], images: Path, count: int, seed: int) -> list[Source]:
    """``count`` annotated images present in ``images``: a seeded sample, in file-name order."""
    present = sorted(name for name in sources if (images / name).is_file())
    if len(present) < count:
        raise BuildError(
            f"{images}: {len(present)} of the {len(sources)} annotated images are there; "
            f"--count {count} needs that many"
        )
    return [sources[name] for name in sorted(random.Random(seed).sample(present, count))]


def listed(sources: dict[str, Source], images: Path, ids: Path) -> list[Source]:
    """The images named in ``ids`` (file names, one a line; blank lines skipped), in file-name
    order; each must be annotated and present."""
    try:
        names = [line.strip() for line in ids.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise BuildError(f"{ids}: cannot read the list of image ids ({exc})") from exc
    chosen: list[str] = []
    for number, name in enumerate(names, 1):
        if not name:
            continue
        name = Path(name).name
        if name not in sources:
            raise BuildError(f"{ids}:{number}: {name!r} has no annotation in the metadata")
        if not (images / name).is_file():
            raise BuildError(f"{ids}:{number}: {name} is not in {images}")
        chosen.append(name)
    if not chosen or len(set(chosen)) != len(chosen):
        raise BuildError(f"{ids}: list at least one image, each once")
    return [sources[name] for name in sorted(chosen)]


def coordinate(value: float, scaled: bool) -> str:
    if scaled:
        return f"{value:.1f}"
    return str(int(value)) if value.is_integer() else repr(value)


def read_image(path: Path, expected: tuple[int, int], size: int) -> Image.Image | None:
    """The image resized to ``size`` x ``size`` (None for ``size`` 0), after checking that it
    has the annotated size."""
    try:
        with Image.open(path) as image:
            if image.size != expected:
                raise BuildError(
                    f"{path}: {image.width}x{image.height} pixels, but image_sizes.txt says "
                    f"{expected[0]}x{expected[1]}"
                )
            if not size:
                return None
            return image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    except OSError as exc:
        raise BuildError(f"{path}: cannot read it as an image ({exc})") from exc


def write_set(folder: Path, picked: list[Source], images: Path, size: int) -> int:
    """The images and the four metadata files into ``folder``; returns the number of boxes."""
    (folder / "images").mkdir()
    ids, labels, sizes, boxes = [], [], [], []
    for source in picked:
        original = images / source.name
        target = f"images/{source.name}"
        width, height = source.size
        resized = read_image(original, source.size, size)
        if resized is None:
            shutil.copyfile(original, folder / target)
        else:
            resized.save(folder / target, "JPEG", quality=JPEG_QUALITY)
        sx, sy = (size / width, size / height) if size else (1.0, 1.0)
        ids.append(target)
        labels.append(f"{target},{source.label}")
        sizes.append(f"{target},{size or width},{size or height}")
        for x0, y0, x1, y1 in source.boxes:
            scaled = (x0 * sx, y0 * sy, x1 * sx, y1 * sy)
            boxes.append(",".join([target, *(coordinate(v, size > 0) for v in scaled)]))
    for name, lines in zip(METADATA, (ids, labels, sizes, boxes), strict=True):
        (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(boxes)


def write_class_names(folder: Path, wordnet_ids: list[str]) -> None:
    from gapcam.models.imagenet import imagenet_names

    lines = [
        f"{i},{wnid},{name}"
        for i, (wnid, name) in enumerate(zip(wordnet_ids, imagenet_names(), strict=True))
    ]
    (folder / "class_names.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_readme(folder: Path, args: argparse.Namespace, boxes: int) -> None:
    shape = f"prescaled to {args.size}x{args.size}" if args.size else "at their original size"
    how = f"as listed in {args.ids.name}" if args.ids is not None else f"with seed {args.seed}"
    (folder / "README.md").write_text(
        f"# ILSVRC dev set\n\n"
        f"{args.count} images of the ILSVRC-2012 (ImageNet) validation set ({boxes} boxes), "
        f"{shape}, picked {how} by gapcam's scripts/make_ilsvrc_dev.py from "
        f"the validation images and clovaai/wsolevaluation's metadata/ILSVRC/test, in the "
        f"wsolevaluation metadata layout.\n\n"
        f"ImageNet images are for non-commercial research and evaluation: do not commit them "
        f"to a repository.\n",
        encoding="utf-8",
    )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def build(args: argparse.Namespace) -> str:
    """Writes the set; returns the summary line."""
    if args.count < 1:
        raise BuildError(f"--count {args.count}: give at least 1 image")
    if args.size < 0:
        raise BuildError(f"--size {args.size}: give a side in pixels, or 0 to keep the sizes")
    out: Path = args.out
    if out.exists():
        raise BuildError(f"{out} already exists; give a new folder (nothing is overwritten)")
    if not args.images.is_dir():
        raise BuildError(f"{args.images}: no such folder; --images is the validation images")
    sources = read_metadata(args.metadata)
    wordnet_ids = read_synsets(args.synsets) if args.synsets else None
    if args.ids is not None:
        picked = listed(sources, args.images, args.ids)
        args.count = len(picked)
    else:
        picked = pick(sources, args.images, args.count, args.seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        boxes = write_set(partial, picked, args.images, args.size)
        if wordnet_ids is not None:
            write_class_names(partial, wordnet_ids)
        write_readme(partial, args, boxes)
        os.chmod(partial, 0o777 & ~_umask())  # mkdtemp's 0o700 -> what mkdir would give
        if out.exists():
            raise BuildError(f"{out} appeared while the set was written; it is left alone")
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    names = (
        ""
        if wordnet_ids is not None
        else (
            "; class_names.txt left out (pass --synsets LOC_synset_mapping.txt for its WordNet ids)"
        )
    )
    how = f"listed in {args.ids}" if args.ids is not None else f"seed {args.seed}"
    return f"{out}: {len(picked)} images, {boxes} boxes ({how}){names}"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    try:
        print(build(args))
    except BuildError as exc:
        print(f"make_ilsvrc_dev: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

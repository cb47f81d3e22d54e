"""scripts/make_ilsvrc_dev.py on a tiny fake source: generated JPEGs named like ILSVRC-2012
validation images and wsolevaluation metadata for them. The set it writes must be read by
``load_dataset`` with every box rescaled exactly, and line up with the pixels."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

from gapcam.eval.datasets import load_dataset
from gapcam.models.imagenet import imagenet_names

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_ilsvrc_dev.py"
RED = (230, 20, 20)

#: file number -> (width, height, label, boxes): inclusive pixel boxes of the original image
FAKE = {
    1: (60, 40, 0, [(10, 5, 29, 24)]),
    2: (48, 64, 999, [(0, 0, 47, 63)]),  # the whole image: x1, y1 = width - 1, height - 1
    3: (50, 50, 7, [(5, 5, 19, 19), (30, 30, 44, 44)]),
    4: (70, 30, 12, [(35, 3, 64, 26)]),
    5: (40, 56, 500, [(8, 20, 31, 47)]),
    6: (64, 48, 3, [(1, 1, 10, 10)]),  # annotated, but its file is not in the images folder
}
MISSING = 6


def name(number: int) -> str:
    return f"ILSVRC2012_val_{number:08d}.JPEG"


@pytest.fixture(scope="module")
def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_ilsvrc_dev", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(images folder, metadata folder): black images, red where the boxes are."""
    root = tmp_path_factory.mktemp("ilsvrc-source")
    images, metadata = root / "val", root / "metadata" / "ILSVRC" / "test"
    images.mkdir()
    metadata.mkdir(parents=True)
    ids, labels, sizes, boxes = [], [], [], []
    for number, (width, height, label, rects) in FAKE.items():
        path = f"val/{name(number)}"
        ids.append(path)
        labels.append(f"{path},{label}")
        sizes.append(f"{path},{width},{height}")
        pixels = np.zeros((height, width, 3), dtype=np.uint8)
        for x0, y0, x1, y1 in rects:
            boxes.append(f"{path},{x0},{y0},{x1},{y1}")
            pixels[y0 : y1 + 1, x0 : x1 + 1] = RED
        if number != MISSING:
            Image.fromarray(pixels).save(images / name(number), quality=95)
    for file, lines in (
        ("image_ids.txt", ids),
        ("class_labels.txt", labels),
        ("image_sizes.txt", sizes),
        ("localization.txt", boxes),
    ):
        (metadata / file).write_text("\n".join(lines) + "\n")
    return images, metadata


@pytest.fixture(scope="module")
def synsets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("synsets") / "LOC_synset_mapping.txt"
    path.write_text("".join(f"n{10_000_000 + i:08d} class {i}, synonym\n" for i in range(1000)))
    return path


def make(script: ModuleType, source: tuple[Path, Path], out: Path, *extra: str) -> int:
    images, metadata = source
    argv = ["--images", str(images), "--metadata", str(metadata), "--out", str(out), *extra]
    return script.main(argv)


def test_the_set_is_read_by_gapcam_with_the_boxes_rescaled_exactly(
    script: ModuleType,
    source: tuple[Path, Path],
    synsets: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "dev"
    assert make(script, source, out, "--count", "4", "--size", "32", "--synsets", str(synsets)) == 0
    assert capsys.readouterr().out.strip().startswith(f"{out}: 4 images, ")

    dataset = load_dataset(out, int)
    assert dataset.layout == "wsol"
    assert dataset.skipped == ()
    picked = [int(s.name[len("images/ILSVRC2012_val_") : -len(".JPEG")]) for s in dataset.samples]
    assert len(picked) == 4
    assert picked == sorted(picked)
    assert MISSING not in picked  # only images that are there are picked
    for sample, number in zip(dataset.samples, picked, strict=True):
        width, height, label, rects = FAKE[number]
        assert sample.path == out / "images" / name(number)
        assert sample.label == label
        assert sample.size == (32, 32)
        assert sample.boxes == tuple(
            (
                round(x0 * 32 / width, 1),
                round(y0 * 32 / height, 1),
                round(x1 * 32 / width, 1),
                round(y1 * 32 / height, 1),
            )
            for x0, y0, x1, y1 in rects
        )
        with Image.open(sample.path) as image:
            assert (image.size, image.mode, image.format) == ((32, 32), "RGB", "JPEG")
            pixels = np.asarray(image).astype(int)
        for x0, y0, x1, y1 in sample.boxes:  # the rescaled box is still on the red pixels
            r, g, b = pixels[round((y0 + y1) / 2), round((x0 + x1) / 2)]
            assert (r > 180, g < 70, b < 70) == (True, True, True), (number, (r, g, b))
        outside = [  # pixels 2 or more away from every box are still black
            pixels[y, x].max()
            for y in range(32)
            for x in range(32)
            if all(
                x < x0 - 2 or x > x1 + 2 or y < y0 - 2 or y > y1 + 2
                for x0, y0, x1, y1 in sample.boxes
            )
        ]
        assert max(outside, default=0) < 80, number

    table = dataset.class_table
    assert len(table) == 1000
    assert [(i, wnid) for i, wnid, _ in table[:2]] == [(0, "n10000000"), (1, "n10000001")]
    lines = (out / "class_names.txt").read_text().splitlines()
    assert lines[0] == f"0,n10000000,{imagenet_names()[0]}"
    assert lines[999] == f"999,n10000999,{imagenet_names()[999]}"
    assert "non-commercial" in (out / "README.md").read_text()
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "class_labels.txt",
        "class_names.txt",
        "image_ids.txt",
        "image_sizes.txt",
        "images",
        "localization.txt",
    ]
    assert not list(tmp_path.glob(".dev.partial-*"))


def test_the_same_seed_picks_the_same_images_and_writes_the_same_bytes(
    script: ModuleType, source: tuple[Path, Path], tmp_path: Path
) -> None:
    runs = {}
    for run, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        assert make(script, source, tmp_path / run, "--count", "2", "--seed", seed) == 0
        runs[run] = {
            str(p.relative_to(tmp_path / run)): p.read_bytes()
            for p in sorted((tmp_path / run).rglob("*"))
            if p.is_file() and p.name != "README.md"
        }
    assert runs["a"] == runs["b"]
    ids = {run: files["image_ids.txt"] for run, files in runs.items()}
    assert ids["a"] != ids["c"]  # seeds 3 and 4 pick different pairs of the five
    assert "class_names.txt" not in runs["a"]  # no --synsets: no WordNet ids to write


def test_size_zero_keeps_the_files_and_the_boxes(
    script: ModuleType, source: tuple[Path, Path], tmp_path: Path
) -> None:
    out = tmp_path / "dev"
    assert make(script, source, out, "--count", "5", "--size", "0") == 0
    dataset = load_dataset(out, int)
    assert [s.name for s in dataset.samples] == [
        f"images/{name(n)}" for n in sorted(FAKE) if n != MISSING
    ]
    images, _ = source
    for sample, number in zip(dataset.samples, sorted(set(FAKE) - {MISSING}), strict=True):
        width, height, _, rects = FAKE[number]
        assert sample.size == (width, height)
        assert sample.boxes == tuple(tuple(float(v) for v in rect) for rect in rects)
        assert sample.path.read_bytes() == (images / name(number)).read_bytes()
    localization = (out / "localization.txt").read_text().splitlines()
    assert localization[0] == f"images/{name(1)},10,5,29,24"


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (("--count", "6"), "5 of the 6 annotated images are there; --count 6 needs that many"),
        (("--count", "0"), "--count 0: give at least 1 image"),
        (("--size", "-1"), "--size -1: give a side in pixels"),
    ],
)
def test_refusals_are_one_line_and_write_nothing(
    script: ModuleType,
    source: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: tuple[str, ...],
    fragment: str,
) -> None:
    assert make(script, source, tmp_path / "dev", *extra) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert fragment in err
    assert list(tmp_path.iterdir()) == []


def test_an_existing_out_is_never_overwritten(
    script: ModuleType,
    source: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "dev"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert make(script, source, out, "--count", "1") == 2
    assert capsys.readouterr().err == (
        f"make_ilsvrc_dev: {out} already exists; give a new folder (nothing is overwritten)\n"
    )
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_bad_metadata_and_sizes_are_named_by_file_and_line(
    script: ModuleType,
    source: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    images, metadata = source
    broken = tmp_path / "metadata"
    broken.mkdir()
    for file in ("image_ids.txt", "class_labels.txt", "localization.txt"):
        (broken / file).write_text((metadata / file).read_text())
    assert make(script, (images, broken), tmp_path / "a", "--count", "1") == 2
    assert "missing image_sizes.txt" in capsys.readouterr().err

    sizes = (metadata / "image_sizes.txt").read_text().replace(",60,40", ",61,40")
    (broken / "image_sizes.txt").write_text(sizes)
    assert make(script, (images, broken), tmp_path / "b", "--count", "5") == 2
    assert f"{images / name(1)}: 60x40 pixels, but image_sizes.txt says 61x40" in (
        capsys.readouterr().err
    )

    (broken / "image_sizes.txt").write_text(sizes.replace(",61,40", ",sixty,40"))
    assert make(script, (images, broken), tmp_path / "c", "--count", "1") == 2
    assert f"{broken / 'image_sizes.txt'}:1: 'sixty' is not a number" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metadata"]


def test_ids_pick_exactly_the_listed_images(
    script: ModuleType,
    source: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    wanted = tmp_path / "ids.txt"
    wanted.write_text(f"val/{name(4)}\n\n{name(1)}\n")  # a path or a bare name, any order
    assert make(script, source, tmp_path / "dev", "--ids", str(wanted), "--size", "32") == 0
    assert "2 images" in capsys.readouterr().out
    ids = (tmp_path / "dev" / "image_ids.txt").read_text().split()
    assert ids == [f"images/{name(1)}", f"images/{name(4)}"]
    wanted.write_text(f"{name(MISSING)}\n")
    assert make(script, source, tmp_path / "again", "--ids", str(wanted)) == 2
    assert f"ids.txt:1: {name(MISSING)} is not in" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()


def test_the_shipped_ids_are_the_reference_sets_names() -> None:
    """scripts/ilsvrc_dev_ids.txt lists 300 distinct validation image names (no images)."""
    shipped = (SCRIPT.parent / "ilsvrc_dev_ids.txt").read_text().split("\n")
    names = [line for line in shipped if line]
    assert len(names) == len(set(names)) == 300
    assert all(re.fullmatch(r"ILSVRC2012_val_\d{8}\.JPEG", n) for n in names)

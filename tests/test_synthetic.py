"""The synthetic weak-localization dataset: deterministic files, boxes that enclose the object."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gapcam.cli import main
from gapcam.errors import OutputError
from gapcam.train.synthetic import CSV_HEADER, CSV_NAME, SHAPES, generate, render_sample


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_box_is_the_tight_box_of_the_drawn_object(shape: str, seed: int) -> None:
    sample = render_sample(shape, 96, np.random.default_rng(seed))
    array = np.asarray(sample.image)
    rows, cols = np.nonzero(sample.mask)
    assert sample.box == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
    x0, y0, x1, y1 = sample.box
    assert 0 <= x0 < x1 <= 96
    assert 0 <= y0 < y1 <= 96
    # every object pixel has the object's colour, and the object touches all four box edges
    assert (array[sample.mask] == sample.colour).all()
    inside = sample.mask[y0:y1, x0:x1]
    assert inside[0].any()
    assert inside[-1].any()
    assert inside[:, 0].any()
    assert inside[:, -1].any()
    assert sample.mask.sum() == sample.mask[y0:y1, x0:x1].sum()
    share = (x1 - x0) * (y1 - y0) / 96**2
    assert 0.04 < share < 0.5


def test_same_seed_same_files_other_seed_other_images(tmp_path: Path) -> None:
    generate(tmp_path / "a", classes=3, per_class=3, val_per_class=2, size=64, seed=5)
    generate(tmp_path / "b", classes=3, per_class=3, val_per_class=2, size=64, seed=5)
    generate(tmp_path / "c", classes=3, per_class=3, val_per_class=2, size=64, seed=6)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert a == b
    assert a.keys() == c.keys()
    assert a["train/circle/circle-0000.png"] != c["train/circle/circle-0000.png"]


def test_more_images_keep_the_first_ones(tmp_path: Path) -> None:
    generate(tmp_path / "few", classes=2, per_class=2, val_per_class=1, size=64)
    generate(tmp_path / "many", classes=2, per_class=4, val_per_class=3, size=64)
    few, many = _files(tmp_path / "few"), _files(tmp_path / "many")
    images = [name for name in few if name.endswith(".png")]
    assert len(images) == 6
    assert all(few[name] == many[name] for name in images)


def test_layout_and_csv(tmp_path: Path) -> None:
    counts = generate(tmp_path, classes=4, per_class=3, val_per_class=2, size=80, seed=1)
    assert counts == {"train": 12, "val": 8}
    for split, per_class in (("train", 3), ("val", 2)):
        folder = tmp_path / split
        assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == sorted(SHAPES[:4])
        lines = (folder / CSV_NAME).read_text().splitlines()
        assert lines[0] == CSV_HEADER
        rows = list(csv.DictReader(lines))
        assert len(rows) == 4 * per_class
        for row in rows:
            path = folder / row["path"]
            assert path.parent.name == row["label"]
            with Image.open(path) as image:
                assert image.size == (80, 80)
                assert image.mode == "RGB"
            x0, y0, x1, y1 = (int(row[k]) for k in ("x0", "y0", "x1", "y1"))
            assert 0 <= x0 < x1 <= 80
            assert 0 <= y0 < y1 <= 80
    record = json.loads((tmp_path / "synth.json").read_text())
    assert record["seed"] == 1
    assert record["classes"] == list(SHAPES[:4])


def test_box_in_csv_matches_the_object_in_the_file(tmp_path: Path) -> None:
    """Re-render one image from its seed: the CSV box is the tight box of that object."""
    generate(tmp_path, classes=2, per_class=2, val_per_class=1, size=64, seed=3)
    row = next(csv.DictReader((tmp_path / "val" / CSV_NAME).read_text().splitlines()))
    sample = render_sample("circle", 64, np.random.default_rng([3, 1, 0, 0]))
    assert row["path"] == "circle/circle-0000.png"
    x0, y0, x1, y1 = sample.box  # pixel-edge in memory, inclusive in the CSV
    assert tuple(int(row[k]) for k in ("x0", "y0", "x1", "y1")) == (x0, y0, x1 - 1, y1 - 1)
    with Image.open(tmp_path / "val" / row["path"]) as image:
        assert np.array_equal(np.asarray(image), np.asarray(sample.image))


def test_refuses_a_non_empty_folder_and_replaces_only_its_own(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(OutputError, match="not empty"):
        generate(tmp_path, classes=2, per_class=1, size=64)
    with pytest.raises(OutputError, match="not a dataset made by"):
        generate(tmp_path, classes=2, per_class=1, size=64, overwrite=True)
    assert (tmp_path / "mine.txt").read_text() == "keep me"
    data = tmp_path / "data"
    generate(data, classes=3, per_class=3, val_per_class=1, size=64)
    generate(data, classes=2, per_class=1, val_per_class=1, size=64, overwrite=True)
    assert sorted(p.name for p in (data / "train").iterdir() if p.is_dir()) == ["circle", "square"]
    assert len(list((data / "train").rglob("*.png"))) == 2


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--classes", "1"], "--classes 1: give 2 to 6 classes"),
        (["--classes", "9"], "--classes 9: give 2 to 6 classes"),
        (["--size", "8"], "size of at least 32"),
    ],
)
def test_cli_bad_arguments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], fragment: str
) -> None:
    assert main(["synth", str(tmp_path / "d"), *args]) == 2
    assert fragment in capsys.readouterr().err


@pytest.mark.parametrize("seed", ["-1", "4294967296"])
def test_cli_seed_out_of_range_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], seed: str
) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["synth", str(tmp_path / "d"), "--seed", seed])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.endswith(
        f"error: argument --seed: {seed}: use a whole number from 0 to 4294967295\n"
    )
    assert not (tmp_path / "d").exists()


def test_cli_writes_the_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "shapes"
    assert main(["synth", str(out), "--classes", "2", "--per-class", "2", "--size", "48"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 4 train and 4 val images (48x48)" in printed
    assert f"gapcam train {out}" in printed
    assert len(list(out.rglob("*.png"))) == 8


@pytest.mark.parametrize("existing", [False, True])
def test_an_interrupted_run_leaves_no_partial_dataset_and_the_old_one_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, existing: bool
) -> None:
    import gapcam.train.synthetic as synthetic

    out = tmp_path / "shapes"
    if existing:
        generate(out, classes=2, per_class=2, size=48)
    before = sorted(p.relative_to(out) for p in out.rglob("*")) if existing else []
    drawn = synthetic.render_sample
    calls = []

    def interrupted(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return drawn(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(synthetic, "render_sample", interrupted)
    with pytest.raises(KeyboardInterrupt):
        generate(out, classes=3, per_class=4, size=48, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == (["shapes"] if existing else [])
    if existing:
        assert sorted(p.relative_to(out) for p in out.rglob("*")) == before

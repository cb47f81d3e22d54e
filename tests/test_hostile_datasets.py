"""Hostile datasets: annotation files that name paths outside the dataset, are not UTF-8, are
huge, quote control characters, or point at images and masks whose headers declare billions of
pixels; and training folders with unreadable validation picks and train/val duplicates.

Every case is built in tmp_path (sparse files for the huge ones) and tried through the library
and, for each class of attack, through the real ``gapcam evaluate`` / ``gapcam train``
(``gapcam.cli.main`` in-process): one printable line under 300 characters, never a traceback.
"""

from __future__ import annotations

import re
import shutil
import struct
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image
from test_datasets import image, problems_of, resolve, voc_folder, voc_xml, write, wsol

from gapcam.cli import main
from gapcam.errors import DatasetError
from gapcam.eval.datasets import load_dataset
from gapcam.eval.datasets.core import MAX_ANNOTATION_BYTES, MAX_PROBLEM, Sample
from gapcam.eval.evaluate import load_masks
from gapcam.train.synthetic import generate

CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def one_line(err: str) -> str:
    """The error line; the problems it gathered may follow, indented, one safe line each."""
    assert "Traceback" not in err
    lines = err.rstrip("\n").split("\n")
    assert lines[0].startswith("gapcam: error: "), err
    assert all(line.startswith("  ") for line in lines[1:]), err
    for line in lines:
        assert len(line) < 300, line
        assert not CONTROL.search(line), line
    return lines[0]


def png_header(path: Path, width: int, height: int) -> Path:
    """A small valid PNG file whose header declares ``width`` x ``height`` grey pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every path Pillow is asked to open (a refused path must never be among them)."""
    seen: list[Path] = []
    real = Image.open

    def spy(source: object, *args: object, **kwargs: object) -> Image.Image:
        if isinstance(source, (str, Path)):
            seen.append(Path(source))
        return real(source, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Image, "open", spy)
    return seen


# -- paths that leave the dataset --------------------------------------------------------------


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """An image outside the dataset folder (``tmp_path/data``)."""
    return image(tmp_path / "outside" / "secret.png")


@pytest.mark.parametrize(
    "named",
    ["../outside/secret.png", "pics/../../outside/secret.png", "ABSOLUTE", "/etc/passwd"],
)
def test_csv_paths_that_leave_the_dataset_are_refused_unopened(
    tmp_path: Path, secret: Path, opened: list[Path], named: str
) -> None:
    named = str(secret) if named == "ABSOLUTE" else named
    image(tmp_path / "data" / "pics" / "a.png")
    csv_file = write(
        tmp_path / "data" / "boxes.csv", "pics/a.png,cat,1,1,5,5", f"{named},cat,1,1,5,5"
    )
    message = problems_of(csv_file)
    assert f"{csv_file}:2: {named}: the path leaves {tmp_path / 'data'}" in message
    assert "1 problem(s)" in message
    assert secret not in opened
    assert Path("/etc/passwd") not in opened
    kept = load_dataset(csv_file, resolve, skip_invalid=True)
    assert [s.name for s in kept.samples] == ["pics/a.png"]
    assert "leaves" in kept.skipped[0]


def test_images_root_that_holds_the_paths_lets_them_in(tmp_path: Path, secret: Path) -> None:
    """``images=`` names the root: an absolute path inside it, or a path relative to it, is
    taken; a path climbing out of it is still refused."""
    csv_file = write(
        tmp_path / "data" / "boxes.csv",
        f"{secret},cat,1,1,5,5",
        "secret.png,dog,1,1,5,5",
        "../data/boxes.csv,cat,1,1,5,5",
    )
    with pytest.raises(DatasetError) as caught:
        load_dataset(csv_file, resolve, images=secret.parent)
    assert "1 problem(s)" in str(caught.value)
    assert f"{csv_file}:3: ../data/boxes.csv: the path leaves" in str(caught.value)
    kept = load_dataset(csv_file, resolve, images=secret.parent, skip_invalid=True)
    assert [s.path for s in kept.samples] == [secret, secret]


def test_wsol_image_ids_and_masks_that_leave_the_root(
    tmp_path: Path, secret: Path, opened: list[Path]
) -> None:
    data = wsol(
        tmp_path / "data",
        ("images/a.png,../outside/secret.png,/etc/shadow", "images/b.png,0,0,5,5"),
        image_ids=("images/a.png", "images/b.png", "../../../../etc/passwd", "bad\x00name.png"),
        class_labels=("images/a.png,0", "images/b.png,1", "../../../../etc/passwd,0"),
    )
    message = problems_of(data)
    ids = data / "image_ids.txt"
    assert f"{ids}:3: ../../../../etc/passwd: the path leaves" in message
    assert f"{ids}:4: bad\\x00name.png: the path leaves" in message
    where = f"{data / 'localization.txt'}:1: images/a.png: path "
    assert f"{where}'../outside/secret.png' leaves" in message
    assert f"{where}'/etc/shadow' leaves" in message
    assert "not listed in image_ids.txt" not in message  # a refused image is still listed
    assert secret not in opened
    assert not [p for p in opened if p.parts[:2] == ("/", "etc")]


@pytest.mark.parametrize("filename", ["../../outside/secret.png", "ABSOLUTE"])
def test_voc_filename_that_leaves_the_dataset(
    tmp_path: Path, secret: Path, opened: list[Path], filename: str
) -> None:
    filename = str(secret) if filename == "ABSOLUTE" else filename
    root = voc_folder(tmp_path / "voc")
    xml = write(
        root / "Annotations" / "003.xml", voc_xml(filename, [("cat", ("1", "1", "5", "5"))])
    )
    message = problems_of(root)
    assert f"{xml}:2: 003: <filename> '{filename}' leaves {root}; refused" in message
    assert secret not in opened


def test_symlinks_inside_the_dataset_are_followed_but_not_climbed_out_of(
    tmp_path: Path, opened: list[Path]
) -> None:
    """A folder of images linked into the dataset is the owner's choice: followed. A path that
    climbs out through it (``link/../x``) resolves outside the dataset: refused."""
    store = tmp_path / "store"
    image(store / "deep" / "a.png")
    secret = image(store / "secret.png")
    data = tmp_path / "data"
    data.mkdir()
    (data / "images").symlink_to(store / "deep", target_is_directory=True)
    csv_file = write(
        data / "boxes.csv", "images/a.png,cat,1,1,5,5", "images/../secret.png,cat,1,1,5,5"
    )
    message = problems_of(csv_file)
    assert "1 problem(s)" in message
    assert f"{csv_file}:2: images/../secret.png: the path leaves" in message
    kept = load_dataset(csv_file, resolve, skip_invalid=True)
    assert [s.path for s in kept.samples] == [data / "images" / "a.png"]
    assert secret not in opened


@pytest.mark.slow
def test_evaluate_cli_lists_refused_paths_and_scores_the_rest(
    tmp_path: Path, secret: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image(tmp_path / "data" / "pics" / "a.png", (64, 48))
    csv_file = write(
        tmp_path / "data" / "boxes.csv", "pics/a.png,0,1,1,20,20", "../../../etc/passwd,0,1,1,5,5"
    )
    code = main(["evaluate", str(csv_file), "-q"])
    assert code == 2
    err = capsys.readouterr().err
    line = one_line(err)
    assert err.split("\n")[1].startswith(f"  {csv_file}:2: ../../../etc/passwd: the path leaves")
    assert line.endswith(
        "--skip-invalid to leave the affected images out (the results then list them)"
    )
    code = main(["evaluate", str(csv_file), "-q", "--skip-invalid"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert f"{csv_file}:2: ../../../etc/passwd: the path leaves" in out.out


# -- files that are not UTF-8, or huge ----------------------------------------------------------


@pytest.mark.parametrize(
    "target", ["image_ids.txt", "class_labels.txt", "localization.txt", "image_sizes.txt"]
)
def test_wsol_metadata_that_is_not_utf8(tmp_path: Path, target: str) -> None:
    data = wsol(tmp_path)
    (data / target).write_bytes(b"images/a.png\xff\xfe,0\n")
    with pytest.raises(DatasetError) as caught:
        load_dataset(data, resolve)
    assert str(caught.value).startswith(f"{data / target}: cannot read it as UTF-8 text")


@pytest.mark.parametrize("content", [b"\xff\xfe0\x000\x002\x00", b"002\n\x80\x81\n"])
def test_voc_image_set_that_is_not_utf8(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes
) -> None:
    root = voc_folder(tmp_path)
    listing = root / "ImageSets" / "Main" / "val.txt"
    listing.write_bytes(content)
    with pytest.raises(DatasetError, match=r"val\.txt: cannot read it as UTF-8 text"):
        load_dataset(root, resolve, split="val")
    code = main(["evaluate", str(root), "--split", "val", "--layout", "voc", "-q"])
    assert code == 2
    assert "cannot read it as UTF-8 text" in one_line(capsys.readouterr().err)


def test_csv_that_is_not_utf8(tmp_path: Path) -> None:
    csv_file = tmp_path / "boxes.csv"
    csv_file.write_bytes(b"path,label,x0,y0,x1,y1\n\xc3\x28.png,cat,1,1,5,5\n")
    with pytest.raises(DatasetError, match="cannot read it as UTF-8 text"):
        load_dataset(csv_file, resolve)


@pytest.mark.parametrize("target", ["image_ids.txt", "boxes.csv", "val.txt"])
def test_huge_annotation_files_are_not_read(tmp_path: Path, target: str) -> None:
    """Sparse 64 GB files: refused after at most the limit is read, at once."""
    if target == "boxes.csv":
        data = path = tmp_path / "boxes.csv"
        split = None
    elif target == "val.txt":
        data = voc_folder(tmp_path)
        path, split = data / "ImageSets" / "Main" / "val.txt", "val"
    else:
        data = wsol(tmp_path)
        path, split = data / "image_ids.txt", None
    with path.open("ab") as stream:
        stream.truncate(1 << 36)
    started = time.perf_counter()
    with pytest.raises(DatasetError) as caught:
        load_dataset(data, resolve, split=split)
    assert f"{path}: over {MAX_ANNOTATION_BYTES:,} bytes" in str(caught.value)
    assert time.perf_counter() - started < 10


def test_a_huge_voc_xml_is_a_problem_of_its_own(tmp_path: Path) -> None:
    root = voc_folder(tmp_path)
    xml = root / "Annotations" / "003.xml"
    with xml.open("wb") as stream:
        stream.truncate(1 << 33)
    assert f"{xml}:1: 003: over 1,048,576 bytes" in problems_of(root)


# -- images and masks whose headers declare billions of pixels ---------------------------------


def masked(root: Path, mask: Path) -> Path:
    data = wsol(
        root,
        ("images/a.png,masks/a.png,", "images/b.png,masks/b.png,"),
        image_sizes=("images/a.png,40,30", "images/b.png,40,30"),
    )
    image(data / "masks" / "b.png")
    shutil.copy(mask, data / "masks" / "a.png")
    return data


@pytest.mark.parametrize("side", [100_000, 12_000])
def test_a_mask_declaring_billions_of_pixels_is_a_problem_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], side: int
) -> None:
    """100000 x 100000 is over Pillow's own limit (its DecompressionBombError); 12000 x 12000
    is between Pillow's warning and its error: gapcam's limit refuses both, no warning shown
    (warnings are errors in this test suite)."""
    bomb = png_header(tmp_path / "bomb.png", side, side)
    data = masked(tmp_path / "data", bomb)
    message = problems_of(data)
    assert (
        f"{data / 'localization.txt'}:1: images/a.png: mask {data / 'masks' / 'a.png'}" in message
    )
    assert "over the limit of 120,000,000 pixels (decompression-bomb guard)" in message
    sample = Sample("a", data / "images" / "a.png", 0, (), (40, 30), (bomb,))
    with pytest.raises(DatasetError) as caught:
        load_masks(sample)
    assert str(caught.value).startswith(f"{bomb}: the mask is over the limit of 120,000,000")
    assert "\n" not in str(caught.value)


@pytest.mark.slow
def test_evaluate_cli_with_a_bomb_mask(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = masked(tmp_path / "data", png_header(tmp_path / "bomb.png", 100_000, 100_000))
    (data / "class_names.txt").unlink()  # the helper's WordNet ids are not ImageNet's order
    assert main(["evaluate", str(data), "-q"]) == 2
    err = capsys.readouterr().err
    line = one_line(err)
    assert err.split("\n")[1].startswith(f"  {data / 'localization.txt'}:1: images/a.png: mask ")
    assert line.endswith("(the results then list them)")
    assert main(["evaluate", str(data), "-q", "--skip-invalid"]) == 0
    out = capsys.readouterr().out
    assert "over the limit of 120,000,000 pixels" in out
    assert "PxAP" in out


@pytest.mark.parametrize("side", [100_000, 12_000])
def test_an_image_declaring_billions_of_pixels_is_a_problem(tmp_path: Path, side: int) -> None:
    png_header(tmp_path / "pics" / "big.png", side, side)
    csv_file = write(tmp_path / "boxes.csv", "pics/big.png,cat,1,1,5,5")
    message = problems_of(csv_file)
    assert f"pics/big.png: {tmp_path / 'pics' / 'big.png'}" in message
    assert "over the limit of 120,000,000 pixels" in message


# -- what the annotations quote is shown safely ------------------------------------------------


def test_control_characters_and_huge_text_in_annotations(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image(tmp_path / "a.png")
    csv_file = write(
        tmp_path / "boxes.csv",
        "evil\x1b]0;TITLE\x07\x1b[31m.png,cat,1,1,5,5",
        "a.png,\x1b[2J" + "x" * 100_000 + ",1,1,5,5",
        "a.png,cat,1,1,5,\u202enan",
    )
    message = problems_of(csv_file)
    *listed, summary = message.split("\n")
    assert len(listed) == 3
    assert summary.startswith(f"{csv_file}: 3 problem(s) in the annotations")
    for line in listed:
        assert len(line) <= MAX_PROBLEM + 2 + 40  # "  " + the cut's note
        assert not CONTROL.search(line)
        assert "\u202e" not in line
    shown = "\n".join(listed)
    assert "boxes.csv:1: evil\\x1b]0;TITLE\\x07\\x1b[31m.png: image file" in shown
    assert "boxes.csv:2: a.png: unknown label (class '\\x1b[2Jxxxxx" in shown
    assert "boxes.csv:3: a.png: y1='\\u202enan' is not a number" in shown
    assert "more characters)" in shown
    assert main(["evaluate", str(csv_file), "-q"]) == 2
    one_line(capsys.readouterr().err)
    huge = write(tmp_path / "huge.csv", "a.png,\x1b[2J" + "x" * 2_000_000 + ",1,1,5,5")
    with pytest.raises(DatasetError, match="cannot read it as a CSV file") as caught:
        load_dataset(huge, resolve)
    assert "\n" not in str(caught.value)
    assert len(str(caught.value)) < 300


# -- training data ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def feature_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("features")


def shapes(root: Path) -> Path:
    data = root / "data"
    generate(data, classes=2, per_class=3, val_per_class=1, size=64, seed=0)
    return data


@pytest.mark.slow
def test_train_names_the_unreadable_validation_pick_and_train_val_duplicates(
    tmp_path: Path, feature_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = shapes(tmp_path)
    (data / "val" / "circle" / "circle-0000.png").write_bytes(b"not a png")
    shutil.copy(data / "train" / "square" / "square-0001.png", data / "val" / "square" / "dup.png")
    argv = ["train", str(data), "--out", str(tmp_path / "run"), "--cache-dir", str(feature_cache)]
    code = main([*argv, "--epochs", "2", "--overlays", "0"])
    out = capsys.readouterr()
    assert code == 1, out.err  # one unreadable image skipped
    notes = [line for line in out.out.splitlines() if line.startswith("note: ")]
    assert notes == [
        "note: no readable validation image for class circle (unreadable: "
        "val/circle/circle-0000.png); its accuracy is not measured",
        "note: 1 validation image(s) identical to training images (val/square/dup.png = "
        "train/square/square-0001.png): they flatter the validation accuracy; remove one of "
        "each pair",
    ]


@pytest.mark.slow
def test_train_with_no_readable_validation_image_names_the_files(
    tmp_path: Path, feature_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = shapes(tmp_path)
    for picture in (data / "val").rglob("*.png"):
        picture.write_bytes(b"\x1b[31m not a png")
    argv = ["train", str(data), "--out", str(tmp_path / "run"), "--cache-dir", str(feature_cache)]
    assert main(argv) == 2
    line = one_line(capsys.readouterr().err)
    assert (
        "no readable validation image (unreadable: val/circle/circle-0000.png, "
        "val/square/square-0000.png); fix or replace them, or add readable ones"
    ) in line
    assert not (tmp_path / "run").exists()

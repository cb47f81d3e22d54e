"""Annotation readers (gapcam.eval.datasets): three layouts built in tmp dirs, and every malformed
entry reported with its file and line."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from gapcam.errors import ClassSelectionError, DatasetError
from gapcam.eval.datasets import detect_layout, load_dataset

NAMES = {"cat": 0, "dog": 1, "n02085620": 1}


def resolve(label: str) -> int:
    """A two-class resolver: indices, names, one WordNet id."""
    if label.isdigit() and int(label) < 2:
        return int(label)
    if label in NAMES:
        return NAMES[label]
    raise ClassSelectionError(f"class {label!r}: not a class of the test model")


def image(path: Path, size: tuple[int, int] = (40, 30), orientation: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    picture = Image.new("RGB", size, (200, 30, 30))
    if orientation is None:
        picture.save(path)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        picture.save(path, exif=exif)
    return path


def write(path: Path, *lines: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def wsol(root: Path, localization: tuple[str, ...] | None = None, **files: tuple[str, ...]) -> Path:
    """A valid two-image wsolevaluation folder; keyword arguments replace a file's lines."""
    image(root / "images" / "a.png")
    image(root / "images" / "b.png")
    contents = {
        "image_ids": ("images/a.png", "images/b.png"),
        "class_labels": ("images/a.png,0", "images/b.png,1"),
        "image_sizes": ("images/a.png,40,30", "images/b.png,40,30"),
        "localization": localization
        or ("images/a.png,1.5,2,20.25,29", "images/a.png,0,0,5,5", "images/b.png,0,0,39,29"),
        "class_names": ("0,n02123045,tabby", "1,n02085620,Chihuahua"),
    }
    contents.update(files)
    for name, lines in contents.items():
        write(root / f"{name}.txt", *lines)
    return root


def problems_of(data: Path, **kwargs: object) -> str:
    with pytest.raises(DatasetError) as caught:
        load_dataset(data, resolve, **kwargs)  # type: ignore[arg-type]
    return str(caught.value)


# -- wsolevaluation metadata ---------------------------------------------------------------------


def test_wsol_reads_labels_boxes_sizes_and_classes(tmp_path: Path) -> None:
    data = load_dataset(wsol(tmp_path), resolve)
    assert data.layout == "wsol"
    assert [s.name for s in data.samples] == ["images/a.png", "images/b.png"]
    first = data.samples[0]
    assert first.label == 0
    assert first.boxes == ((1.5, 2.0, 20.25, 29.0), (0.0, 0.0, 5.0, 5.0))  # floats as given
    assert first.size == (40, 30)
    assert first.path == tmp_path / "images" / "a.png"
    assert data.box_count == 3
    assert data.class_table[1][:2] == (1, "n02085620")
    assert data.skipped == ()


@pytest.mark.parametrize(
    ("files", "where", "says"),
    [
        (
            {"localization": ("images/a.png,0,0,45,5", "images/b.png,0,0,1,1")},
            "localization.txt:1",
            "outside the 40x30 image",
        ),
        (
            {"localization": ("images/a.png,0,0,5,5", "images/b.png,9,0,3,4")},
            "localization.txt:2",
            "x1 < x0",
        ),
        (
            {"localization": ("images/a.png,0,0,5,5", "images/b.png,0,9,3,4")},
            "localization.txt:2",
            "y1 < y0",
        ),
        (
            {"localization": ("images/a.png,-1,0,5,5", "images/b.png,0,0,1,1")},
            "localization.txt:1",
            "outside",
        ),
        (
            {"localization": ("images/a.png,0,0,5,5", "images/b.png,0,zero,3,4")},
            "localization.txt:2",
            "y0='zero' is not a number",
        ),
        (
            {"localization": ("images/a.png,0,0,5,5", "images/b.png,0,nan,3,4")},
            "localization.txt:2",
            "is not a number",
        ),
        (
            {"localization": ("images/a.png,0,0,5", "images/b.png,0,0,1,1")},
            "localization.txt:1",
            "4 fields",
        ),
        ({"localization": ("images/a.png,0,0,5,5",)}, "image_ids.txt:2", "images/b.png: no box"),
        (
            {
                "localization": (
                    "images/a.png,0,0,5,5",
                    "images/b.png,0,0,1,1",
                    "images/c.png,0,0,1,1",
                )
            },
            "localization.txt:3",
            "not listed in image_ids.txt",
        ),
        (
            {"class_labels": ("images/a.png,0", "images/b.png,7")},
            "class_labels.txt:2",
            "unknown label",
        ),
        (
            {"class_labels": ("images/a.png,0", "images/b.png,bird")},
            "class_labels.txt:2",
            "'bird': not a class",
        ),
        ({"class_labels": ("images/a.png,0",)}, "image_ids.txt:2", "images/b.png: no class label"),
        (
            {"class_labels": ("images/a.png,0", "images/b.png,1", "images/b.png,0")},
            "class_labels.txt:3",
            "second label",
        ),
        (
            {"image_ids": ("images/a.png", "images/b.png", "images/missing.png")},
            "image_ids.txt:3",
            "missing.png is missing",
        ),
        (
            {"image_ids": ("images/a.png", "images/b.png", "images/a.png")},
            "image_ids.txt:3",
            "listed twice",
        ),
        (
            {"image_sizes": ("images/a.png,40,30", "images/b.png,41,30")},
            "image_sizes.txt:2",
            "annotated as 41x30 but the image is 40x30",
        ),
        (
            {"image_sizes": ("images/a.png,40,30", "images/b.png,forty,30")},
            "image_sizes.txt:2",
            "width='forty' is not an integer",
        ),
    ],
)
def test_wsol_malformed_entries_are_named_with_file_and_line(
    tmp_path: Path, files: dict[str, tuple[str, ...]], where: str, says: str
) -> None:
    localization = files.pop("localization", None)
    message = problems_of(wsol(tmp_path, localization, **files))
    assert f"{tmp_path / where}: " in message
    assert says in message
    assert "skip_invalid=True" in message


def test_wsol_unreadable_image(tmp_path: Path) -> None:
    data = wsol(tmp_path)
    (data / "images" / "b.png").write_bytes(b"not a png")
    message = problems_of(data)
    assert f"{data / 'image_ids.txt'}:2: images/b.png: " in message
    assert "not a readable image" in message


def test_every_problem_is_listed_at_once(tmp_path: Path) -> None:
    data = wsol(
        tmp_path,
        ("images/a.png,0,0,45,5", "images/b.png,9,0,3,4"),
        class_labels=("images/a.png,5", "images/b.png,1"),
    )
    message = problems_of(data)
    assert message.count(str(tmp_path)) >= 4
    assert "3 problem(s)" in message


def test_skip_invalid_leaves_images_out_and_says_so(tmp_path: Path) -> None:
    data = wsol(tmp_path, ("images/a.png,0,0,5,5", "images/b.png,0,0,99,5"))
    dataset = load_dataset(data, resolve, skip_invalid=True)
    assert [s.name for s in dataset.samples] == ["images/a.png"]
    assert len(dataset.skipped) == 1
    assert dataset.skipped[0].startswith(f"{data / 'localization.txt'}:2: images/b.png: box")


def test_nothing_left(tmp_path: Path) -> None:
    data = wsol(tmp_path, class_labels=("images/a.png,9", "images/b.png,9"))
    with pytest.raises(DatasetError, match="no image left") as caught:
        load_dataset(data, resolve, skip_invalid=True)
    assert caught.value.message == f"{data}: no image left to evaluate"
    assert [d.split(": ")[1] for d in caught.value.details] == ["images/a.png", "images/b.png"]


def test_missing_metadata_file_and_splits(tmp_path: Path) -> None:
    data = wsol(tmp_path / "test")
    assert load_dataset(tmp_path, resolve, split="test").samples[0].label == 0
    with pytest.raises(DatasetError, match="splits test; pick one with split="):
        load_dataset(tmp_path, resolve)
    (data / "localization.txt").unlink()
    with pytest.raises(DatasetError, match=r"missing localization\.txt"):
        load_dataset(data, resolve)


def test_limit_keeps_the_first_images(tmp_path: Path) -> None:
    """Problems of images beyond the limit do not stop it; lines about no image still do."""
    data = wsol(
        tmp_path,
        ("images/a.png,0,0,5,5", "images/b.png,0,0,1,1", "images/missing.png,0,0,x,1"),
        image_ids=("images/a.png", "images/b.png", "images/missing.png"),
    )
    assert [s.name for s in load_dataset(data, resolve, limit=2).samples] == [
        "images/a.png",
        "images/b.png",
    ]
    assert "missing.png" in problems_of(data, limit=3)
    (data / "class_labels.txt").write_text("images/a.png,0\nimages/b.png,1\nimages/c.png,1\n")
    assert "class_labels.txt:3: images/c.png: not listed" in problems_of(data, limit=1)


def test_images_root_elsewhere(tmp_path: Path) -> None:
    data = wsol(tmp_path / "meta")
    (tmp_path / "store").mkdir()
    (data / "images").rename(tmp_path / "store" / "images")
    assert "is missing" in problems_of(data)
    moved = load_dataset(data, resolve, images=tmp_path / "store")
    assert moved.samples[0].path == tmp_path / "store" / "images" / "a.png"


def test_exif_rotated_image_size(tmp_path: Path) -> None:
    data = wsol(tmp_path, image_sizes=("images/a.png,40,30", "images/b.png,40,30"))
    image(data / "images" / "b.png", (40, 30), orientation=6)  # shown as 30 x 40
    message = problems_of(data)
    assert "annotated as 40x30 but the image is 30x40" in message
    assert "ignores its EXIF rotation" in message


def test_wsol_masks(tmp_path: Path) -> None:
    data = wsol(
        tmp_path,
        (
            "images/a.png,masks/a1.png,masks/a_ignore.png",
            "images/a.png,masks/a2.png,",
            "images/b.png,masks/b.png,",
        ),
    )
    for name in ("a1", "a2", "a_ignore", "b"):
        image(data / "masks" / f"{name}.png")
    dataset = load_dataset(data, resolve)
    first = dataset.samples[0]
    assert first.masks == (data / "masks" / "a1.png", data / "masks" / "a2.png")
    assert first.ignore == data / "masks" / "a_ignore.png"
    assert first.boxes == ()
    (data / "masks" / "b.png").unlink()
    assert f"{data / 'localization.txt'}:3: images/b.png: mask file" in problems_of(data)


# -- CSV -------------------------------------------------------------------------------------------


def test_csv_with_header_names_and_indices(tmp_path: Path) -> None:
    image(tmp_path / "pics" / "a.png")
    image(tmp_path / "pics" / "b.png")
    csv_file = write(
        tmp_path / "boxes.csv",
        "path,label,x0,y0,x1,y1",
        "pics/a.png,cat,1,2,10,20",
        "",
        "# a comment",
        "pics/a.png,cat,20,2,30,20",
        '"pics/b.png",1,0,0,39,29',
        "pics/b.png,cat,0,0,3,3",
    )
    dataset = load_dataset(csv_file, resolve)
    assert dataset.layout == "csv"
    by_name = {s.name: s for s in dataset.samples}
    assert by_name["pics/a.png"].boxes == ((1, 2, 10, 20), (20, 2, 30, 20))
    assert by_name["pics/b.png#1"].label == 1  # one image, two labels: two samples
    assert by_name["pics/b.png#cat"].label == 0
    assert load_dataset(tmp_path, resolve).layout == "csv"  # the folder's only CSV


@pytest.mark.parametrize(
    ("row", "says"),
    [
        ("pics/a.png,cat,1,2,10", "5 fields; expected path,label,x0,y0,x1,y1"),
        ("pics/a.png,cat,1,2,10,x", "y1='x' is not a number"),
        ("pics/a.png,cat,10,2,1,20", "x1 < x0"),
        ("pics/a.png,cat,1,2,10,31", "outside the 40x30 image"),
        ("pics/a.png,bird,1,2,10,20", "unknown label"),
        ("pics/gone.png,cat,1,2,10,20", "gone.png is missing"),
    ],
)
def test_csv_malformed_rows(tmp_path: Path, row: str, says: str) -> None:
    image(tmp_path / "pics" / "a.png")
    csv_file = write(tmp_path / "boxes.csv", "pics/a.png,dog,0,0,1,1", row)
    message = problems_of(csv_file)
    assert f"{csv_file}:2: " in message
    assert says in message


# -- VOC / ImageNet XML ------------------------------------------------------------------------------


def voc_xml(filename: str, objects: list[tuple[str, tuple[str, ...]]], size=(40, 30)) -> str:
    parts = [
        "<annotation>",
        f"  <filename>{filename}</filename>",
        f"  <size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>",
    ]
    for name, (x0, y0, x1, y1) in objects:
        parts += [
            "  <object>",
            f"    <name>{name}</name>",
            "    <bndbox>",
            f"      <xmin>{x0}</xmin>",
            f"      <ymin>{y0}</ymin>",
            f"      <xmax>{x1}</xmax>",
            f"      <ymax>{y1}</ymax>",
            "    </bndbox>",
            "  </object>",
        ]
    return "\n".join([*parts, "</annotation>", ""])


def voc_folder(root: Path) -> Path:
    image(root / "JPEGImages" / "001.jpg")
    image(root / "JPEGImages" / "002.jpg")
    write(root / "Annotations" / "001.xml", voc_xml("001.jpg", [("cat", ("1", "2", "10", "20"))]))
    write(
        root / "Annotations" / "002.xml",
        voc_xml("002.jpg", [("dog", ("0", "0", "5", "5")), ("dog", ("6", "6", "9", "9"))]),
    )
    write(root / "ImageSets" / "Main" / "val.txt", "002")
    return root


def test_voc_folder(tmp_path: Path) -> None:
    dataset = load_dataset(voc_folder(tmp_path), resolve)
    assert dataset.layout == "voc"
    assert [(s.name, s.label, len(s.boxes)) for s in dataset.samples] == [
        ("001", 0, 1),
        ("002", 1, 2),
    ]
    assert dataset.samples[0].path == tmp_path / "JPEGImages" / "001.jpg"
    assert [s.name for s in load_dataset(tmp_path, resolve, split="val").samples] == ["002"]
    with pytest.raises(DatasetError, match="split='test'"):
        load_dataset(tmp_path, resolve, split="test")


def test_imagenet_layout_wordnet_ids_and_guessed_suffix(tmp_path: Path) -> None:
    image(tmp_path / "Data" / "CLS-LOC" / "val" / "ILSVRC2012_val_00000001.JPEG")
    write(
        tmp_path / "Annotations" / "CLS-LOC" / "val" / "ILSVRC2012_val_00000001.xml",
        voc_xml("ILSVRC2012_val_00000001", [("n02085620", ("3", "4", "30", "25"))]),
    )
    dataset = load_dataset(tmp_path, resolve, split="val")
    (sample,) = dataset.samples
    assert sample.label == 1
    assert sample.path.name == "ILSVRC2012_val_00000001.JPEG"


def test_voc_several_classes_in_one_image(tmp_path: Path) -> None:
    image(tmp_path / "x.png")
    write(
        tmp_path / "x.xml",
        voc_xml("x.png", [("cat", ("0", "0", "5", "5")), ("dog", ("1", "1", "9", "9"))]),
    )
    dataset = load_dataset(tmp_path, resolve)
    assert sorted((s.name, s.label) for s in dataset.samples) == [("x#cat", 0), ("x#dog", 1)]


@pytest.mark.parametrize(
    ("objects", "line", "says"),
    [
        ([("cat", ("1", "2", "ten", "20"))], 9, "<xmax> 'ten' is not a number"),
        ([("cat", ("10", "2", "1", "20"))], 6, "x1 < x0"),
        ([("cat", ("1", "2", "10", "31"))], 6, "outside the 40x30 image"),
        ([("bird", ("1", "2", "10", "20"))], 5, "unknown label"),
        ([], 1, "no <object>"),
    ],
)
def test_voc_malformed(tmp_path: Path, objects: list, line: int, says: str) -> None:
    image(tmp_path / "x.png")
    xml = write(tmp_path / "x.xml", voc_xml("x.png", objects))
    message = problems_of(tmp_path)
    assert f"{xml}:{line}: x: " in message
    assert says in message


def test_voc_broken_xml_missing_image_and_doctype(tmp_path: Path) -> None:
    write(
        tmp_path / "a.xml",
        "<annotation>",
        "  <filename>a.png</filename>",
        "  <object>",
        "</annotation>",
    )
    write(tmp_path / "b.xml", voc_xml("b.png", [("cat", ("1", "1", "2", "2"))]))
    write(tmp_path / "c.xml", '<!DOCTYPE a [<!ENTITY x "y">]>', voc_xml("c.png", []))
    message = problems_of(tmp_path)
    assert f"{tmp_path / 'a.xml'}:4: a: not well-formed XML" in message
    assert f"{tmp_path / 'b.xml'}:2: b: no image file 'b.png'" in message
    assert f"{tmp_path / 'c.xml'}:1: c: a DOCTYPE declaration is not accepted" in message


# -- layouts ------------------------------------------------------------------------------------------


def test_detect_layout(tmp_path: Path) -> None:
    assert detect_layout(wsol(tmp_path / "w")) == "wsol"
    assert detect_layout(voc_folder(tmp_path / "v")) == "voc"
    assert detect_layout(write(tmp_path / "c" / "x.csv", "a,b")) == "csv"
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="not a known layout"):
        detect_layout(tmp_path / "empty")
    with pytest.raises(DatasetError, match=r"must be a \.csv"):
        detect_layout(write(tmp_path / "x.txt", "a"))
    with pytest.raises(DatasetError, match="no such file or folder"):
        load_dataset(tmp_path / "nowhere", resolve)
    with pytest.raises(DatasetError, match="layout='yaml'"):
        load_dataset(tmp_path / "w", resolve, layout="yaml")

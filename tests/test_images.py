"""gapcam.images: every input kind becomes the RGB picture the user sees, or an ImageError."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import square_image
from PIL import Image, TiffImagePlugin

import gapcam
from gapcam import cli
from gapcam.boxes import box_iou
from gapcam.errors import ImageError
from gapcam.images import LoadedImage, expand_inputs, load_image

ORIENTATION = 0x0112
# EXIF orientation -> how to store a picture so that a viewer shows it upright
STORE_FOR = {
    3: Image.Transpose.ROTATE_180,
    6: Image.Transpose.ROTATE_90,  # the viewer turns it 90 degrees clockwise
    8: Image.Transpose.ROTATE_270,  # the viewer turns it 90 degrees counter-clockwise
}
SHOWN_SIZE = (300, 200)
SQUARE = (200, 20, 260, 80)


def _pixels(loaded: LoadedImage) -> np.ndarray:
    assert loaded.image.mode == "RGB"
    return np.asarray(loaded.image)


def _save(image: Image.Image, path: Path, **options) -> Path:
    image.save(path, **options)
    return path


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _exif_jpeg(path: Path, orientation: int) -> Path:
    shown = square_image(SHOWN_SIZE, SQUARE)
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    stored = shown.transpose(STORE_FOR[orientation])
    return _save(stored, path, format="JPEG", quality=95, exif=exif.tobytes())


# -- EXIF orientation -------------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", sorted(STORE_FOR))
def test_exif_rotated_jpeg_loads_as_shown(tmp_path: Path, orientation: int) -> None:
    path = _exif_jpeg(tmp_path / "rotated.jpg", orientation)
    with Image.open(path) as raw:
        assert raw.size != SHOWN_SIZE or orientation == 3  # stored sideways
    loaded = load_image(path)
    assert loaded.size == SHOWN_SIZE
    shown = np.asarray(square_image(SHOWN_SIZE, SQUARE), dtype=np.int16)
    assert np.abs(_pixels(loaded).astype(np.int16) - shown).mean() < 3  # JPEG noise only
    assert loaded.path == path
    assert loaded.name == str(path)


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_rotated_jpeg_box_lands_on_the_shown_square(
    tmp_path: Path, rednet: gapcam.GapModel, orientation: int
) -> None:
    path = _exif_jpeg(tmp_path / "rotated.jpg", orientation)
    localizer = gapcam.Localizer(rednet)
    for source in (path, path.read_bytes()):
        result = localizer(source, classes=["red"])
        assert result.size == SHOWN_SIZE
        box = result.maps[0].boxes[0]
        x0, y0, x1, y1 = SQUARE
        cell = 10  # one feature-map cell (32 across the 300-pixel width) of bilinear blur
        assert x0 - cell <= box.x0 <= x0, box
        assert y0 - cell <= box.y0 <= y0, box
        assert x1 <= box.x1 <= x1 + cell, box
        assert y1 <= box.y1 <= y1 + cell, box
        assert box_iou([box.as_list()], [SQUARE])[0, 0] > 0.7, box
        assert result.maps[0].boxes == result.maps[0].boxes[:1]  # nothing else is red


# -- image modes ---------------------------------------------------------------------------------


def test_grayscale(tmp_path: Path) -> None:
    gray = Image.fromarray(np.array([[0, 100, 255]], dtype=np.uint8))
    assert gray.mode == "L"
    rgb = _pixels(load_image(_save(gray, tmp_path / "gray.png")))
    np.testing.assert_array_equal(rgb, np.repeat(np.array([[0, 100, 255]])[..., None], 3, axis=2))


def test_rgba_is_composited_on_white(tmp_path: Path) -> None:
    rgba = np.array([[[255, 0, 0, 255], [255, 0, 0, 0], [0, 0, 0, 128]]], dtype=np.uint8)
    image = Image.fromarray(rgba)
    assert image.mode == "RGBA"
    rgb = _pixels(load_image(_save(image, tmp_path / "alpha.png"))).astype(int)
    np.testing.assert_array_equal(rgb[0, 0], [255, 0, 0])
    np.testing.assert_array_equal(rgb[0, 1], [255, 255, 255])
    assert np.abs(rgb[0, 2] - 127).max() <= 1


def test_la_is_composited_on_white() -> None:
    image = Image.fromarray(np.array([[[0, 0], [0, 255], [200, 255]]], dtype=np.uint8), "LA")
    np.testing.assert_array_equal(
        _pixels(load_image(image))[0], [[255, 255, 255], [0, 0, 0], [200, 200, 200]]
    )


@pytest.mark.parametrize("suffix", [".png", ".gif"])
def test_palette_with_transparency(tmp_path: Path, suffix: str) -> None:
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 0, 255] + [0, 0, 0] * 254)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    path = _save(image, tmp_path / f"palette{suffix}", transparency=1)
    with Image.open(path) as reopened:
        assert reopened.mode == "P"
        assert "transparency" in reopened.info
    np.testing.assert_array_equal(_pixels(load_image(path))[0], [[255, 0, 0], [255, 255, 255]])


def test_cmyk(tmp_path: Path) -> None:
    cmyk = np.array([[[0, 255, 255, 0], [0, 0, 0, 0], [0, 0, 0, 255]]], dtype=np.uint8)
    image = Image.frombytes("CMYK", (3, 1), cmyk.tobytes())
    rgb = _pixels(load_image(_save(image, tmp_path / "cmyk.tif")))
    np.testing.assert_array_equal(rgb[0], [[255, 0, 0], [255, 255, 255], [0, 0, 0]])


def test_16_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 100, 1000, 30000, 65535]], dtype=np.uint16)
    path = _save(Image.fromarray(values), tmp_path / "deep.png")
    with Image.open(path) as reopened:
        assert reopened.mode.startswith("I")
    rgb = _pixels(load_image(path))
    expected = np.round(values.astype(np.float64) * 255 / 65535).astype(
        np.uint8
    )  # 0, 0, 4, 117, 255
    np.testing.assert_array_equal(rgb[..., 0], expected)
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])


def test_float_image(tmp_path: Path) -> None:
    values = np.array([[0.0, 0.25, 1.0]], dtype=np.float32)
    path = _save(Image.fromarray(values, "F"), tmp_path / "float.tif")
    np.testing.assert_array_equal(_pixels(load_image(path))[..., 1], [[0, 64, 255]])


def test_one_bit(tmp_path: Path) -> None:
    image = Image.new("1", (3, 1))
    image.putpixel((1, 0), 1)
    rgb = _pixels(load_image(_save(image, tmp_path / "bits.png")))
    np.testing.assert_array_equal(rgb[0], [[0, 0, 0], [255, 255, 255], [0, 0, 0]])


@pytest.mark.parametrize("suffix", [".gif", ".tif"])
def test_multi_frame_uses_the_first_frame(tmp_path: Path, suffix: str) -> None:
    red, blue = Image.new("RGB", (4, 4), (255, 0, 0)), Image.new("RGB", (4, 4), (0, 0, 255))
    path = _save(red, tmp_path / f"frames{suffix}", save_all=True, append_images=[blue])
    loaded = load_image(path)
    np.testing.assert_array_equal(_pixels(loaded)[0, 0], [255, 0, 0])
    assert any("multi-frame" in note and "2 frames" in note for note in loaded.notes)


def test_single_frame_has_no_notes(cat_path: Path) -> None:
    assert load_image(cat_path).notes == ()


# -- arrays, tensors, bytes, PIL ---------------------------------------------------------------


@pytest.fixture
def rgb_array() -> np.ndarray:
    return np.random.default_rng(3).integers(0, 256, (5, 7, 3), dtype=np.uint8)


def test_numpy_uint8(rgb_array: np.ndarray) -> None:
    np.testing.assert_array_equal(_pixels(load_image(rgb_array)), rgb_array)
    gray = rgb_array[..., 0]
    for array in (gray, gray[..., None]):
        np.testing.assert_array_equal(_pixels(load_image(array)), np.dstack([gray] * 3))


def test_numpy_rgba_composited(rgb_array: np.ndarray) -> None:
    alpha = np.zeros((5, 7, 1), dtype=np.uint8)
    alpha[0, 0] = 255
    rgb = _pixels(load_image(np.concatenate([rgb_array, alpha], axis=2)))
    np.testing.assert_array_equal(rgb[0, 0], rgb_array[0, 0])
    assert (rgb[1:] == 255).all()


def test_numpy_float_and_uint16_and_bool(rgb_array: np.ndarray) -> None:
    as_float = rgb_array / 255.0
    np.testing.assert_array_equal(_pixels(load_image(as_float)), rgb_array)
    np.testing.assert_array_equal(_pixels(load_image(as_float.astype(np.float32))), rgb_array)
    as_16 = rgb_array.astype(np.uint16) * 257
    np.testing.assert_array_equal(_pixels(load_image(as_16)), rgb_array)
    flags = rgb_array[..., 0] > 127
    np.testing.assert_array_equal(_pixels(load_image(flags))[..., 0], flags * 255)
    clipped = _pixels(load_image(np.array([[-1.0, 0.5, 2.0]])))[0, :, 0]
    np.testing.assert_array_equal(clipped, [0, 128, 255])


def test_torch_tensors(rgb_array: np.ndarray) -> None:
    chw = torch.from_numpy(rgb_array).permute(2, 0, 1)
    np.testing.assert_array_equal(_pixels(load_image(chw)), rgb_array)
    np.testing.assert_array_equal(_pixels(load_image(chw.float() / 255)), rgb_array)
    grad = (chw.float() / 255).requires_grad_()
    np.testing.assert_array_equal(_pixels(load_image(grad)), rgb_array)
    gray = chw[:1]
    np.testing.assert_array_equal(_pixels(load_image(gray))[..., 2], rgb_array[..., 0])
    np.testing.assert_array_equal(_pixels(load_image(gray[0]))[..., 1], rgb_array[..., 0])


def test_bytes_inputs(rgb_array: np.ndarray) -> None:
    data = _png_bytes(Image.fromarray(rgb_array))
    for source in (data, bytearray(data), memoryview(data)):
        loaded = load_image(source, name="upload.png")
        np.testing.assert_array_equal(_pixels(loaded), rgb_array)
        assert loaded.name == "upload.png"
        assert loaded.path is None
    assert load_image(data).name == "<bytes>"


def test_pil_and_loaded_inputs(rgb_array: np.ndarray) -> None:
    image = Image.fromarray(rgb_array)
    loaded = load_image(image)
    np.testing.assert_array_equal(_pixels(loaded), rgb_array)
    assert load_image(loaded) is loaded
    assert load_image(image.convert("L")).image.mode == "RGB"


# -- bad inputs --------------------------------------------------------------------------------------


def _jpeg_bytes(seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    array = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(array).save(buffer, "JPEG")
    return buffer.getvalue()


BAD_FILES = {
    "empty.jpg": (b"", "empty"),
    "truncated.jpg": (_jpeg_bytes()[:400], "truncated"),
    "truncated.png": (_png_bytes(Image.new("RGB", (64, 64), (9, 9, 9)))[:60], "truncated"),
    "random.png": (np.random.default_rng(5).bytes(2000), "not an image"),
    "notes.jpg": (b"this is a text file, not a photo\n" * 20, "not an image"),
}


@pytest.mark.parametrize("filename", list(BAD_FILES))
def test_bad_files_raise_image_error_naming_the_file(tmp_path: Path, filename: str) -> None:
    data, message = BAD_FILES[filename]
    path = tmp_path / filename
    path.write_bytes(data)
    with pytest.raises(ImageError, match=message) as info:
        load_image(path)
    assert str(info.value).startswith(str(path))
    assert "\n" not in str(info.value)


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no such file") as info:
        load_image(tmp_path / "nope.jpg")
    assert str(tmp_path / "nope.jpg") in str(info.value)
    with pytest.raises(ImageError, match="is a folder"):
        load_image(tmp_path)


def test_truncated_pil_image_raises_image_error(tmp_path: Path) -> None:
    path = tmp_path / "cut.jpg"
    data = _jpeg_bytes()
    path.write_bytes(data[: len(data) // 2])
    with Image.open(path) as lazy, pytest.raises(ImageError, match="truncated"):
        load_image(lazy)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (b"", "empty"),
        (3.5, "type float"),
        (None, "type NoneType"),
        (np.zeros((4, 4), dtype=np.int64), "dtype int64"),
        (np.zeros((4, 4, 2), dtype=np.uint8), "not an image"),
        (np.zeros((0, 4, 3), dtype=np.uint8), "no pixels"),
        (np.array([[np.nan, 0.0]]), "NaN"),
        (torch.zeros(2, 3, 4, 5), "not an image"),
    ],
)
def test_bad_objects_raise_image_error(source: object, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        load_image(source)


def _one_bit_png(path: Path, width: int, height: int) -> Path:
    """A valid all-black 1-bit PNG of any size, written row-block by row-block (few KB)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    packer = zlib.compressobj(9)
    rows = (b"\x00" + bytes((width + 7) // 8)) * 500
    idat = b"".join(packer.compress(rows) for _ in range(height // 500))
    idat += packer.compress((b"\x00" + bytes((width + 7) // 8)) * (height % 500)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat)
    path.write_bytes(png + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def huge_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _one_bit_png(tmp_path_factory.mktemp("huge") / "huge.png", 20000, 20000)


def test_huge_image_is_refused_from_its_header(huge_png: Path) -> None:
    assert huge_png.stat().st_size < 200_000
    for limit in (gapcam.images.DEFAULT_MAX_PIXELS, 50_000_000):
        with pytest.raises(ImageError, match="pixels") as info:
            load_image(huge_png, max_pixels=limit)
        assert str(info.value).startswith(str(huge_png))


def test_max_pixels_limit_names_the_size(tmp_path: Path) -> None:
    path = _one_bit_png(tmp_path / "wide.png", 3000, 1000)
    assert load_image(path).size == (3000, 1000)
    with pytest.raises(ImageError, match=r"3000x1000 pixels is over the limit of 1,000,000"):
        load_image(path, max_pixels=1_000_000)
    with pytest.raises(ImageError, match="over the limit"):
        load_image(path.read_bytes(), max_pixels=1_000_000)


# -- expand_inputs ------------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for relative in ("a.jpg", "sub/b.PNG", "sub/d.jpeg", "sub/deeper/c.gif", "notes.txt"):
        path = tmp_path / "photos" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    return tmp_path


def test_expand_folder_recursively(tree: Path) -> None:
    found, problems = expand_inputs([str(tree / "photos")])
    names = [str(relative.as_posix()) for _, relative in found]
    assert names == ["a.jpg", "sub/b.PNG", "sub/d.jpeg", "sub/deeper/c.gif"]
    assert all(path == tree / "photos" / relative for path, relative in found)
    assert problems == []


def test_expand_globs_and_plain_files(tree: Path) -> None:
    found, problems = expand_inputs(
        [
            str(tree / "photos" / "*.jpg"),
            str(tree / "photos" / "**" / "*.gif"),
            str(tree / "photos" / "a.jpg"),  # already found: not repeated
            str(tree / "missing.jpg"),  # no glob: kept, reported when read
        ]
    )
    assert [(p.name, r.as_posix()) for p, r in found] == [
        ("a.jpg", "a.jpg"),
        ("c.gif", "c.gif"),
        ("missing.jpg", "missing.jpg"),
    ]
    assert problems == []


def test_expand_finds_each_file_once_through_links(tree: Path) -> None:
    """A file is one input however it is reached: through a link to it inside a folder, a
    linked folder given as an argument, or its own path (each file is resolved once, its folder
    once for all its plain files)."""
    photos = tree / "photos"
    (tree / "linked").symlink_to(photos, target_is_directory=True)
    (tree / "other").mkdir()
    (tree / "other" / "to-a.jpg").symlink_to(photos / "a.jpg")
    (tree / "other" / "own.jpg").write_bytes(b"x")
    found, problems = expand_inputs(
        [str(tree / "linked"), str(photos / "sub" / "b.PNG"), str(tree / "other")]
    )
    assert [(p.relative_to(tree).as_posix(), r.as_posix()) for p, r in found] == [
        ("linked/a.jpg", "a.jpg"),
        ("linked/sub/b.PNG", "sub/b.PNG"),
        ("linked/sub/d.jpeg", "sub/d.jpeg"),
        ("linked/sub/deeper/c.gif", "sub/deeper/c.gif"),
        ("other/own.jpg", "own.jpg"),  # other/to-a.jpg is a.jpg, found already
    ]
    assert problems == []
    # the output folder, reached through the linked folder, is still skipped
    (photos / "out").mkdir()
    (photos / "out" / "x.cam.jpg").write_bytes(b"x")
    found, _ = expand_inputs([str(tree / "linked")], exclude=[photos / "out"])
    assert "x.cam.jpg" not in [p.name for p, _ in found]


def test_expand_reports_what_matched_nothing(tree: Path) -> None:
    pattern, empty = str(tree / "photos" / "*.bmp"), str(tree / "empty")
    found, problems = expand_inputs([pattern, empty])
    assert found == []
    assert problems[0] == f"{pattern}: pattern matched no files"
    assert problems[1].startswith(f"{empty}: folder holds no image files")


def test_expansion_skips_the_output_folder_inside_an_input_folder(tmp_path: Path) -> None:
    """A second run over a folder does not read the first run's overlays; an --out that is the
    input folder itself (or above it) excludes nothing."""
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "gapcam-out").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "gapcam-out" / "a.cam.png")
    found, _ = expand_inputs([str(tmp_path)], exclude=[tmp_path / "gapcam-out"])
    assert [str(relative) for _, relative in found] == ["a.png"]
    found, _ = expand_inputs([str(tmp_path / "*.png")], exclude=[tmp_path / "gapcam-out"])
    assert [str(relative) for _, relative in found] == ["a.png"]
    found, _ = expand_inputs([str(tmp_path)], exclude=[tmp_path])
    assert sorted(str(relative) for _, relative in found) == ["a.png", "gapcam-out/a.cam.png"]


# -- warnings while decoding become the file's notes ---------------------------------------------

#: ASCII tags that live outside the IFD entry (more than 4 bytes), one per test file
TEXT_TAGS = (269, 270, 271, 272, 285, 305, 315, 316)


def _bad_tag_tiff(path: Path, tags: tuple[int, ...]) -> Path:
    """A small RGB TIFF whose ``tags`` claim a megabyte of data each: Pillow warns "Tag data
    larger than file. Skipping tag N" for each, and still decodes the picture."""
    info = TiffImagePlugin.ImageFileDirectory_v2()
    for tag in tags:
        info[tag] = f"text of tag {tag}, long enough to be stored elsewhere"
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(buffer, "TIFF", tiffinfo=info)
    data = bytearray(buffer.getvalue())
    start = struct.unpack("<I", data[4:8])[0]
    for i in range(struct.unpack("<H", data[start : start + 2])[0]):
        entry = start + 2 + 12 * i
        if struct.unpack("<H", data[entry : entry + 2])[0] in tags:
            data[entry + 4 : entry + 8] = struct.pack("<I", 10**6)
    path.write_bytes(bytes(data))
    return path


def _tag_note(tag: int) -> str:
    return f"decoder warning: UserWarning: Tag data larger than file. Skipping tag {tag}"


def test_decode_warnings_become_notes_not_stderr(tmp_path: Path) -> None:
    path = _bad_tag_tiff(tmp_path / "tags.tif", (270,))
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        loaded = load_image(path)
        assert load_image(path.read_bytes()).notes == loaded.notes
    assert loaded.notes == (_tag_note(270),)
    np.testing.assert_array_equal(_pixels(loaded)[0, 0], [10, 200, 30])
    assert shown == []  # nothing reached the usual warning display


def test_many_warnings_are_counted_not_listed(tmp_path: Path) -> None:
    path = _bad_tag_tiff(tmp_path / "tags.tif", TEXT_TAGS)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        notes = load_image(path).notes
    assert notes == (
        *(_tag_note(tag) for tag in TEXT_TAGS[: gapcam.images.WARNING_NOTES]),
        f"{len(TEXT_TAGS) - gapcam.images.WARNING_NOTES} more decoder warnings not shown",
    )


def test_a_warning_made_an_error_is_the_files_error(tmp_path: Path) -> None:
    path = _bad_tag_tiff(tmp_path / "tags.tif", (270,))
    with pytest.raises(ImageError) as info:  # pytest runs with warnings as errors
        load_image(path)
    assert str(info.value) == (
        f"{path}: cannot decode the image (UserWarning: Tag data larger than file. Skipping "
        "tag 270)"
    )


def test_warnings_go_to_the_file_that_raised_them_across_threads(tmp_path: Path) -> None:
    """Eight threads decode files with and without warnings while the main thread warns: each
    file gets exactly its own notes, the main thread's warnings are shown as usual."""
    paths = {}
    for i, tag in enumerate(TEXT_TAGS):
        paths[_bad_tag_tiff(tmp_path / f"bad{i}.tif", (tag,))] = (_tag_note(tag),)
        clean = tmp_path / f"clean{i}.png"
        Image.new("RGB", (8, 8)).save(clean)
        paths[clean] = ()
    order = list(paths) * 6
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(load_image, path) for path in order]
            for i in range(50):
                warnings.warn(f"main thread {i}", UserWarning, stacklevel=1)
            notes = [future.result().notes for future in futures]
    assert notes == [paths[path] for path in order]
    assert [str(w.message) for w in shown] == [f"main thread {i}" for i in range(50)]


def _old_scale_to_8bit(image: Image.Image) -> np.ndarray:
    """The conversion as it was before it worked a block of rows at a time."""
    array = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        finite = array[~np.isnan(array)]
        top = 1.0 if finite.size and finite.max() <= 1.0 else 255.0
    elif image.mode.startswith("I;16") or (array.size and array.max() > 255):
        top = 65535.0
    else:
        top = 255.0
    with np.errstate(over="ignore", invalid="ignore"):
        scaled = np.clip(np.nan_to_num(array) * (255.0 / top), 0, 255)
    return scaled.round().astype(np.uint8)


@pytest.mark.parametrize("kind", ["I;16", "I-small", "I-large", "F-unit", "F-wide", "F-odd"])
def test_wide_modes_scale_as_before_in_blocks(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(11)
    shape = (37, 53)
    if kind == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, shape, dtype=np.uint16))
    elif kind.startswith("I"):
        top = 256 if kind == "I-small" else 1 << 20
        image = Image.fromarray(rng.integers(-50, top, shape, dtype=np.int32))
    else:
        values = rng.random(shape, dtype=np.float32) * (1.0 if kind == "F-unit" else 300.0)
        if kind == "F-odd":
            values[::5, ::7] = np.nan
            values[3, 4], values[6, 7] = np.inf, -np.inf
        image = Image.fromarray(values)
    monkeypatch.setattr(gapcam.images, "_SCALE_BLOCK_VALUES", 53 * 4)  # 10 blocks of 4 rows
    loaded = load_image(image)
    np.testing.assert_array_equal(_pixels(loaded)[..., 0], _old_scale_to_8bit(image))
    odd = int(np.count_nonzero(~np.isfinite(np.asarray(image, dtype=np.float64))))
    expected = (f"{odd:,} NaN or infinite pixel values, shown as 0 or clipped",) if odd else ()
    assert loaded.notes == expected


def test_an_all_nan_float_image_warns_nothing(tmp_path: Path) -> None:
    path = tmp_path / "nan.tif"
    Image.fromarray(np.full((4, 5), np.nan, dtype=np.float32)).save(path)
    loaded = load_image(path)  # pytest makes any warning an error: none is raised
    assert _pixels(loaded).max() == 0
    assert loaded.notes == ("20 NaN or infinite pixel values, shown as 0 or clipped",)


def test_the_cli_shows_decode_warnings_as_notes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = _bad_tag_tiff(tmp_path / "tags.tif", (270, 305))
    report = tmp_path / "report.json"
    argv = ["localize", str(bad), str(bad), "--out", str(tmp_path / "out"), "--json", str(report)]
    assert cli.main([*argv, "--no-overlay", "--backend", "eager"]) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines() == ["gapcam: 1 of 1 inputs done, 0 failed"]
    assert f"  note: {_tag_note(270)}" in captured.out.splitlines()
    (result,) = json.loads(report.read_text())["results"]
    assert result["notes"] == [_tag_note(270), _tag_note(305)]


@pytest.mark.slow
def test_a_user_never_sees_a_python_warning(tmp_path: Path) -> None:
    """With Python's default warning filters (a user's run), every file gets its notes and
    standard error holds only the summary."""
    first = _bad_tag_tiff(tmp_path / "first.tif", (270,))
    second = _bad_tag_tiff(tmp_path / "second.tif", (270,))  # the same message again
    nan = tmp_path / "nan.tif"
    Image.fromarray(np.full((40, 50), np.nan, dtype=np.float32)).save(nan)
    report = tmp_path / "report.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "gapcam",
            "localize",
            str(first),
            str(second),
            str(nan),
            "--out",
            str(tmp_path / "out"),
            "--json",
            str(report),
            "--backend",
            "eager",
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == ["gapcam: 3 of 3 inputs done, 0 failed"]
    notes = [r["notes"] for r in json.loads(report.read_text())["results"]]
    assert notes == [
        [_tag_note(270)],
        [_tag_note(270)],
        ["2,000 NaN or infinite pixel values, shown as 0 or clipped"],
    ]

"""Overlay drawing: colour lookup, 8-bit blending, display scaling of image, map and boxes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gapcam import overlay
from gapcam.errors import OutputError
from gapcam.outputs import OutputGuard, check_folder
from gapcam.types import Box


def test_colorize_uses_the_lookup_table_ends() -> None:
    lut = overlay.colormap_lut("jet")
    heat = overlay.colorize(np.array([[0.0, 1.0], [0.5, 0.999]], dtype=np.float32), "jet")
    assert heat[0, 0].tolist() == lut[0].tolist()
    assert heat[0, 1].tolist() == lut[255].tolist()
    assert heat[1, 0].tolist() == lut[128].tolist()


def test_unknown_colormap_names_the_option() -> None:
    with pytest.raises(ValueError, match="cmap='nope': not a matplotlib colormap"):
        overlay.colormap_lut("nope")


def test_blend_matches_the_float_formula_within_one_level() -> None:
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (17, 23, 3), dtype=np.uint8)
    heat = rng.integers(0, 256, (17, 23, 3), dtype=np.uint8)
    mixed = np.asarray(overlay.blend(Image.fromarray(photo), heat, 0.3)).astype(float)
    expected = photo * 0.7 + heat * 0.3
    assert np.abs(mixed - expected).max() <= 1.0


@pytest.mark.parametrize(
    ("size", "scale"),
    [
        ((451, 300), 1.0),
        ((8, 8), 28.0),
        ((1000, 10), 4.096),
        ((2048, 1024), 1.0),  # exactly MAX_PIXELS
        ((4032, 3024), (2**21 / (4032 * 3024)) ** 0.5),  # a 12 MP photo is drawn at 2 MP
        ((12000, 9000), (2**21 / (12000 * 9000)) ** 0.5),
        ((10000, 1000), 4096 / 10000),  # over both bounds: the tighter one
    ],
)
def test_display_scale(size: tuple[int, int], scale: float) -> None:
    assert overlay.display_scale(size) == pytest.approx(scale)


@pytest.mark.parametrize("size", [(4032, 3024), (3000, 1000), (1449, 1449), (2049, 1024)])
def test_a_large_image_is_drawn_at_the_size_of_its_maps(size: tuple[int, int]) -> None:
    """Over MAX_PIXELS the figure has the size of the image's maps (``result.map_size``): the
    heatmap is drawn as it is, never resampled, and the photo and boxes are brought to it."""
    from gapcam.result import MAP_PIXELS, map_size

    assert overlay.MAX_PIXELS == MAP_PIXELS
    width, height = size
    rows, columns = map_size(width, height)
    heat = np.linspace(0, 1, rows * columns, dtype=np.float32).reshape(rows, columns)
    shown, shown_map, boxes = overlay.fit_for_display(
        Image.new("RGB", size), heat, [Box(0, 0, width, height)]
    )
    assert shown.size == (columns, rows)
    assert shown_map is heat
    assert boxes[0].as_list() == pytest.approx([0.0, 0.0, columns, rows])
    figure = overlay.render(Image.new("RGB", size), heat, caption="a large photo")
    assert figure.width == columns
    assert figure.height > rows  # the caption band above


def test_small_images_are_enlarged_with_their_boxes_and_big_ones_shrunk() -> None:
    image = Image.new("RGB", (8, 8), (10, 20, 30))
    normalized = np.zeros((8, 8), dtype=np.float32)
    normalized[2:4, 5:7] = 1.0
    shown, shown_map, boxes = overlay.fit_for_display(image, normalized, [Box(5, 2, 7, 4, 4)])
    assert shown.size == (224, 224)
    assert boxes[0].as_list() == [140.0, 56.0, 196.0, 112.0]
    assert shown_map[56:112, 140:196].min() == 1.0
    assert shown_map.sum() == 56 * 56
    figure = overlay.render(image, normalized, boxes=[Box(5, 2, 7, 4, 4)], caption="tiny")
    assert figure.width == 224
    assert figure.height > 224

    big = Image.new("RGB", (8192, 100))
    shown, shown_map, boxes = overlay.fit_for_display(
        big, np.zeros((100, 8192), np.float32), [Box(0, 0, 8192, 100)]
    )
    assert shown.size == (4096, 50)
    assert shown_map.shape == (50, 4096)
    assert boxes[0].as_list() == [0.0, 0.0, 4096.0, 50.0]


def test_output_folder_checks(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_folder(afile / "deeper")
    check_folder(tmp_path / "new" / "folder")  # may be created: fine
    with pytest.raises(OutputError, match="is a file, not a folder"):
        OutputGuard().check(afile / "x.png")

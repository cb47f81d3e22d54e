"""How the public objects show themselves: a Result as its overlay in a notebook
(``_repr_png_``), and one-line reprs of Result, Localizer and GapModel."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import gapcam
from gapcam.models import GapModel

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_pixels(data: bytes) -> Image.Image:
    assert data.startswith(PNG_SIGNATURE)
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        image.load()
        return image.convert("RGB")


def test_a_result_shows_its_overlay_as_png(localizer: gapcam.Localizer, cat_path: Path) -> None:
    result = localizer(cat_path)
    shown = png_pixels(result._repr_png_())
    figure = result.figure()
    # the overlay: the image at its own size (451 x 300 is within the display bounds) under
    # the caption band, pixel for pixel the figure (PNG is lossless)
    assert shown.width == result.size[0] == 451
    assert shown.size == figure.size
    assert shown.height > result.size[1]  # the caption band above the photo
    assert np.array_equal(np.asarray(shown), np.asarray(figure.convert("RGB")))
    # and not just any picture: the heatmap changes the photo's pixels
    band = shown.height - result.size[1]
    photo = np.asarray(result.image.convert("RGB"), dtype=np.int16)
    assert np.abs(np.asarray(shown, dtype=np.int16)[band:] - photo).mean() > 10


def test_a_result_with_several_maps_shows_all_panels(
    localizer: gapcam.Localizer, cat_path: Path
) -> None:
    result = localizer(cat_path, top_k=3)
    shown = png_pixels(result._repr_png_())
    assert shown.size == result.figure().size
    assert shown.width > 3 * result.size[0]  # three panels side by side


def test_a_small_image_is_shown_within_the_display_bounds(
    localizer: gapcam.Localizer, cat_path: Path
) -> None:
    with Image.open(cat_path) as cat:
        icon = cat.convert("RGB").resize((90, 60))
    result = localizer(icon)
    shown = png_pixels(result._repr_png_())
    assert shown.size == result.figure().size
    assert shown.width == 336  # enlarged to a shorter side of 224 (overlay.MIN_SIDE)


def test_result_repr_is_one_short_line(localizer: gapcam.Localizer, cat_path: Path) -> None:
    result = localizer(cat_path, top_k=2)
    text = repr(result)
    assert "\n" not in text, text
    assert len(text) < 300, text
    top = result.predictions[0]
    assert text.startswith(f"Result({str(cat_path)!r}, 451x300, top {top.name!r} ({top.index})")
    assert str(result.maps[0].boxes[0].as_list()) in text
    assert "array" not in text  # the maps' numbers stay out


def test_localizer_repr_names_the_model_and_what_differs(
    localizer: gapcam.Localizer, embedded_model: GapModel
) -> None:
    assert repr(localizer) == "Localizer('efficientnet_lite0')"
    variant = dataclasses.replace(localizer, threshold=0.3, hflip=True)
    assert repr(variant) == "Localizer('efficientnet_lite0', threshold=0.3, hflip=True)"
    text = repr(embedded_model)
    assert text == (
        "GapModel('efficientnet_lite0', 1000 classes, 1280 features, input 224x224, "
        "source='embedded', on cpu)"
    )


def test_a_dilated_model_says_so(embedded_model: GapModel) -> None:
    loc = gapcam.Localizer(embedded_model, output_stride=16)
    assert "output_stride=16" in repr(loc)
    assert repr(loc.gap_model).endswith("output stride 16, on cpu)")


@pytest.mark.parametrize("name", ["a\nb\x1b[31m", "<b>x</b>"])
def test_reprs_escape_names(localizer: gapcam.Localizer, cat_path: Path, name: str) -> None:
    result = dataclasses.replace(localizer(cat_path), name=name)
    text = repr(result)
    assert "\n" not in text
    assert "\x1b" not in text
    assert repr(name) in text

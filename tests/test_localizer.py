"""The Localizer pipeline and its Result: inputs, class selection, identities, real photos."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import square_image
from PIL import Image

import gapcam
from gapcam import cam
from gapcam.boxes import box_iou, boxes_from_map
from gapcam.errors import ClassSelectionError, GapcamError
from gapcam.localizer import Localizer
from gapcam.result import Result, normalized_maps

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
CAT_FACE = (40, 0, 410, 300)  # generous hand box of the cat in examples/cat.png
CUP = (170, 15, 410, 300)  # the cup (without the saucer) in examples/coffee.jpg


@pytest.fixture(scope="module")
def cat_result(localizer: Localizer, cat_path: Path) -> Result:
    return localizer(cat_path, top_k=3, predictions=5)


@pytest.fixture(scope="module")
def cat_path() -> Path:  # module scope for cat_result
    return Path(__file__).resolve().parents[1] / "examples" / "cat.png"


def _iou(box: gapcam.Box, reference: tuple[int, int, int, int]) -> float:
    return float(box_iou([box.as_list()], [reference])[0, 0])


def _covered(box: gapcam.Box, reference: tuple[int, int, int, int]) -> float:
    """Fraction of ``reference`` inside ``box``."""
    x0, y0, x1, y1 = reference
    inter = max(0, min(box.x1, x1) - max(box.x0, x0)) * max(0, min(box.y1, y1) - max(box.y0, y0))
    return inter / ((x1 - x0) * (y1 - y0))


# -- the default model on the example photos -------------------------------------------------------


def test_cat_photo(cat_result: Result) -> None:
    assert cat_result.top.index in CAT_CLASSES
    assert cat_result.maps[0].prediction == cat_result.top
    box = cat_result.maps[0].boxes[0]
    assert _iou(box, CAT_FACE) >= 0.5, box
    assert cat_result.size == (451, 300)


def test_coffee_photo(localizer: Localizer, coffee_path: Path) -> None:
    result = localizer(coffee_path)
    assert result.top.name in ("espresso", "cup")
    box = result.maps[0].boxes[0]
    assert _covered(box, CUP) >= 0.9, box
    assert box.width * box.height <= 0.8 * 600 * 400  # not simply the whole photo


# -- inputs ---------------------------------------------------------------------------------------


def test_every_input_kind_gives_the_same_result(localizer: Localizer, cat_path: Path) -> None:
    image = Image.open(cat_path).convert("RGB")
    array = np.asarray(image)
    tensor = torch.from_numpy(array).permute(2, 0, 1).float() / 255
    sources = [cat_path, str(cat_path), image, array, tensor, cat_path.read_bytes()]
    reference = localizer(cat_path, classes=[281])
    for source in sources:
        result = localizer(source, classes=[281])
        assert isinstance(result, Result)
        assert result.size == (451, 300)
        np.testing.assert_allclose(result.maps[0].low_res, reference.maps[0].low_res, atol=1e-5)
        assert result.maps[0].boxes == reference.maps[0].boxes
    assert localizer(array).name == "<ndarray>"
    assert localizer(cat_path).path == cat_path


def test_a_batch_equals_single_images(localizer: Localizer, cat_path: Path, coffee_path: Path):
    small = square_image((90, 60), (10, 10, 40, 40), colour=(250, 200, 20))
    sources = [cat_path, coffee_path, small]
    batch = localizer(sources, top_k=2)
    assert isinstance(batch, list)
    assert len(batch) == 3
    for source, batched in zip(sources, batch, strict=True):
        single = localizer(source, top_k=2)
        assert [p.index for p in batched.predictions] == [p.index for p in single.predictions]
        for a, b in zip(batched.predictions, single.predictions, strict=True):
            assert a.logit == pytest.approx(b.logit, abs=1e-5, rel=1e-5)
            assert a.probability == pytest.approx(b.probability, abs=1e-5)
        for a, b in zip(batched.maps, single.maps, strict=True):
            np.testing.assert_allclose(a.low_res, b.low_res, atol=1e-5, rtol=1e-5)
        assert batched.size == single.size
    assert isinstance(localizer((cat_path,)), list)  # a tuple is a batch too
    assert localizer([]) == []


def test_maps_of_a_batch_are_those_of_each_image(localizer: Localizer, cat_path: Path) -> None:
    """Images of one size share one upsampling and normalisation in a batch
    (``Localizer._placed_maps``); each image's maps and boxes are exactly its own."""
    wide = square_image((120, 80), (10, 10, 50, 40), colour=(250, 200, 20))
    tall = square_image((80, 120), (20, 30, 60, 90), colour=(20, 200, 250))
    sources = [wide, cat_path, tall, wide.transpose(0), tall]  # sizes repeat, out of order
    for variant in (localizer, dataclasses.replace(localizer, resize="letterbox")):
        for result in variant(sources, top_k=2):
            width, height = result.size
            low = torch.from_numpy(np.stack([m.low_res for m in result.maps]))[None]
            alone = normalized_maps(low, (height, width), result.region, result.settings)
            for j, class_map in enumerate(result.maps):
                assert np.array_equal(result.normalized[j], alone[j])
                assert class_map.boxes == boxes_from_map(
                    alone[j], variant.threshold, variant.min_area
                )


# -- classes, top_k ----------------------------------------------------------------------------


def test_classes_by_index_and_synonym(localizer: Localizer, cat_path: Path) -> None:
    result = localizer(cat_path, classes=[281, "tabby cat", "Egyptian cat", "282"])
    assert [m.prediction.index for m in result.maps] == [281, 281, 285, 282]
    assert [m.prediction.name for m in result.maps] == [
        "tabby",
        "tabby",
        "Egyptian cat",
        "tiger cat",
    ]
    np.testing.assert_array_equal(result.maps[0].low_res, result.maps[1].low_res)
    by_score = {p.index: p for p in localizer(cat_path, predictions=1000).predictions}
    for class_map in result.maps:
        assert class_map.prediction == by_score[class_map.prediction.index]


@pytest.mark.parametrize(
    ("classes", "message"),
    [(["no such animal"], "not a class"), ([1000], "out of range"), ([], "at least one")],
)
def test_unknown_class(localizer: Localizer, cat_path: Path, classes: list, message: str) -> None:
    with pytest.raises(ClassSelectionError, match=message):
        localizer(cat_path, classes=classes)


def test_top_k_maps_and_predictions_lists(
    cat_result: Result, localizer: Localizer, cat_path: Path
) -> None:
    predictions = cat_result.predictions
    assert len(predictions) == 5
    assert all(a.probability >= b.probability for a, b in itertools.pairwise(predictions))
    assert [m.prediction for m in cat_result.maps] == list(predictions[:3])
    everything = localizer(cat_path, predictions=1000, top_k=1)
    assert sum(p.probability for p in everything.predictions) == pytest.approx(1.0, abs=1e-4)
    assert len(localizer(cat_path, predictions=0, top_k=0).maps) == 1


# -- the result: identities and renderings ---------------------------------------------------------


def test_low_res_mean_plus_bias_is_the_logit(cat_result: Result, embedded_model) -> None:
    bias = embedded_model.bias.detach().numpy()
    for class_map in cat_result.maps:
        p = class_map.prediction
        assert float(class_map.low_res.mean(dtype=np.float64)) + bias[p.index] == pytest.approx(
            p.logit, abs=1e-4
        )
        assert class_map.raw_min == float(class_map.low_res.min())
        assert class_map.raw_max == float(class_map.low_res.max())


def test_raw_and_normalized_maps(cat_result: Result, embedded_model) -> None:
    bias = embedded_model.bias.detach().numpy()
    for i, class_map in enumerate(cat_result.maps):
        raw = cat_result.raw_cam(i)
        assert raw.shape == (300, 451)
        # bilinear upsampling only interpolates: the range stays inside the low-res range ...
        assert class_map.raw_min - 1e-5 <= raw.min()
        assert raw.max() <= class_map.raw_max + 1e-5
        # ... and (up to border effects) keeps the mean, so the mean still gives the logit
        spread = class_map.raw_max - class_map.raw_min
        logit = class_map.prediction.logit
        assert abs(raw.mean() + bias[class_map.prediction.index] - logit) < 0.05 * spread
        expected = cam.normalize(torch.from_numpy(raw)[None, None], "minmax")[0, 0].numpy()
        np.testing.assert_allclose(cat_result.cam(i), expected, atol=1e-5)
        assert cat_result.cam(i).min() == 0.0
        assert cat_result.cam(i).max() == pytest.approx(1.0)


def test_boxes_come_from_the_normalized_map(cat_result: Result) -> None:
    settings = cat_result.settings
    assert (settings.threshold, settings.min_area, settings.normalize) == (0.2, 0.01, "minmax")
    for i, class_map in enumerate(cat_result.maps):
        expected = gapcam.boxes_from_map(cat_result.cam(i), settings.threshold, settings.min_area)
        assert class_map.boxes == expected
        assert all(0 <= b.x0 < b.x1 <= 451 and 0 <= b.y0 < b.y1 <= 300 for b in class_map.boxes)


def test_to_dict_is_json(cat_result: Result) -> None:
    data = json.loads(json.dumps(cat_result.to_dict()))
    assert (data["width"], data["height"]) == (451, 300)
    assert data["input"].endswith("cat.png")
    assert [p["index"] for p in data["predictions"]] == [p.index for p in cat_result.predictions]
    first = data["maps"][0]
    assert first["boxes"][0]["xyxy"] == cat_result.maps[0].boxes[0].as_list()
    assert first["logit"] == cat_result.maps[0].prediction.logit
    assert first["feature_size"] == [7, 7]


def test_overlay_and_figure_sizes(cat_result: Result) -> None:
    panel = cat_result.overlay()
    assert panel.mode == "RGB"
    assert panel.width == 451
    assert panel.height > 300
    assert cat_result.overlay(2, boxes=False).size == panel.size
    figure = cat_result.figure()
    assert figure.width == 3 * panel.width + 2 * 4
    assert figure.height == panel.height
    single = Result(**{**cat_result.__dict__, "maps": cat_result.maps[:1]})
    assert single.figure().size == panel.size
    with_boxes = np.asarray(cat_result.overlay(0))
    without = np.asarray(cat_result.overlay(0, boxes=False))
    assert (with_boxes != without).any()


def test_letterbox_mode(localizer: Localizer, embedded_model, cat_path: Path) -> None:
    letterbox = Localizer(embedded_model, resize="letterbox")
    result = letterbox(cat_path)
    assert result.region[0] == 0.0
    assert result.region[2] == 1.0
    assert 0.0 < result.region[1] < result.region[3] < 1.0  # a wide photo is padded above/below
    class_map = result.maps[0]
    bias = float(embedded_model.bias[class_map.prediction.index].detach())
    assert float(class_map.low_res.mean(dtype=np.float64)) + bias == pytest.approx(
        class_map.prediction.logit, abs=1e-4
    )
    assert result.top.index in CAT_CLASSES
    assert result.cam(0).shape == (300, 451)
    assert _iou(class_map.boxes[0], CAT_FACE) >= 0.5


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"threshold": 1.5}, "threshold=1.5"),
        ({"min_area": -0.1}, "min_area=-0.1"),
        ({"normalize": "softmax"}, "normalize='softmax'"),
        ({"normalize": "none"}, "the box threshold is a fraction of the normalised map"),
        ({"resize": "crop"}, "resize='crop'"),
    ],
)
def test_localizer_validates_settings(embedded_model, option: dict, message: str) -> None:
    with pytest.raises(GapcamError, match=message):
        Localizer(embedded_model, **option)


def test_custom_model_settings(rednet: gapcam.GapModel) -> None:
    image = square_image((64, 48), (8, 8, 24, 24))
    image.paste((255, 0, 0), (40, 30, 48, 38))  # a second, smaller red patch
    loose = Localizer(rednet, min_area=0.0)(image, classes=["red"])
    strict = Localizer(rednet, min_area=0.1)(image, classes=["red"])
    assert len(loose.maps[0].boxes) == 2
    assert len(strict.maps[0].boxes) == 1
    assert loose.maps[0].boxes[0] == strict.maps[0].boxes[0]
    assert loose.settings.model == "RedNet"
    flat = Localizer(rednet)(np.zeros((20, 20, 3), dtype=np.uint8), classes=[0])
    assert flat.maps[0].boxes == ()  # a flat map has no box
    assert (flat.cam(0) == 0).all()


def test_localize_cli_takes_the_view_presets(cat_path: Path, tmp_path: Path, capsys) -> None:
    """`gapcam localize --preset best`, Lite0's own: 288 px, dilated (18 x 18 grid), mirrored,
    recorded in the JSON settings."""
    from gapcam.cli import main

    code = main(
        ["localize", str(cat_path), "--preset", "best", "--out", str(tmp_path), "--json", "-"]
    )
    document = json.loads(capsys.readouterr().out)
    assert code == 0
    settings = document["settings"]
    assert (settings["input_size"], settings["hflip"], settings["output_stride"]) == (
        [288, 288],
        True,
        16,
    )
    assert document["results"][0]["maps"][0]["feature_size"] == [18, 18]
    assert 281 <= document["results"][0]["predictions"][0]["index"] <= 285


def test_checkpoint_excludes_model_and_weights(cat_path: Path, tmp_path: Path, capsys) -> None:
    from gapcam.cli import main

    code = main(["localize", str(cat_path), "--checkpoint", str(tmp_path), "--model", "resnet50"])
    assert code == 2
    assert "the run folder names its backbone" in capsys.readouterr().err


def test_large_images_recompute_their_maps_with_the_same_values(
    localizer: Localizer, cat_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    big = Image.open(cat_path).convert("RGB").resize((1600, 1400))
    lazy = localizer(big, top_k=2)
    assert lazy.kept_maps is None  # over KEEP_MAPS_PIXELS: nothing full-size held
    monkeypatch.setattr("gapcam.localizer.KEEP_MAPS_PIXELS", 1 << 30)
    kept = localizer(big, top_k=2)
    assert kept.kept_maps is not None
    for a, b in zip(lazy.normalized, kept.normalized, strict=True):
        assert a.shape == (1400, 1600)
        assert np.array_equal(a, b)
    assert [m.boxes for m in lazy.maps] == [m.boxes for m in kept.maps]
    assert lazy.kept_maps is not None  # computed once, then kept

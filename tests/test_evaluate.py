"""``gapcam evaluate``: per-image classes and view options of the Localizer, the pipeline on
synthetic data with known answers, the command line, and the ILSVRC dev set as a CI gate
(the folder named by $GAPCAM_ILSVRC_DEV: the ``ilsvrc_dev`` fixture of conftest.py)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import square_image
from PIL import Image

from gapcam import cam
from gapcam.errors import ClassSelectionError, DatasetError, GapcamError
from gapcam.eval.datasets import Dataset, load_dataset
from gapcam.eval.evaluate import check_class_table, evaluate, label_resolver
from gapcam.eval.report import format_table
from gapcam.localizer import Localizer
from gapcam.models import GapModel
from gapcam.plots import box_accuracy_curve

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

#: The reference figures of the issue on the dev set (default model and settings), in %.
REFERENCE = {
    "top1_cls": 80.3,
    "gt_known_loc": 70.7,
    "top1_loc": 59.0,
    "max_box_acc": 72.3,
    "max_box_acc_v2": 68.4,
}
REFERENCE_V2_PER_IOU = {"0.3": 89.3, "0.5": 72.3, "0.7": 43.7}
TOLERANCE = 0.5  # points


def red_photo(square: tuple[int, int, int, int], size: tuple[int, int] = (128, 128)) -> Image.Image:
    return square_image(size, square)


# -- the Localizer: per-image classes ----------------------------------------------------------------


def test_classes_per_image_maps_each_image_its_own_classes(tiny: GapModel) -> None:
    localizer = Localizer(tiny)
    photos = [np.full((32, 32, 3), v, dtype=np.uint8) for v in (30, 120, 220)]
    photos[1][4:20, 8:30] = (250, 10, 10)
    wanted = [[3], [0], [4]]
    per_image = localizer.explain([_loaded(p) for p in photos], classes_per_image=wanted)
    for photo, classes, result in zip(photos, wanted, per_image, strict=True):
        alone = localizer(photo, classes=classes)
        assert result.maps[0].prediction.index == classes[0]
        np.testing.assert_allclose(result.normalized[0], alone.normalized[0], atol=1e-6)
        assert [p.index for p in result.predictions] == [p.index for p in alone.predictions]


def _loaded(array: np.ndarray):
    from gapcam.images import load_image

    return load_image(array)


def test_classes_per_image_errors(tiny: GapModel) -> None:
    localizer = Localizer(tiny)
    loaded = [_loaded(np.zeros((8, 8, 3), dtype=np.uint8))] * 2
    with pytest.raises(ClassSelectionError, match="not both"):
        localizer.explain(loaded, classes=[0], classes_per_image=[[0], [1]])
    with pytest.raises(ClassSelectionError, match="one list of classes per image"):
        localizer.explain(loaded, classes_per_image=[[0]])
    with pytest.raises(ClassSelectionError, match="one list of classes per image"):
        localizer.explain(loaded, classes_per_image=[0, 1])  # type: ignore[list-item]
    with pytest.raises(ClassSelectionError, match="same number of classes"):
        localizer.explain(loaded, classes_per_image=[[0], [1, 2]])
    with pytest.raises(ClassSelectionError, match="out of range"):
        localizer.explain(loaded, classes_per_image=[[0], [99]])


# -- the Localizer: view options --------------------------------------------------------------------


def test_default_views_and_settings_are_unchanged(rednet: GapModel) -> None:
    localizer = Localizer(rednet)
    assert localizer.views() == [(localizer.preprocess, False)]
    assert localizer.settings().extras == {}
    assert localizer.settings().input_size == (128, 128)


def test_hflip_maps_the_mirrored_view_back(rednet: GapModel) -> None:
    """RedNet is exactly mirror-equivariant on a 128 px input, so averaging with the mirrored
    view (mirrored back) must give the plain map; forgetting to mirror back would not."""
    photo = red_photo((8, 40, 40, 72))  # left of centre: a mirrored map would differ
    plain = Localizer(rednet)(photo, classes=["red"])
    flipped = Localizer(rednet, hflip=True)(photo, classes=["red"])
    np.testing.assert_allclose(flipped.normalized[0], plain.normalized[0], atol=1e-5)
    assert flipped.maps[0].boxes[0] == plain.maps[0].boxes[0]
    assert flipped.settings.extras == {"hflip": True, "scales": [1.0]}
    assert len(Localizer(rednet, hflip=True).views()) == 2


def test_input_size_and_scales(rednet: GapModel) -> None:
    photo = red_photo((32, 32, 96, 96))
    bigger = Localizer(rednet, input_size=256)(photo, classes=["red"])
    assert bigger.maps[0].low_res.shape == (64, 64)
    assert bigger.settings.input_size == (256, 256)
    multi = Localizer(rednet, scales=(1.0, 0.5))(photo, classes=["red"])
    assert multi.maps[0].low_res.shape == (32, 32)  # merged on the finest grid
    box = multi.maps[0].boxes[0]
    assert abs(box.x0 - 32) <= 4
    assert abs(box.x1 - 96) <= 4
    sizes = [p.size for p, _ in Localizer(rednet, input_size=(64, 96), scales=(1.0, 1.5)).views()]
    assert sizes == [(64, 96), (96, 160)]  # 1.5 x 96 = 144, rounded to a multiple of 32
    with pytest.raises(GapcamError, match=r"input_size=300: must be a multiple of 32.*e\.g\. 288"):
        Localizer(rednet, input_size=300)  # refused, never rounded in silence


@pytest.mark.parametrize(
    "option",
    [
        {"input_size": 0},
        {"input_size": (64,)},
        {"scales": ()},
        {"scales": (0.0,)},
        {"scales": (9,)},
    ],
)
def test_view_options_are_validated(rednet: GapModel, option: dict) -> None:
    with pytest.raises(GapcamError, match=next(iter(option))):
        Localizer(rednet, **option)


def test_presets(rednet: GapModel) -> None:
    fine = Localizer.from_preset("fine", rednet)
    assert fine.input_size == 288
    assert Localizer.from_preset("best", rednet).scales == (1.0, 1.5)
    assert Localizer.from_preset("fine", rednet, input_size=320, hflip=True).input_size == 320
    assert Localizer.from_preset("cam", rednet).views() == Localizer(rednet).views()
    with pytest.raises(GapcamError, match="preset='nope'"):
        Localizer.from_preset("nope", rednet)


def test_merge_views_mirrors_back_and_resamples() -> None:
    a = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    assert torch.equal(cam.merge_views([a, a.flip(-1)], [False, True])[0], a)
    coarse = torch.full((1, 1, 1, 1), 5.0)
    assert torch.allclose(cam.merge_views([a, coarse], [False, False])[0], (a + 5) / 2)
    with pytest.raises(ValueError, match="one per view"):
        cam.merge_views([a], [])


# -- labels ------------------------------------------------------------------------------------------


def test_label_resolver(embedded_model: GapModel, rednet: GapModel) -> None:
    resolve = label_resolver(embedded_model)
    assert resolve("n01440764") == 0
    assert resolve("tench") == 0
    assert resolve("281") == 281
    with pytest.raises(ClassSelectionError, match="WordNet"):
        resolve("n99999999")
    with pytest.raises(ClassSelectionError):
        resolve("no such class")
    assert label_resolver(rednet)("red") == 0
    with pytest.raises(ClassSelectionError):
        label_resolver(rednet)("n01440764")


def test_class_table_must_match_the_model(embedded_model: GapModel) -> None:
    good = Dataset(Path("d"), "wsol", (), (), ((0, "n01440764", "d/class_names.txt:1"),))
    check_class_table(good, embedded_model)
    bad = Dataset(Path("d"), "wsol", (), (), ((0, "n01443537", "d/class_names.txt:1"),))
    with pytest.raises(DatasetError, match=r"class_names\.txt:1: class 0 is n01443537"):
        check_class_table(bad, embedded_model)


# -- the pipeline on synthetic data with known answers ----------------------------------------------


def red_dataset(root: Path) -> Path:
    """Three 128 px images with red rectangles: one mostly red (RedNet says "red"), two small
    (it says "not red"); the CSV boxes are the rectangles in inclusive pixels."""
    squares = {
        "big.png": (0, 0, 128, 100),
        "left.png": (8, 40, 48, 88),
        "right.png": (64, 16, 120, 64),
    }
    lines = ["path,label,x0,y0,x1,y1"]
    for name, (x0, y0, x1, y1) in squares.items():
        red_photo((x0, y0, x1, y1)).save(root / name)
        lines.append(f"{name},red,{x0},{y0},{x1 - 1},{y1 - 1}")
    (root / "boxes.csv").write_text("\n".join(lines) + "\n")
    return root / "boxes.csv"


def test_evaluate_known_answers(tmp_path: Path, rednet: GapModel) -> None:
    localizer = Localizer(rednet)
    dataset = load_dataset(red_dataset(tmp_path), label_resolver(rednet))
    report = evaluate(dataset, localizer, batch_size=2)
    m = report["metrics"]
    assert m["top1_cls"] == pytest.approx(100 / 3)  # only the mostly red image
    assert m["top5_cls"] == 100.0  # two classes
    assert m["gt_known_loc"] == 100.0
    assert m["top1_loc"] == pytest.approx(100 / 3)
    assert m["top5_loc"] == 100.0
    assert m["max_box_acc"] == 100.0
    assert m["max_box_acc_v2"] == 100.0
    assert m["pxap"] is None
    # the fixed-threshold boxes (boxes.py) and the sweep agree at that threshold
    largest = report["curves"]["largest_component"][1]
    assert largest[20] == pytest.approx(m["gt_known_loc"], abs=1e-3)
    assert {r["image"] for r in report["images"]} == {"big.png", "left.png", "right.png"}
    left = next(r for r in report["images"] if r["image"] == "left.png")
    assert left["iou"] > 0.8
    assert abs(left["box"][0] - 8) <= 3
    assert json.loads(json.dumps(report)) == report  # JSON-ready
    assert "MaxBoxAccV2" in format_table(report)
    assert box_accuracy_curve(report).startswith(b"\x89PNG")


def test_pxap_with_masks(tmp_path: Path, rednet: GapModel) -> None:
    squares = {"a.png": (8, 40, 48, 88), "b.png": (64, 16, 120, 64)}
    for name, square in squares.items():
        red_photo(square).save(tmp_path / name)
        mask = np.zeros((128, 128), dtype=np.uint8)
        x0, y0, x1, y1 = square
        mask[y0:y1, x0:x1] = 255
        Image.fromarray(mask).resize((64, 64), Image.Resampling.NEAREST).save(tmp_path / f"m{name}")
    (tmp_path / "image_ids.txt").write_text("a.png\nb.png\n")
    (tmp_path / "class_labels.txt").write_text("a.png,0\nb.png,0\n")
    (tmp_path / "localization.txt").write_text("a.png,ma.png,\nb.png,mb.png,\n")
    dataset = load_dataset(tmp_path, label_resolver(rednet))
    report = evaluate(dataset, Localizer(rednet))
    assert report["metrics"]["pxap"] > 90.0
    assert report["metrics"]["gt_known_loc"] is None  # no boxes
    assert report["curves"] is None
    assert "PxAP" in format_table(report)


# -- the command line ---------------------------------------------------------------------------------


def examples_csv(root: Path, extra: str = "") -> Path:
    """The two example photos with generous hand boxes (inclusive pixels)."""
    lines = [
        "path,label,x0,y0,x1,y1",
        f"{EXAMPLES / 'cat.png'},tabby,40,0,409,299",
        f"{EXAMPLES / 'coffee.jpg'},968,170,15,409,299",
    ]
    path = root / "boxes.csv"
    path.write_text("\n".join([*lines, *([extra] if extra else [])]) + "\n")
    return path


def gapcam(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gapcam", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.slow
def documented_keys(part: str) -> set[str]:
    """The keys docs/evaluate.md's "Outputs" lists for ``part`` of the --json report."""
    block = (ROOT / "docs" / "evaluate.md").read_text().split("## Outputs", 1)[1].split("```")[1]
    listed = re.search(rf'"{part}": {{(.*?)}}', block, re.S)
    assert listed is not None, part
    return set(re.findall(r'"(\w+)"', listed[1]))


def test_cli_evaluate_table_json_plot_and_skipped(tmp_path: Path) -> None:
    data = examples_csv(tmp_path, extra=f"{EXAMPLES / 'cat.png'},tabby,500,0,510,10")
    done = gapcam(
        "evaluate", str(data), "--skip-invalid", "--json", str(tmp_path / "r.json"),
        "--plot", str(tmp_path / "r.png"), "-q", "--images", str(EXAMPLES),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "MaxBoxAcc" in done.stdout
    assert "GT-known" in done.stdout
    assert f"{data}:4: " in done.stdout  # the left-out problem is listed
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["schema"] == "gapcam.evaluate/1"
    assert report["dataset"]["images"] == 1  # the cat image had the bad box: left out
    assert report["dataset"]["skipped"][0].startswith(f"{data}:4: ")
    assert report["metrics"]["top5_cls"] == 100.0  # a cup (top-1 may say espresso)
    for part in ("dataset", "settings", "timing"):  # as docs/evaluate.md lists them
        assert set(report[part]) == documented_keys(part), part
    assert (tmp_path / "r.png").read_bytes().startswith(b"\x89PNG")
    again = gapcam(
        "evaluate", str(data), "--skip-invalid", "--json", str(tmp_path / "r.json"),
        "--images", str(EXAMPLES),
    )  # fmt: skip
    assert again.returncode == 2
    assert "already exists" in again.stderr


@pytest.mark.slow
def test_cli_evaluate_refuses_bad_annotations(tmp_path: Path) -> None:
    data = examples_csv(tmp_path, extra=f"{EXAMPLES / 'coffee.jpg'},no such class,1,1,2,2")
    done = gapcam("evaluate", str(data), "-q", "--images", str(EXAMPLES))
    assert done.returncode == 2
    assert f"{data}:4: " in done.stderr
    assert "unknown label" in done.stderr
    assert "--skip-invalid" in done.stderr
    assert "Traceback" not in done.stderr


# -- the CI gate: the reference figures on the ILSVRC dev set -----------------------------------------


@pytest.mark.slow
def test_ilsvrc_dev_set_matches_the_reference_figures(
    ilsvrc_dev: Path, localizer: Localizer
) -> None:
    dataset = load_dataset(ilsvrc_dev, label_resolver(localizer.gap_model))
    assert len(dataset.samples) == 300
    report = evaluate(dataset, localizer, batch_size=32)
    m = report["metrics"]
    for key, expected in REFERENCE.items():
        assert m[key] == pytest.approx(expected, abs=TOLERANCE), key
    for iou, expected in REFERENCE_V2_PER_IOU.items():
        assert m["max_box_acc_v2_per_iou"][iou]["accuracy"] == pytest.approx(
            expected, abs=TOLERANCE
        )
    assert m["max_box_acc_threshold"] == pytest.approx(0.26, abs=0.02)
    assert report["curves"]["largest_component"][1][20] == pytest.approx(
        m["gt_known_loc"], abs=1e-3
    )

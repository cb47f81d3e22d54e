"""WSOL metrics on hand-built maps and boxes whose values are known (gapcam.eval.metrics)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gapcam.boxes import boxes_from_map, boxes_from_mask
from gapcam.eval import metrics
from gapcam.eval.metrics import (
    THRESHOLDS,
    BoxAccuracy,
    PixelPrecision,
    component_boxes,
    edges_to_inclusive,
    inclusive_iou,
    sweep_ious,
)


def two_blobs() -> np.ndarray:
    """20 x 30 map: blob A (rows 2..5, cols 2..9) at 0.5, blob B (rows 10..17, cols 15..27)
    at 1.0, the rest 0. A is 32 pixels, B 104."""
    m = np.zeros((20, 30), dtype=np.float32)
    m[2:6, 2:10] = 0.5
    m[10:18, 15:28] = 1.0
    return m


A_BOX = (2, 2, 9, 5)  # inclusive (x0, y0, x1, y1)
B_BOX = (15, 10, 27, 17)


# -- IoU and the box convention ---------------------------------------------------------------------


def test_inclusive_iou_counts_pixels() -> None:
    assert inclusive_iou([3, 3, 3, 3], [3, 3, 3, 3])[0, 0] == 1.0  # one pixel
    # 10x10 and a 10x10 shifted by 5 columns: 50 shared pixels of 150
    assert inclusive_iou([0, 0, 9, 9], [5, 0, 14, 9])[0, 0] == pytest.approx(1 / 3)
    assert inclusive_iou([0, 0, 4, 4], [5, 5, 9, 9])[0, 0] == 0.0  # touching corners only
    # the +1: boxes (0,0,1,1) and (1,1,2,2) share the pixel (1,1): 1 / (4 + 4 - 1)
    assert inclusive_iou([0, 0, 1, 1], [1, 1, 2, 2])[0, 0] == pytest.approx(1 / 7)


def test_inclusive_iou_shapes_and_floats() -> None:
    a = [[0, 0, 9, 9], [20, 20, 29, 29]]
    b = [[0, 0, 9, 9], [0, 0, 4.5, 9], [100, 100, 110, 110]]
    iou = inclusive_iou(a, b)
    assert iou.shape == (2, 3)
    assert iou[0, 0] == 1.0
    assert iou[0, 1] == pytest.approx(55 / 100)  # 5.5 x 10 inside 10 x 10
    assert iou[1].tolist() == [0.0, 0.0, 0.0]
    assert inclusive_iou(np.zeros((0, 4)), b).shape == (0, 3)


def test_pixel_edge_boxes_convert_to_inclusive() -> None:
    mask = np.zeros((12, 12), dtype=bool)
    mask[5:10, 3:8] = True  # columns 3..7, rows 5..9
    (box,) = boxes_from_mask(mask)
    assert box.as_list() == [3, 5, 8, 10]  # gapcam: pixel edges, x1/y1 exclusive
    assert edges_to_inclusive(box.as_list()).tolist() == [[3, 5, 7, 9]]
    (single,) = boxes_from_mask(np.pad(np.ones((1, 1), bool), ((4, 0), (6, 0))))
    assert edges_to_inclusive(single.as_list()).tolist() == [[6, 4, 6, 4]]  # one pixel
    # the same component seen by the sweep
    sweep = component_boxes(mask.astype(np.float32))
    assert sweep.boxes[sweep.largest[50]].tolist() == [3, 5, 7, 9]


# -- the sweep --------------------------------------------------------------------------------------


def test_component_boxes_of_two_blobs() -> None:
    sweep = component_boxes(two_blobs())
    t = {round(float(v), 2): i for i, v in enumerate(THRESHOLDS)}
    at = {k: sweep.boxes[sweep.level == t[k]].tolist() for k in (0.0, 0.3, 0.5, 0.51, 0.99)}
    assert at[0.0] == [[0, 0, 29, 19]]  # everything
    assert sorted(at[0.3]) == sorted([list(A_BOX), list(B_BOX)])
    assert sorted(at[0.5]) == sorted([list(A_BOX), list(B_BOX)])  # pixels >= threshold
    assert at[0.51] == [list(B_BOX)]
    assert at[0.99] == [list(B_BOX)]
    assert sweep.boxes[sweep.largest[t[0.3]]].tolist() == list(B_BOX)  # 104 > 32 pixels
    assert sweep.areas[sweep.largest[t[0.3]]] == 104
    assert (sweep.largest >= 0).all()


def test_largest_component_only_vs_every_component() -> None:
    """GT on the small blob: MaxBoxAcc's largest box misses it, MaxBoxAccV2's any-box hits."""
    largest, best = sweep_ious(component_boxes(two_blobs()), [A_BOX, (0, 0, 0, 0)])
    assert largest[1:51].max() == 0.0  # the largest component is B wherever A exists
    assert best[1:51].tolist() == [1.0] * 50  # A is one of the components at 0.01..0.50
    assert best[51:].max() == 0.0
    accuracy = BoxAccuracy()
    accuracy.add(largest, best)
    summary = accuracy.summary()
    assert summary["max_box_acc"] == 0.0
    assert summary["max_box_acc_v2_per_iou"]["0.3"] == {"accuracy": 100.0, "threshold": 0.01}
    assert summary["max_box_acc_v2"] == 100.0


def test_multiple_gt_boxes_any_one_counts() -> None:
    largest, _ = sweep_ious(component_boxes(two_blobs()), [A_BOX, B_BOX])
    assert largest[1:].tolist() == [1.0] * 99  # B at every threshold above 0


def test_empty_and_flat_maps() -> None:
    flat = np.zeros((8, 8), dtype=np.float32)  # what min-max normalisation makes of a flat map
    sweep = component_boxes(flat)
    assert sweep.boxes.tolist() == [[0, 0, 7, 7]]  # only threshold 0: the whole image
    assert sweep.largest[0] == 0
    assert (sweep.largest[1:] == -1).all()
    largest, best = sweep_ious(sweep, [(0, 0, 7, 7)])
    assert largest[0] == best[0] == 1.0
    assert largest[1:].max() == best[1:].max() == 0.0  # no box: never correct
    nothing = component_boxes(flat, thresholds=np.array([0.5, 0.6]))
    assert nothing.boxes.shape == (0, 4)
    assert sweep_ious(nothing, [(0, 0, 1, 1)])[0].tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="ground-truth box"):
        sweep_ious(sweep, np.zeros((0, 4)))


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="H x W"):
        component_boxes(np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="increasing"):
        component_boxes(np.zeros((2, 2)), np.array([0.5, 0.2]))


@pytest.mark.parametrize("seed", range(6))
def test_the_fast_sweep_equals_labelling_every_threshold(seed: int) -> None:
    """Smooth CAM-like maps (random 7x7 upsampled): identical boxes to boxes.boxes_from_map."""
    generator = torch.Generator().manual_seed(seed)
    low = torch.randn(1, 1, 7, 7, generator=generator)
    up = F.interpolate(low, size=(61, 47), mode="bilinear", align_corners=False)[0, 0]
    normalized = ((up - up.min()) / (up.max() - up.min())).numpy()
    sweep = component_boxes(normalized)
    for t, threshold in enumerate(THRESHOLDS):
        expected = boxes_from_map(normalized, float(np.float32(threshold)))
        found = sweep.boxes[sweep.level == t]
        assert sorted(found.tolist()) == sorted(
            edges_to_inclusive([b.as_list() for b in expected]).tolist()
        )
        assert (
            sweep.boxes[sweep.largest[t]].tolist()
            == edges_to_inclusive(expected[0].as_list())[0].tolist()
        )


# -- accumulating: MaxBoxAcc, MaxBoxAccV2 ------------------------------------------------------------


def _iou_rows(ranges: list[tuple[float, int, int]]) -> np.ndarray:
    """An IoU-per-threshold array: ``value`` on thresholds [start, stop), 0 elsewhere."""
    row = np.zeros(len(THRESHOLDS))
    for value, start, stop in ranges:
        row[start:stop] = value
    return row


def test_best_threshold_is_the_lowest_of_the_best() -> None:
    accuracy = BoxAccuracy()
    first = _iou_rows([(0.9, 10, 51)])  # right at thresholds 0.10..0.50
    second = _iou_rows([(0.6, 30, 91)])  # right at 0.30..0.90
    accuracy.add(first, first)
    accuracy.add(second, second)
    summary = accuracy.summary()
    assert summary["max_box_acc"] == 100.0
    assert summary["max_box_acc_threshold"] == 0.3
    curves = accuracy.curves()
    assert curves["largest"][1, 20] == 50.0  # IoU 0.5 row, threshold 0.20: only the first
    # IoU 0.7: only the first image ever (0.6 < 0.7): 50% at best, first reached at 0.10
    assert summary["max_box_acc_v2_per_iou"]["0.7"] == {"accuracy": 50.0, "threshold": 0.1}
    assert summary["max_box_acc_v2"] == pytest.approx((100 + 100 + 50) / 3)


def test_v2_is_the_mean_over_iou_thresholds_of_each_best() -> None:
    accuracy = BoxAccuracy()
    for iou in (0.35, 0.55, 0.75, 0.2):
        row = np.full(len(THRESHOLDS), iou)
        accuracy.add(np.zeros(len(THRESHOLDS)), row)
    summary = accuracy.summary()
    per = {k: v["accuracy"] for k, v in summary["max_box_acc_v2_per_iou"].items()}
    assert per == {"0.3": 75.0, "0.5": 50.0, "0.7": 25.0}
    assert summary["max_box_acc_v2"] == 50.0
    assert summary["max_box_acc"] == 0.0


# -- PxAP ---------------------------------------------------------------------------------------------


def test_pxap_of_a_known_ranking() -> None:
    scores = np.array([[1.0, 0.8, 0.6, 0.2]], dtype=np.float32)
    truth = np.array([[True, False, True, False]])
    pixels = PixelPrecision()
    pixels.add(scores, truth, None)
    # points: >=1.0 (P 1, R 1/2), >=0.8 (P 1/2, R 1/2), >=0.6 (P 2/3, R 1): AP = 1/2 + 1/3
    assert pixels.pxap() == pytest.approx((0.5 + 1 / 3) * 100)


def test_pxap_perfect_ignored_and_empty() -> None:
    truth = np.zeros((10, 10), dtype=bool)
    truth[2:5, 2:5] = True
    pixels = PixelPrecision()
    pixels.add(truth.astype(np.float32), truth, None)
    assert pixels.pxap() == pytest.approx(100.0)
    # a confusing region that is ignored does not count against the map
    confusing = truth.astype(np.float32)
    confusing[8:, 8:] = 1.0
    ignore = np.zeros_like(truth)
    ignore[8:, 8:] = True
    ignored = PixelPrecision()
    ignored.add(confusing, truth, ignore)
    assert ignored.pxap() == pytest.approx(100.0)
    counted = PixelPrecision()
    counted.add(confusing, truth, None)
    assert counted.pxap() < 100.0
    assert PixelPrecision().pxap() is None
    with pytest.raises(ValueError, match="differ in size"):
        PixelPrecision().add(np.zeros((3, 3)), np.zeros((2, 2), bool), None)


def test_thresholds_are_the_documented_grid() -> None:
    assert len(metrics.THRESHOLDS) == 100
    assert metrics.THRESHOLDS[0] == 0.0
    assert metrics.THRESHOLDS[-1] == 0.99
    assert metrics.THRESHOLDS[26] == 0.26
    assert metrics.IOU_THRESHOLDS == (0.3, 0.5, 0.7)

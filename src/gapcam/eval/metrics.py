"""Weakly supervised localization metrics (Choe et al., CVPR 2020). Pure numpy/scipy.

Conventions (those of clovaai/wsolevaluation; docs/evaluate.md):

- maps are min-max normalised to [0, 1] at the image's size; a pixel is in the mask at
  threshold ``t`` when ``map >= t``; thresholds 0.00, 0.01, ..., 0.99 (``THRESHOLDS``);
- components are 8-connected; a component's box is in *inclusive* integer pixel coordinates
  ``(x0, y0, x1, y1)`` = first and last column and row it covers (gapcam's pixel-edge boxes,
  ``boxes.py``, have ``x1, y1`` one larger: ``edges_to_inclusive``);
- IoU counts pixels inclusively: area = (x1 - x0 + 1) * (y1 - y0 + 1) (``inclusive_iou``);
  ground-truth boxes are used as given, floats included;
- an image is correct at a threshold when a predicted box has IoU >= the IoU threshold with
  *any* of its ground-truth boxes. MaxBoxAcc: the box of the largest component, IoU 0.5, best
  threshold. MaxBoxAccV2: every component's box counts; the mean over IoU 0.3/0.5/0.7 of the
  accuracy at each one's best threshold. An empty mask has no box and is never correct.
- PxAP: area under the pixel precision-recall curve over the same thresholds (ignore regions
  excluded), as wsolevaluation's ``MaskEvaluator``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from gapcam.boxes import EIGHT_CONNECTED, box_iou

#: Thresholds of the sweep on the normalised map: 0.00, 0.01, ..., 0.99.
THRESHOLDS: np.ndarray = np.round(np.arange(100) * 0.01, 2)

#: IoU thresholds of MaxBoxAccV2 (MaxBoxAcc uses 0.5).
IOU_THRESHOLDS: tuple[float, ...] = (0.3, 0.5, 0.7)


def edges_to_inclusive(boxes: Any) -> np.ndarray:
    """Pixel-edge boxes (x1, y1 exclusive; gapcam's ``Box``) -> inclusive pixel boxes (M x 4)."""
    out = np.array(boxes, dtype=np.float64).reshape(-1, 4)
    out[:, 2:] -= 1
    return out


def inclusive_iou(a: Any, b: Any) -> np.ndarray:
    """IoU of every box in ``a`` (N x 4) with every box in ``b`` (M x 4): N x M.

    Inclusive pixel boxes: a box (x0, y0, x1, y1) covers (x1 - x0 + 1) * (y1 - y0 + 1) pixels,
    so (3, 3, 3, 3) is one pixel (``boxes.box_iou`` with ``inclusive=True``). Empty input gives
    an empty matrix; degenerate pairs give 0.
    """
    return box_iou(a, b, inclusive=True)


@dataclass(frozen=True)
class ComponentBoxes:
    """Every component of the mask at every threshold of a sweep, for one map.

    ``level[i]`` is the threshold index of component ``i``, ``boxes[i]`` its inclusive box and
    ``areas[i]`` its pixel count; ``largest[t]`` indexes the largest component at threshold
    ``t`` (the first in scan order on ties, as ``boxes.boxes_from_mask``), -1 for an empty mask.
    """

    level: np.ndarray
    boxes: np.ndarray
    areas: np.ndarray
    largest: np.ndarray


def component_boxes(normalized: np.ndarray, thresholds: np.ndarray = THRESHOLDS) -> ComponentBoxes:
    """The boxes of the 8-connected components of ``normalized >= t`` for every ``t``.

    Fast because the masks are nested: the row and column maxima give each mask's bounding
    box at once, components are labelled inside that box only, and a mask found to be one
    component needs no further work (its box is that bounding box). ``thresholds`` ascend.
    """
    if normalized.ndim != 2:
        raise ValueError(f"map has shape {normalized.shape}; expected H x W")
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if np.any(np.diff(thresholds) <= 0):
        raise ValueError("thresholds must be strictly increasing")
    row_max, col_max = normalized.max(axis=1), normalized.max(axis=0)
    level: list[int] = []
    boxes: list[tuple[int, int, int, int]] = []
    areas: list[int] = []
    largest = np.full(len(thresholds), -1, dtype=np.int64)
    for t, threshold in enumerate(thresholds.astype(normalized.dtype)):
        rows, cols = np.flatnonzero(row_max >= threshold), np.flatnonzero(col_max >= threshold)
        if rows.size == 0:
            break  # higher thresholds are empty too
        top, left = rows[0], cols[0]
        crop = normalized[top : rows[-1] + 1, left : cols[-1] + 1] >= threshold
        labels, count = ndimage.label(crop, structure=EIGHT_CONNECTED)
        largest[t] = len(boxes)
        if count == 1:
            level.append(t)
            boxes.append((left, top, cols[-1], rows[-1]))
            areas.append(int(np.count_nonzero(crop)))
            continue
        sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
        largest[t] += int(np.argmax(sizes))
        for (r, c), size in zip(ndimage.find_objects(labels), sizes, strict=True):
            level.append(t)
            boxes.append((left + c.start, top + r.start, left + c.stop - 1, top + r.stop - 1))
            areas.append(int(size))
    return ComponentBoxes(
        np.asarray(level, dtype=np.int64),
        np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
        np.asarray(areas, dtype=np.int64),
        largest,
    )


def sweep_ious(components: ComponentBoxes, gt_boxes: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per threshold: the best IoU (with any GT box) of the largest component's box, and of
    any component's box. Two arrays of len(thresholds); 0 where the mask is empty."""
    gt = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    if gt.shape[0] == 0:
        raise ValueError("an image needs at least one ground-truth box")
    count = len(components.largest)
    best = np.zeros(count)
    if components.boxes.shape[0] == 0:
        return best.copy(), best
    ious = inclusive_iou(components.boxes, gt).max(axis=1)
    np.maximum.at(best, components.level, ious)
    largest = np.where(components.largest >= 0, ious[components.largest], 0.0)
    return largest, best


@dataclass
class BoxAccuracy:
    """Accumulates per-image sweeps into box accuracy curves, MaxBoxAcc and MaxBoxAccV2."""

    thresholds: np.ndarray = field(default_factory=lambda: THRESHOLDS.copy())
    iou_thresholds: tuple[float, ...] = IOU_THRESHOLDS
    count: int = 0
    largest_hits: np.ndarray = field(init=False)
    any_hits: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        shape = (len(self.iou_thresholds), len(self.thresholds))
        self.largest_hits = np.zeros(shape, dtype=np.int64)
        self.any_hits = np.zeros(shape, dtype=np.int64)

    def add(self, largest_iou: np.ndarray, any_iou: np.ndarray) -> None:
        """One image: the two arrays from ``sweep_ious``."""
        iou = np.asarray(self.iou_thresholds)[:, None]
        self.largest_hits += largest_iou[None, :] >= iou
        self.any_hits += any_iou[None, :] >= iou
        self.count += 1

    def curves(self) -> dict[str, np.ndarray]:
        """Accuracy (%) per IoU threshold (rows) and map threshold (columns)."""
        scale = 100.0 / max(self.count, 1)
        return {"largest": self.largest_hits * scale, "any": self.any_hits * scale}

    def summary(self) -> dict[str, Any]:
        """MaxBoxAcc (largest component, IoU 0.5) and MaxBoxAccV2 with their best thresholds."""
        curves = self.curves()
        best = {
            kind: [_best(curve, self.thresholds) for curve in curves[kind]]
            for kind in ("largest", "any")
        }
        per_iou = {
            f"{q:g}": {"accuracy": acc, "threshold": thr}
            for q, (acc, thr) in zip(self.iou_thresholds, best["any"], strict=True)
        }
        summary: dict[str, Any] = {
            "max_box_acc_v2": float(np.mean([acc for acc, _ in best["any"]])),
            "max_box_acc_v2_per_iou": per_iou,
        }
        if 0.5 in self.iou_thresholds:
            accuracy, threshold = best["largest"][self.iou_thresholds.index(0.5)]
            summary["max_box_acc"] = accuracy
            summary["max_box_acc_threshold"] = threshold
        return summary


def _best(curve: np.ndarray, thresholds: np.ndarray) -> tuple[float, float]:
    """The highest accuracy and the lowest threshold reaching it."""
    index = int(np.argmax(curve))
    return float(curve[index]), float(thresholds[index])


@dataclass
class PixelPrecision:
    """Accumulates pixel score histograms over masked images into PxAP (wsolevaluation)."""

    thresholds: np.ndarray = field(default_factory=lambda: THRESHOLDS.copy())
    positive: np.ndarray = field(init=False)
    negative: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        # bins [t0, t1), ..., [t_last, 1), [1, 2): a score of exactly 1 is its own point
        self._edges = np.append(self.thresholds, [1.0, 2.0])
        self.positive = np.zeros(len(self._edges) - 1, dtype=np.int64)
        self.negative = np.zeros(len(self._edges) - 1, dtype=np.int64)

    def add(self, normalized: np.ndarray, mask: np.ndarray, ignore: np.ndarray | None) -> None:
        """One image: its normalised map, the foreground mask and the ignore mask (or None)."""
        if mask.shape != normalized.shape:
            raise ValueError(f"mask {mask.shape} and map {normalized.shape} differ in size")
        background = ~mask if ignore is None else ~mask & ~ignore
        self.positive += np.histogram(normalized[mask], bins=self._edges)[0]
        self.negative += np.histogram(normalized[background], bins=self._edges)[0]

    def pxap(self) -> float | None:
        """Average precision (%) of the pixel precision-recall curve; None without positives."""
        tp = np.cumsum(self.positive[::-1])  # scores >= 1, >= t_last, ..., >= t0
        fp = np.cumsum(self.negative[::-1])
        if tp[-1] == 0:
            return None
        predicted = tp + fp
        precision = np.divide(tp, predicted, out=np.zeros(len(tp)), where=predicted > 0)
        recall = tp / tp[-1]
        gained = np.diff(recall, prepend=0.0)
        return float(np.sum((precision * gained)[predicted > 0]) * 100.0)

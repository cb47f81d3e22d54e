"""From a normalised map to boxes, and box geometry. Pure numpy/scipy functions.

Boxes use pixel-edge coordinates ``(x0, y0, x1, y1)`` in the original image: a component
spanning columns 3..7 and rows 5..9 (inclusive) gives ``(3, 5, 8, 10)``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from gapcam.types import Box

#: 8-connectivity, as in the CAM paper's largest-connected-component rule.
EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def boxes_from_map(
    normalized: np.ndarray, threshold: float = 0.2, min_area: float = 0.0
) -> tuple[Box, ...]:
    """Boxes of the 8-connected components of ``normalized >= threshold``, largest first.

    ``normalized`` is an H x W map scaled to [0, 1] (see ``cam.normalize``). The first box is
    the CAM paper's box (largest component). Further components are kept when their area is at
    least ``min_area`` times the image area. An empty mask (a flat map with threshold > 0, or a
    threshold above every value) gives no boxes; a threshold <= 0 keeps the whole image.
    """
    if normalized.ndim != 2:
        raise ValueError(f"map has shape {normalized.shape}; expected H x W")
    mask = normalized >= threshold
    return boxes_from_mask(mask, min_area)


def boxes_from_mask(mask: np.ndarray, min_area: float = 0.0) -> tuple[Box, ...]:
    """Boxes of the 8-connected components of a boolean H x W mask, largest first."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return ()
    cols = np.flatnonzero(mask.any(axis=0))
    top, left = int(rows[0]), int(cols[0])
    # label only the mask's bounding rectangle: components never leave it
    crop = mask[top : int(rows[-1]) + 1, left : int(cols[-1]) + 1]
    labels, count = ndimage.label(crop, structure=EIGHT_CONNECTED)
    if count == 1:  # the common case: one component, whose box is the rectangle itself
        return (Box(left, top, int(cols[-1]) + 1, int(rows[-1]) + 1, int(np.count_nonzero(crop))),)
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    order = np.argsort(-areas, kind="stable")
    smallest = min_area * mask.size
    kept = [index for rank, index in enumerate(order) if rank == 0 or areas[index] >= smallest]
    slices = ndimage.find_objects(labels, max_label=int(max(kept)) + 1)
    return tuple(
        Box(
            left + slices[i][1].start,
            top + slices[i][0].start,
            left + slices[i][1].stop,
            top + slices[i][0].stop,
            int(areas[i]),
        )
        for i in kept
    )


def box_iou(a: np.ndarray, b: np.ndarray, *, inclusive: bool = False) -> np.ndarray:
    """IoU of every box in ``a`` (N x 4) with every box in ``b`` (M x 4): N x M.

    Pixel-edge xyxy boxes; with ``inclusive=True``, inclusive pixel boxes (``x1``, ``y1`` the
    last column and row: one pixel longer each way, so ``(3, 3, 3, 3)`` is one pixel; the
    convention of wsolevaluation, ``gapcam.eval.metrics``). Empty input gives an empty matrix;
    zero-area pairs give 0.
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    area_a = _side(a[:, 2] - a[:, 0], inclusive) * _side(a[:, 3] - a[:, 1], inclusive)
    area_b = _side(b[:, 2] - b[:, 0], inclusive) * _side(b[:, 3] - b[:, 1], inclusive)
    left = np.maximum(a[:, None, 0], b[None, :, 0])
    top = np.maximum(a[:, None, 1], b[None, :, 1])
    right = np.minimum(a[:, None, 2], b[None, :, 2])
    bottom = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = _side(right - left, inclusive) * _side(bottom - top, inclusive)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _side(difference: np.ndarray, inclusive: bool) -> np.ndarray:
    """A side's length from ``end - start``: one more pixel for inclusive boxes; never < 0."""
    return np.clip(difference + 1 if inclusive else difference, 0, None)

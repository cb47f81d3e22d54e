"""gapcam.boxes on hand-drawn masks and maps: exact boxes in the pixel-edge convention.

A component spanning columns x0..x1-1 and rows y0..y1-1 (inclusive) is Box(x0, y0, x1, y1).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from gapcam.boxes import box_iou, boxes_from_map, boxes_from_mask
from gapcam.types import Box


def _mask(rows: list[str]) -> np.ndarray:
    """'#' is on, '.' is off."""
    return np.array([[c == "#" for c in row] for row in rows], dtype=bool)


def _xyxy(boxes: tuple[Box, ...]) -> list[tuple[float, float, float, float, int]]:
    return [(b.x0, b.y0, b.x1, b.y1, b.area) for b in boxes]


def test_single_pixel() -> None:
    mask = np.zeros((10, 8), dtype=bool)
    mask[5, 3] = True  # row 5, column 3
    (box,) = boxes_from_mask(mask)
    assert box == Box(3, 5, 4, 6, 1)
    assert box.width == box.height == 1


def test_rectangle() -> None:
    mask = np.zeros((12, 12), dtype=bool)
    mask[5:10, 3:8] = True  # rows 5..9, columns 3..7
    assert _xyxy(boxes_from_mask(mask)) == [(3, 5, 8, 10, 25)]


def test_l_shape_gets_its_bounding_box_and_true_area() -> None:
    mask = _mask(
        [
            "......",
            ".#....",
            ".#....",
            ".####.",
            "......",
        ]
    )
    assert _xyxy(boxes_from_mask(mask)) == [(1, 1, 5, 4, 6)]


def test_diagonal_neighbours_join_eight_connected() -> None:
    mask = _mask(
        [
            "##....",
            "##....",
            "..#...",
            "...##.",
        ]
    )
    assert _xyxy(boxes_from_mask(mask)) == [(0, 0, 5, 4, 7)]


def test_two_components_largest_first() -> None:
    mask = _mask(
        [
            "#.......",
            "...####.",
            "...####.",
            "........",
        ]
    )
    assert _xyxy(boxes_from_mask(mask)) == [(3, 1, 7, 3, 8), (0, 0, 1, 1, 1)]


def test_min_area_drops_small_extra_components_but_never_the_largest() -> None:
    mask = _mask(
        [
            "#.........",
            "....###...",
            "....###...",
            "........##",
        ]
    )  # 40 pixels: components of 6, 2 and 1
    assert [b.area for b in boxes_from_mask(mask)] == [6, 2, 1]
    assert [b.area for b in boxes_from_mask(mask, min_area=2 / 40)] == [6, 2]
    assert [b.area for b in boxes_from_mask(mask, min_area=0.9)] == [6]  # the largest stays


def test_empty_mask_gives_no_boxes() -> None:
    assert boxes_from_mask(np.zeros((5, 7), dtype=bool)) == ()


def test_map_threshold_is_inclusive() -> None:
    normalized = np.zeros((6, 6), dtype=np.float32)
    normalized[1:3, 2:5] = 0.5
    normalized[4, 0] = 0.2
    assert _xyxy(boxes_from_map(normalized, threshold=0.5)) == [(2, 1, 5, 3, 6)]
    assert _xyxy(boxes_from_map(normalized, threshold=0.2)) == [(2, 1, 5, 3, 6), (0, 4, 1, 5, 1)]
    assert boxes_from_map(normalized, threshold=0.51) == ()


def test_threshold_zero_keeps_the_whole_image() -> None:
    normalized = np.zeros((9, 13), dtype=np.float32)
    assert _xyxy(boxes_from_map(normalized, threshold=0.0)) == [(0, 0, 13, 9, 117)]


def test_flat_normalized_map_gives_no_box() -> None:
    assert boxes_from_map(np.zeros((9, 13), dtype=np.float32), threshold=0.2) == ()


def test_map_must_be_two_dimensional() -> None:
    with pytest.raises(ValueError, match="H x W"):
        boxes_from_map(np.zeros((1, 4, 4)))


def test_boxes_are_plain_numbers() -> None:
    mask = np.zeros((4, 4), dtype=bool)
    mask[1:3, 1:3] = True
    (box,) = boxes_from_mask(mask)
    assert json.loads(json.dumps(box.as_list())) == [1, 1, 3, 3]
    assert type(box.area) is int


# -- IoU ----------------------------------------------------------------------------------------


def test_box_iou_exact_values() -> None:
    a = np.array([[0, 0, 10, 10], [5, 5, 15, 15]])
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 5, 5]])
    expected = np.array(
        [
            [1.0, 50 / 150, 0.0, 25 / 100],
            [25 / 175, 50 / 150, 0.0, 0.0],
        ]
    )
    np.testing.assert_allclose(box_iou(a, b), expected, rtol=0, atol=1e-12)


def test_box_iou_touching_edges_do_not_overlap() -> None:
    assert box_iou([[0, 0, 2, 2]], [[2, 0, 4, 2]]).tolist() == [[0.0]]


def test_box_iou_of_inclusive_boxes_is_the_same_overlap_one_pixel_longer() -> None:
    """The two pixel conventions measure the same pixels: pixel-edge boxes and the same boxes
    written inclusively (x1, y1 one less) give identical IoUs, bit for bit."""
    rng = np.random.default_rng(0)
    corners = rng.integers(0, 40, (2, 12, 2))
    edges = np.concatenate(
        [corners.min(axis=2, keepdims=True), corners.max(axis=2, keepdims=True)], axis=2
    )
    a = np.stack([edges[0, :6, 0], edges[1, :6, 0], edges[0, :6, 1], edges[1, :6, 1]], axis=1)
    b = np.stack([edges[0, 6:, 0], edges[1, 6:, 0], edges[0, 6:, 1], edges[1, 6:, 1]], axis=1)
    inclusive_a, inclusive_b = a - [0, 0, 1, 1], b - [0, 0, 1, 1]
    same = box_iou(inclusive_a, inclusive_b, inclusive=True)
    assert same.tobytes() == box_iou(a, b).tobytes()
    assert box_iou([[3, 3, 3, 3]], [[3, 3, 3, 3]], inclusive=True).tolist() == [[1.0]]
    assert box_iou([[3, 3, 3, 3]], [[3, 3, 3, 3]]).tolist() == [[0.0]]  # an empty edge box


def test_box_iou_empty_input() -> None:
    assert box_iou(np.zeros((0, 4)), np.array([[0, 0, 1, 1]])).shape == (0, 1)
    assert box_iou(np.array([[0, 0, 1, 1]]), []).shape == (1, 0)
    assert box_iou([], []).shape == (0, 0)


def test_box_iou_zero_area_boxes_give_zero() -> None:
    iou = box_iou([[3, 3, 3, 3], [0, 0, 4, 0]], [[3, 3, 3, 3], [0, 0, 4, 4]])
    np.testing.assert_array_equal(iou, np.zeros((2, 2)))
    assert np.isfinite(iou).all()


def test_box_iou_inverted_boxes_count_as_empty() -> None:
    assert box_iou([[4, 4, 0, 0]], [[0, 0, 4, 4]]).tolist() == [[0.0]]


def _reference_boxes(mask: np.ndarray, min_area: float) -> list[tuple[int, int, int, int, int]]:
    """Independent of scipy's find_objects and of any cropping: a flood fill per component."""
    height, width = mask.shape
    seen = np.zeros_like(mask)
    components = []
    for y, x in zip(*np.nonzero(mask), strict=True):
        if seen[y, x]:
            continue
        stack, pixels = [(y, x)], []
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            pixels.append((cy, cx))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = cy + dy, cx + dx
                    if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
        ys, xs = zip(*pixels, strict=True)
        components.append((min(xs), min(ys), max(xs) + 1, max(ys) + 1, len(pixels)))
    components.sort(key=lambda c: -c[4])  # stable: ties keep raster order of their first pixel
    return [c for rank, c in enumerate(components) if rank == 0 or c[4] >= min_area * mask.size]


def test_boxes_equal_a_flood_fill_on_random_masks() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        height, width = rng.integers(1, 24, size=2)
        mask = rng.random((height, width)) < rng.random() * 0.6
        min_area = float(rng.choice([0.0, 0.01, 0.05, 0.2]))
        assert _xyxy(boxes_from_mask(mask, min_area)) == _reference_boxes(mask, min_area)


def test_non_boolean_masks_count_pixels_not_values() -> None:
    mask = np.zeros((4, 5), dtype=np.uint8)
    mask[1:3, 1:4] = 2
    assert _xyxy(boxes_from_mask(mask)) == [(1, 1, 4, 3, 6)]

"""Class activation maps as pure tensor functions: no hooks, no state, no I/O.

Shapes: features N x C x h x w; weight K x C; bias K; classes N x k (long).
For a ``"linear"`` head, ``CAM_c = sum_k w[c, k] * f_k`` and ``mean_hw(CAM_c) + b_c = logit_c``.
For a ``"conv-relu"`` head (SqueezeNet), ``CAM_c = relu(w_c . f + b_c)`` and
``mean_hw(CAM_c) = logit_c``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from gapcam.types import CENTRED, Placement

NORMALIZATIONS = ("minmax", "max", "none")

#: Relative spread below which a map counts as flat for ``minmax`` (float rounding, not signal).
FLAT_TOLERANCE = 1e-5


def logits_from_features(
    features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, head: str = "linear"
) -> torch.Tensor:
    """Logits N x K from feature maps, through global average pooling and the classifier."""
    if head == "linear":
        return torch.addmm(bias, features.mean(dim=(2, 3)), weight.t())
    return all_class_maps(features, weight, bias, head).mean(dim=(2, 3))


def class_maps(
    features: torch.Tensor,
    weight: torch.Tensor,
    classes: torch.Tensor,
    bias: torch.Tensor | None = None,
    head: str = "linear",
) -> torch.Tensor:
    """CAMs of the chosen classes: N x k x h x w, ``classes`` is N x k (one row per image)."""
    if classes.dim() != 2 or classes.shape[0] != features.shape[0]:
        raise ValueError(
            f"classes has shape {tuple(classes.shape)}; expected (N, k) with N = {features.shape[0]}"
        )
    maps = torch.einsum("nkc,nchw->nkhw", weight[classes], features)
    if head == "conv-relu":
        if bias is None:
            raise ValueError("a conv-relu head needs its bias")
        maps = torch.relu(maps + bias[classes][..., None, None])
    return maps


def all_class_maps(
    features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, head: str = "linear"
) -> torch.Tensor:
    """CAMs of all K classes at once (the classifier as a 1x1 convolution): N x K x h x w."""
    kernel = weight[:, :, None, None]
    if head == "linear":
        return F.conv2d(features, kernel)
    return torch.relu(F.conv2d(features, kernel, bias))


def upsample(
    maps: torch.Tensor,
    size: tuple[int, int],
    region: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0),
) -> torch.Tensor:
    """Bilinear upsampling (align_corners=False) of N x k x h x w maps to ``size`` = (H, W).

    ``region`` = (u0, v0, u1, v1) is where the original image lies in the model input, in [0, 1]
    (the whole input for a stretch resize, a centred part of it for a letterbox); the result is
    in the original image's pixel coordinates.
    """
    height, width = size
    if region == (0.0, 0.0, 1.0, 1.0):
        return F.interpolate(maps, size=(height, width), mode="bilinear", align_corners=False)
    u0, v0, u1, v1 = region
    dtype, device = maps.dtype, maps.device
    xs = u0 + (torch.arange(width, dtype=dtype, device=device) + 0.5) / width * (u1 - u0)
    ys = v0 + (torch.arange(height, dtype=dtype, device=device) + 0.5) / height * (v1 - v0)
    grid = torch.stack(torch.meshgrid(xs * 2 - 1, ys * 2 - 1, indexing="xy"), dim=-1)
    n, k, h, w = maps.shape
    grid = grid.expand(n * k, height, width, 2)
    out = F.grid_sample(
        maps.reshape(n * k, 1, h, w),
        grid,
        mode="bilinear",
        padding_mode="border",
        align_corners=False,
    )
    return out.reshape(n, k, height, width)


def normalize(maps: torch.Tensor, mode: str = "minmax") -> torch.Tensor:
    """Per-map normalisation over the last two dimensions.

    ``minmax``: (m - min) / (max - min) in [0, 1]; ``max``: relu(m) / max (negative evidence
    dropped); ``none``: unchanged. A flat map (max == min, or max <= 0 for ``max``) becomes 0;
    for ``minmax`` "flat" allows float rounding (max - min <= 1e-5 * max(|max|, |min|)), as
    bilinear upsampling of a constant map is constant only up to rounding.
    """
    if mode == "none":
        return maps
    if mode not in NORMALIZATIONS:
        raise ValueError(f"normalize={mode!r}: use one of {', '.join(NORMALIZATIONS)}")
    if mode == "max":
        top = maps.flatten(-2).amax(dim=-1)[..., None, None]
        positive = torch.relu(maps)
        return torch.where(top > 0, positive / top.clamp_min(1e-12), torch.zeros_like(maps))
    flat = maps.flatten(-2)
    top = flat.amax(dim=-1)[..., None, None]
    bottom = flat.amin(dim=-1)[..., None, None]
    span = top - bottom
    varies = span > FLAT_TOLERANCE * torch.maximum(top.abs(), bottom.abs())
    # two passes over the map, into one new tensor (the same operations as the formula)
    out = torch.sub(maps, bottom).div_(span.clamp_min(1e-12))
    if not bool(varies.all()):
        out.masked_fill_(~varies, 0.0)
    return out


def placed(
    region: tuple[float, float, float, float], placement: Placement
) -> tuple[float, float, float, float]:
    """``region`` (input fractions, as ``upsample`` takes it) for a grid drawn by
    ``placement`` instead of evenly over the input (a dilated network's grid: its plain
    sub-grid cells are drawn where the plain grid's are, ``Subgrid.placement``)."""
    if placement == CENTRED:
        return region
    (row_scale, row_offset), (column_scale, column_offset) = placement
    u0, v0, u1, v1 = region
    return (
        column_scale * u0 + column_offset,
        row_scale * v0 + row_offset,
        column_scale * u1 + column_offset,
        row_scale * v1 + row_offset,
    )


def merge_views(
    maps: Sequence[torch.Tensor],
    mirrored: Sequence[bool],
    placements: Sequence[Placement] | None = None,
) -> tuple[torch.Tensor, Placement]:
    """The mean of CAMs of several views of the same images (each N x k x h_i x w_i).

    A view made from the horizontally mirrored input is mirrored back first; every map is then
    resampled bilinearly (align_corners=False) to the finest grid (largest h, largest w) and
    the maps are averaged there: N x k x h x w. Views must cover the same region of the images.
    ``placements``: how each view's grid (mirrored back) lies over the input (``placed``;
    all centred when None); the maps are resampled onto the grid of the first view with the
    finest grid, whose placement is returned with the mean.
    """
    if not maps or len(maps) != len(mirrored):
        raise ValueError(f"{len(maps)} maps and {len(mirrored)} mirrored flags; give one per view")
    placements = list(placements or [CENTRED] * len(maps))
    height = max(m.shape[-2] for m in maps)
    width = max(m.shape[-1] for m in maps)
    finest = next(i for i, m in enumerate(maps) if m.shape[-2:] == (height, width))
    target = placements[finest]
    # the input fractions under the target grid's pixels: grid fraction g = scale * x + offset
    (row_scale, row_offset), (column_scale, column_offset) = target
    under = (
        -column_offset / column_scale,
        -row_offset / row_scale,
        (1 - column_offset) / column_scale,
        (1 - row_offset) / row_scale,
    )
    total = maps[0].new_zeros((*maps[0].shape[:2], height, width))
    for view, flip, placement in zip(maps, mirrored, placements, strict=True):
        view = view.flip(-1) if flip else view
        if placement == target:
            if view.shape[-2:] != (height, width):
                view = F.interpolate(
                    view, size=(height, width), mode="bilinear", align_corners=False
                )
        else:
            view = upsample(view, (height, width), placed(under, placement))
        total += view
    return total / len(maps), target

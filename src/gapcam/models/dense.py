"""Denser maps from the same weights: the last stride-2 stage(s) run dilated, not strided.

``dilate(model, 16)`` returns a GapModel whose last feature map has 2x the cells a side (4x
with 8), with no retraining: every spatial layer that ran at output stride 32 now runs at 16.
The layer that halved the grid (stride 2) keeps its kernel but gets stride 1, with padding
that keeps each output centred on its input cell; every later spatial convolution gets its
dilation doubled (and its padding with it), so it combines the same cells as before, now
two cells apart. The 1x1 convolutions and the per-cell layers are unchanged.

Why the plain features are a sub-grid of the dense ones. Count positions in cells of the
stage's input grid. A stride-2 convolution with a k-wide kernel and ``pad_left`` zeros before
the first cell centres its output i on input cell ``2i + (k - 1) / 2 - pad_left``:

- symmetric padding ((k - 1) / 2, torchvision's ResNets): on cell ``2i``;
- TensorFlow's "same" padding (timm's ``tf_`` models, EfficientNet-Lite) pads
  ``(k - 2) / 2`` rounded down before an even input (the odd pixel goes after it): on cell
  ``2i + 1``; before an odd input it pads symmetrically: on cell ``2i``.

At stride 1 with centred padding, output j is centred on cell j, so the plain output i is
the dense output ``2i + phase`` (phase 0 or 1 above); the later layers, dilated by 2, read
exactly the cells the plain ones read, zero padding included at the borders. With output
stride 8 the two stages compose: cell ``4i + 2 * phase_16 + phase_8``. The phase depends on
the input size for TF padding (224 and 256: 1; Lite1's 240 and Lite2's 260, whose last
stride-2 layer gets an odd grid: 0), so it is found for every input size a localizer uses.

Nothing here relies on the derivation alone: ``dilate`` runs both networks on a probe input
(and at each given input size) and keeps the result only when the sub-grid reproduces the
plain features; otherwise (squeeze-excitation or attention that pools the whole map, a
pooling layer in the stage, an even kernel) it refuses, naming the reason. The logits then
come from the sub-grid (``GapModel.logits``), identical to the plain network's; the CAM is
computed on every cell.

Where the cells are drawn (``Subgrid.placement``): the plain CAM's n cells evenly cover the
input, cell i centred on ``(i + 1/2) / n`` of it (bilinear upsampling with
``align_corners=False``, as the CAM paper and wsolevaluation draw it). The dense grid is
drawn so that its sub-grid cells land exactly there: dense cell ``phase + 2i`` on ``(i +
1/2) / n``, so cell j on ``((j - phase) / 2 + 1/2) / n``. A dense map whose values are the
plain map's, interpolated, is then drawn as the plain map: denser maps add detail, never a
displacement. (Drawing the dense grid evenly over the input instead would move every map by
8 pixels at 224, down and right for EfficientNet-Lite, up and left for ResNets.)
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from gapcam.errors import UnsupportedModelError
from gapcam.models.base import GapModel, Subgrid, inference_state
from gapcam.types import OUTPUT_STRIDES

#: the probe's input (height, width): a multiple of 32, every level even, not square
PROBE = (64, 96)

#: timm's convolutions that compute TensorFlow "same" padding at run time (from their stride
#: and dilation): nothing to set but stride and dilation
DYNAMIC_PADDING = ("Conv2dSame",)


def dilate(model: GapModel, output_stride: int, sizes: Sequence[tuple[int, int]] = ()) -> GapModel:
    """``model`` with its last feature map at ``output_stride`` (32: ``model`` itself; 16 or 8:
    a new GapModel whose module is a copy sharing every parameter and buffer with ``model``'s,
    so training one trains both), checked at the input ``sizes`` (height, width) it will run
    at. Raises ``UnsupportedModelError`` with the reason when the network cannot run dilated
    exactly."""
    if output_stride not in OUTPUT_STRIDES:
        choices = ", ".join(map(str, OUTPUT_STRIDES))
        raise UnsupportedModelError(f"output_stride={output_stride!r}: use one of {choices}")
    if output_stride == model.output_stride:
        return model
    if model.step != 1:
        raise UnsupportedModelError(
            f"{model.name}: already dilated (output stride {model.output_stride}); "
            "dilate the plain model"
        )
    shapes = _layer_shapes(model)
    module = shared_copy(model.module)
    layers = dict(module.named_modules())
    changed = 0
    for name, (stride_in, stride_out) in shapes.items():
        if stride_out <= output_stride:
            continue
        changed += _run_finer(name, layers[name], stride_in, stride_out, output_stride, model.name)
    if not changed:
        raise UnsupportedModelError(
            f"{model.name}: found no convolution running at output stride 32 to dilate"
        )
    dense = dataclasses.replace(model, module=module, step=32 // output_stride, subgrids={})
    for size in dict.fromkeys([PROBE, *map(tuple, sizes)]):
        _check(model, dense, size)  # type: ignore[arg-type]
    return dense


def _layer_shapes(model: GapModel) -> dict[str, tuple[int, int]]:
    """(input stride, output stride) in probe pixels of every spatial layer the features use."""
    height, _ = PROBE
    shapes: dict[str, tuple[int, int]] = {}
    handles = []

    def record(name: str) -> Any:
        def hook(_: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            if not (inputs and isinstance(inputs[0], torch.Tensor) and inputs[0].dim() == 4):
                return
            strides = (height // inputs[0].shape[-2], height // output.shape[-2])
            if shapes.setdefault(name, strides) != strides:
                raise UnsupportedModelError(
                    f"{model.name}: layer {name} runs at two resolutions; cannot dilate it"
                )

        return hook

    for name, layer in model.module.named_modules():
        if isinstance(layer, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            handles.append(layer.register_forward_hook(record(name)))
    try:
        _features(model, _probe(model))
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def _run_finer(
    name: str, layer: nn.Module, stride_in: int, stride_out: int, target: int, model: str
) -> int:
    """Make ``layer`` run ``stride_in // target`` times finer; 1 when it was changed."""
    if not isinstance(layer, nn.Conv2d):
        raise UnsupportedModelError(
            f"{model}: {name} ({type(layer).__name__}) downsamples the last stage and cannot "
            "run dilated; use output_stride=32"
        )
    finer = stride_in // target  # how many cells of the new grid one old cell spans
    kernel = layer.kernel_size
    if any(k % 2 == 0 for k in kernel):
        raise UnsupportedModelError(
            f"{model}: {name} has an even kernel {tuple(kernel)}, which no padding centres; "
            "use output_stride=32"
        )
    dilation = tuple(d * finer for d in layer.dilation)
    layer.dilation = dilation
    if stride_out > stride_in:  # the layer that halved the grid now keeps it
        layer.stride = (1, 1)
    if type(layer).__name__ not in DYNAMIC_PADDING and not isinstance(layer.padding, str):
        layer.padding = tuple(d * (k - 1) // 2 for d, k in zip(dilation, kernel, strict=True))
    return 1


def shared_copy(module: nn.Module) -> nn.Module:  # also used by the ONNX export
    """A deep copy of ``module`` whose parameters and buffers are the original's tensors."""
    memo: dict[int, Any] = {id(t): t for t in module.parameters()}
    memo.update({id(t): t for t in module.buffers()})
    return copy.deepcopy(module, memo)


def _probe(model: GapModel, size: tuple[int, int] = PROBE) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2 if size == PROBE else 1, 3, *size, generator=generator)
    return x.to(device=model.device, dtype=model.weight.dtype)


def _features(model: GapModel, x: torch.Tensor) -> torch.Tensor:
    # full float32 on GPUs too: TF32 convolutions would differ by 1e-3, over the tolerance
    with inference_state(model.module), torch.backends.cudnn.flags(allow_tf32=False):
        return model.features(x).float()


#: the largest difference, relative to the largest plain feature, between the sub-grid and the
#: plain features (both are the same sums; only the order of their terms may differ)
TOLERANCE = 1e-5


def _check(plain: GapModel, dense: GapModel, size: tuple[int, int]) -> None:
    """Find the sub-grid of ``dense``'s features that equals ``plain``'s at the input ``size``
    and record it for that grid size (``GapModel.subgrids``); refuse when there is none."""
    x = _probe(plain, size)
    ours, theirs = _features(dense, x), _features(plain, x)
    step = dense.step
    tolerance = TOLERANCE * float(theirs.abs().max())
    for row in range(step):
        for column in range(step):
            cells = ours[..., row::step, column::step]
            if cells.shape == theirs.shape and float((cells - theirs).abs().max()) <= tolerance:
                grid = (ours.shape[-2], ours.shape[-1])
                found = Subgrid(step, (row, column))
                if dense.subgrids.setdefault(grid, found) != found:
                    break  # two sizes with one grid but different sub-grids: not reliable
                return
    raise UnsupportedModelError(
        f"{plain.name}: run dilated, its features no longer contain the plain ones at "
        f"{size[0]}x{size[1]} (a layer of the last stage, such as squeeze-excitation or "
        "attention, sees the whole map, or its padding cannot be centred), so its dense map "
        "would not explain its logits; use output_stride=32"
    )

"""Shared fixtures: the embedded model (built once), tiny seeded GAP networks, test images,
and the ILSVRC dev set (``ilsvrc_dev``: the folder named by $GAPCAM_ILSVRC_DEV).

Everything here is offline and deterministic: random tensors come from seeded generators.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import gapcam
from gapcam.models import GapModel
from gapcam.types import Preprocess

# the example photos ship inside the package (examples/ at the repository root links here)
EXAMPLES = Path(__file__).resolve().parents[1] / "src" / "gapcam" / "web" / "examples"

#: The one setting for the ILSVRC dev set (docs/evaluate.md, "The ILSVRC dev set").
DEV_SET_VARIABLE = "GAPCAM_ILSVRC_DEV"

# The test machines are small and shared: one intra-op thread is faster and steadier than
# several threads fighting for two cores (measured 10x on a busy 2-core box).
torch.set_num_threads(1)


class Tripwire(nn.Module):
    """Identity, until ``armed``: then its forward raises."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.armed:
            raise RuntimeError("tripwire forward exploded on purpose")
        return x


class TinyGapNet(nn.Module):
    """conv -> BN -> ReLU -> strided conv -> Dropout -> Tripwire (``body``) -> GAP -> ``fc``.

    BatchNorm and Dropout make train/eval mode visible in the output. To test clean-up on
    errors, ``explode`` makes the forward raise after the features ran, and arming
    ``body[5]`` (a Tripwire) makes it raise inside the feature layer.
    """

    def __init__(self, classes: int = 5, width: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1),
            nn.Dropout(0.5),
            Tripwire(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, classes)
        self.explode = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.body(x)
        if self.explode:
            raise RuntimeError("forward exploded on purpose")
        return self.fc(self.pool(features).flatten(1))


class RedNet(nn.Module):
    """Features = the (normalised) red channel average-pooled 4x4; class 0 = "red", 1 = "not red".

    Its CAM for class 0 is high exactly where the image is red, so boxes are predictable.
    """

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.AvgPool2d(4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(1, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0], [-1.0]]))
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.body(x[:, :1])).flatten(1))


def randomize_(module: nn.Module, seed: int = 0, scale: float = 0.3) -> nn.Module:
    """Fill every parameter and BatchNorm statistic with seeded random values (in place)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
        for sub in module.modules():
            if isinstance(sub, nn.BatchNorm2d):
                sub.running_mean.copy_(torch.randn(sub.num_features, generator=generator) * 0.1)
                sub.running_var.copy_(torch.rand(sub.num_features, generator=generator) + 0.5)
    return module


def tiny_gap_model(*, callable_features: bool = False, seed: int = 0) -> GapModel:
    """A validated from_module() wrapper around a seeded TinyGapNet (32 x 32 inputs)."""
    net = randomize_(TinyGapNet(), seed)
    features = net.body if callable_features else "body"
    return gapcam.from_module(
        net, features=features, classifier="fc", preprocess=Preprocess(size=(32, 32))
    )


def red_model() -> GapModel:
    return gapcam.from_module(
        RedNet(),
        features="body",
        classifier="fc",
        class_names=["red", "not red"],
        preprocess=Preprocess(size=(128, 128), mean=(0.5,) * 3, std=(0.5,) * 3),
    )


SHAPES = ["circle", "square", "triangle"]


def write_shapes_run(folder: Path) -> Path:
    """A run folder as `gapcam train` writes it (model.safetensors + gapcam.json) in ``folder``:
    the embedded efficientnet_lite0 with a seeded head for ``SHAPES``, written without training."""
    import dataclasses

    from gapcam.models.checkpoint import checkpoint_files, replace_classifier, trained_tensors

    model = replace_classifier(gapcam.build_model("efficientnet_lite0"), SHAPES)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.classifier.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    metadata = {
        "backbone": "efficientnet_lite0",
        "backbone_weights": None,
        "class_names": SHAPES,
        "preprocess": dataclasses.asdict(model.preprocess),
    }
    run = folder / "shapes-run"
    run.mkdir()
    for name, data in checkpoint_files(trained_tensors(model), metadata).items():
        (run / name).write_bytes(data)
    return run


def assert_same_results(expected: list, got: list) -> None:  # type: ignore[type-arg]
    """Two backends' results for the same images: the same classes (probabilities within
    1e-4), the same low-res maps (within 1e-3 of their scale) and normalised maps (1e-3), the
    same boxes."""
    for a, b in zip(expected, got, strict=True):
        assert [p.index for p in a.predictions] == [p.index for p in b.predictions]
        for pa, pb in zip(a.predictions, b.predictions, strict=True):
            assert pa.probability == pytest.approx(pb.probability, abs=1e-4)
        for i, (ma, mb) in enumerate(zip(a.maps, b.maps, strict=True)):
            scale = float(np.abs(ma.low_res).max())
            np.testing.assert_allclose(mb.low_res, ma.low_res, atol=1e-3 * scale)
            np.testing.assert_allclose(b.cam(i), a.cam(i), atol=1e-3)
            assert [x.as_list() for x in ma.boxes] == [x.as_list() for x in mb.boxes]


def forward_hooks(module: nn.Module) -> dict[str, int]:
    """Submodule name -> number of forward (pre-)hooks, for every submodule that has any."""
    counts = {}
    for name, sub in module.named_modules():
        count = len(sub._forward_hooks) + len(sub._forward_pre_hooks)
        if count:
            counts[name or "<root>"] = count
    return counts


def training_flags(module: nn.Module) -> dict[str, bool]:
    return {name: sub.training for name, sub in module.named_modules()}


def square_image(
    size: tuple[int, int], square: tuple[int, int, int, int], colour=(255, 0, 0)
) -> Image.Image:
    """A black RGB image of ``size`` (w, h) with a filled box ``square`` (x0, y0, x1, y1)."""
    array = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    x0, y0, x1, y1 = square
    array[y0:y1, x0:x1] = colour
    return Image.fromarray(array)


@pytest.fixture(scope="session")
def embedded_model() -> GapModel:
    """The embedded efficientnet_lite0 with its real ImageNet weights. Do not modify it."""
    return gapcam.build_model("efficientnet_lite0")


@pytest.fixture(scope="session")
def localizer(embedded_model: GapModel) -> gapcam.Localizer:
    return gapcam.Localizer(model=embedded_model)


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def tiny() -> GapModel:
    return tiny_gap_model()


@pytest.fixture
def rednet() -> GapModel:
    return red_model()


@pytest.fixture
def cat_path() -> Path:
    return EXAMPLES / "cat.png"


@pytest.fixture
def coffee_path() -> Path:
    return EXAMPLES / "coffee.jpg"


@pytest.fixture(scope="session")
def ilsvrc_dev() -> Path:
    """The ILSVRC dev set folder, from $GAPCAM_ILSVRC_DEV (docs/evaluate.md says how to build it).

    Unset: the test is skipped, or fails where the ``CI`` environment variable is set (CI must
    run the dev-set gate). Set to a folder without the dev set's ``image_ids.txt``: it fails.
    """
    value = os.environ.get(DEV_SET_VARIABLE, "")
    if not value:
        reason = (
            f"{DEV_SET_VARIABLE} is not set: point it at the ILSVRC dev set folder "
            "(docs/evaluate.md says how to build it)"
        )
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must run the dev-set gate")
        pytest.skip(reason)
    folder = Path(value)
    if not (folder / "image_ids.txt").is_file():
        pytest.fail(
            f"{DEV_SET_VARIABLE}={value}: no image_ids.txt there; point it at the ILSVRC dev set "
            "folder (docs/evaluate.md says how to build it)"
        )
    return folder

"""The GapModel contract: what the CAM engine needs from a network, read live.

A ``GapModel`` wraps a user's or a library's ``nn.Module`` without changing it:

- ``features(x)`` -> N x C x h x w, the last convolutional feature maps;
- ``weight`` (K x C) and ``bias`` (K,) of the classifier, read from the module at every call
  (never cached, so fine-tuning shows at once);
- ``head``: ``"linear"`` when logits = W . GAP(f) + b (ResNet, EfficientNet, DenseNet, ...), or
  ``"conv-relu"`` when a 1x1 convolution and a ReLU come *before* the pooling (SqueezeNet):
  logits = GAP(relu(W . f + b));
- ``class_names`` and ``preprocess`` bound to the weights.

The identity ``logits(features(x)) == module(x)`` holds for every adapter; the tests check it.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import numbers
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from gapcam.errors import ClassSelectionError, ModelError
from gapcam.types import CENTRED, Placement, Preprocess

HEADS = ("linear", "conv-relu")


@dataclass(frozen=True)
class Subgrid:
    """Where the plain network's cells lie in a dilated network's feature grid: every
    ``step``-th cell from ``phase`` (row, column); ``step`` 1 is a plain network. The plain
    features are that sub-grid (``gapcam.models.dense``), so the logits (global average
    pooling over it) are the plain ones.
    """

    step: int = 1
    phase: tuple[int, int] = (0, 0)

    def take(self, features: torch.Tensor) -> torch.Tensor:
        """The plain cells of N x C x h x w features (the features themselves when step is 1)."""
        if self.step == 1:
            return features
        row, column = self.phase
        return features[..., row :: self.step, column :: self.step]

    def placement(self, grid: tuple[int, int]) -> Placement:
        """How a dense ``grid`` (h, w) is drawn: its sub-grid cells exactly where the plain
        network's cells are drawn. The plain grid's n cells evenly cover the input (cell i
        centred on the input fraction ``(i + 1/2) / n``), and dense cell ``phase + step * i``
        is plain cell i, so dense cell j is centred on ``((j - phase) / step + 1/2) / n``."""
        if self.step == 1:
            return CENTRED
        axes = []
        for m, phase in zip(grid, self.phase, strict=True):
            n = -(-(m - phase) // self.step)  # the plain cells: phase, phase + step, ... < m
            axes.append((n * self.step / m, (phase + 0.5 - self.step / 2) / m))
        return axes[0], axes[1]

    def mirrored(self, grid: tuple[int, int]) -> Subgrid:
        """The sub-grid of a dense ``grid`` made from the mirrored input, mirrored back: the
        plain cells counted from the other edge."""
        if self.step == 1:
            return self
        row, column = self.phase
        n = -(-(grid[1] - column) // self.step)
        return Subgrid(self.step, (row, grid[1] - 1 - column - self.step * (n - 1)))


@dataclass(eq=False)
class GapModel:
    """A network that ends in global average pooling + one linear layer, seen by gapcam."""

    name: str
    module: nn.Module
    feature_fn: Callable[[Any, torch.Tensor], torch.Tensor]
    classifier: nn.Module
    class_names: Sequence[str]
    preprocess: Preprocess = field(default_factory=Preprocess)
    head: str = "linear"
    aliases: Sequence[str] = ()
    source: str = "custom"
    #: 1 for a plain network; 2 or 4 when its last stage(s) run dilated (``models.dense``),
    #: with ``subgrids``: the checked sub-grid of each dense grid size (h, w) it has run at
    step: int = 1
    subgrids: dict[tuple[int, int], Subgrid] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ModelError(f"head={self.head!r}: use one of {', '.join(HEADS)}")
        weight = getattr(self.classifier, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise ModelError(
                f"{self.name}: classifier {type(self.classifier).__name__} has no weight"
            )
        if len(self.class_names) != self.num_classes:
            raise ModelError(
                f"{self.name}: {len(self.class_names)} class names for a classifier with "
                f"{self.num_classes} outputs; give exactly one name per output"
            )

    # -- the contract -------------------------------------------------------------------------
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Last convolutional feature maps, N x C x h x w."""
        return self.feature_fn(self.module, x)

    @property
    def weight(self) -> torch.Tensor:
        """Classifier weight as K x C, read live from the module."""
        weight = cast(torch.Tensor, self.classifier.weight)
        return weight.reshape(weight.shape[0], -1)

    @property
    def bias(self) -> torch.Tensor:
        """Classifier bias (K,), zeros when the classifier has none."""
        bias = cast("torch.Tensor | None", getattr(self.classifier, "bias", None))
        if bias is None:
            return torch.zeros(self.num_classes, dtype=self.weight.dtype, device=self.weight.device)
        return bias

    def __repr__(self) -> str:
        """One line (the module's repr is the whole network: print ``module`` for it)."""
        height, width = self.preprocess.size
        dilated = f", output stride {self.output_stride}" if self.step > 1 else ""
        return (
            f"GapModel({self.name!r}, {self.num_classes} classes, {self.num_features} features, "
            f"input {height}x{width}, source={self.source!r}{dilated}, on {self.device})"
        )

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])

    @property
    def num_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def output_stride(self) -> int:
        """Input pixels per feature cell: 32 for the supported networks, 16 or 8 dilated."""
        return 32 // self.step

    def subgrid(self, grid: tuple[int, int] | torch.Size) -> Subgrid:
        """The plain cells of a feature ``grid`` (h, w) of this network."""
        if self.step == 1:
            return Subgrid()
        found = self.subgrids.get((int(grid[0]), int(grid[1])))
        if found is None:
            raise ModelError(
                f"{self.name}: dilated, it has not been checked at a size that gives a "
                f"{tuple(grid)} grid; run gapcam.models.dense.check_sizes(model, [size]) first"
            )
        return found

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from feature maps through the head: equals ``module(x)`` (of the plain
        network, for a dilated one: its sub-grid's cells are the plain cells)."""
        from gapcam.cam import logits_from_features

        return logits_from_features(self.pooled_cells(features), self.weight, self.bias, self.head)

    def pooled_cells(self, features: torch.Tensor) -> torch.Tensor:
        """The cells the head pools: all of them, or a dilated network's plain sub-grid."""
        return self.subgrid(features.shape[-2:]).take(features)

    def pooled(self, features: torch.Tensor) -> torch.Tensor:
        """Global average pooling of feature maps, N x C, as the head pools them."""
        return self.pooled_cells(features).mean(dim=(2, 3))

    # -- classes --------------------------------------------------------------------------------
    def class_index(self, query: int | str) -> int:
        """Index of a class given as an index (int or digit string) or a name (any synonym)."""
        if isinstance(query, numbers.Integral) or (
            isinstance(query, str) and query.strip().lstrip("-").isdigit()
        ):
            index = int(query)
            if not 0 <= index < self.num_classes:
                raise ClassSelectionError(
                    f"class {index}: out of range; {self.name} has classes 0..{self.num_classes - 1}"
                )
            return index
        if not isinstance(query, str):
            raise ClassSelectionError(
                f"class {query!r}: give a class index (int) or a class name (str), "
                f"not a {type(query).__name__}"
            )
        wanted = query.strip().lower()
        exact = [i for i, n in enumerate(self.class_names) if n.lower() == wanted]
        if not exact and self.aliases:
            exact = [
                i
                for i, alias in enumerate(self.aliases)
                if wanted in (s.strip().lower() for s in alias.split(","))
            ]
        if len(exact) == 1:
            return exact[0]
        if len(exact) > 1:
            listed = ", ".join(f"{i} ({self.class_names[i]})" for i in exact)
            raise ClassSelectionError(
                f"class {query!r}: ambiguous, matches {listed}; pass an index"
            )
        close = self._suggestions(wanted)
        hint = f"; did you mean: {', '.join(close)}?" if close else "; see `gapcam classes MODEL`"
        raise ClassSelectionError(f"class {query!r}: not a class of {self.name}{hint}")

    def _suggestions(self, wanted: str, count: int = 5) -> list[str]:
        """Names containing the query as a word first (``cat`` -> Egyptian cat, tiger cat...),
        then spelling neighbours."""
        original = {n.lower(): n for n in self.class_names}
        words = [n for n in original if wanted in n.replace("-", " ").split()]
        close = difflib.get_close_matches(wanted, list(original), n=count)
        return [original[n] for n in dict.fromkeys(words + close)][:count]


def weights_digest(model: GapModel, kind: str, extra: str = "", *, head: bool = True) -> str:
    """sha256 of ``kind``, the model's name, ``extra`` and every tensor of its module (name,
    dtype, shape and values, in name order): what a cache keys its entries by. ``head=False``
    leaves the classifier's tensors out (entries that outlive a new head)."""
    if model.step > 1:  # a dilated module computes other features from the same tensors
        extra = f"{extra}\noutput_stride={model.output_stride}"
    digest = hashlib.sha256(f"{kind}\n{model.name}\n{extra}".encode())
    classifier = model.classifier.state_dict(keep_vars=True).values()
    skipped = set() if head else {id(t) for t in classifier}
    for name, tensor in sorted(model.module.state_dict(keep_vars=True).items()):
        if id(tensor) in skipped:
            continue
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{data.dtype}:{tuple(tensor.shape)}\n".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@contextlib.contextmanager
def inference_state(module: nn.Module, *, tracing: bool = False) -> Iterator[None]:
    """Put every submodule in eval mode and disable autograd; restore each flag afterwards.

    The caller's model is left exactly as it was, even when the body raises. ``tracing`` uses
    ``torch.no_grad`` instead of ``torch.inference_mode`` (an ONNX export traces the module,
    which inference tensors do not allow).
    """
    flags = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        with torch.no_grad() if tracing else torch.inference_mode():
            yield
    finally:
        for submodule, flag in flags:
            submodule.training = flag


def same_logits(expected: object, ours: torch.Tensor | None) -> bool:
    """Whether the network's own output equals gapcam's logits (the GAP + linear identity)."""
    return (
        isinstance(expected, torch.Tensor)
        and ours is not None
        and expected.shape == ours.shape
        and torch.allclose(expected, ours, rtol=1e-4, atol=1e-4)
    )


def verify_head(model: GapModel, head_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Check that ``head_fn`` (the network's own head, features -> logits) is GAP + linear.

    Runs the head on a small random feature map and compares with W . GAP(f) + b; raises
    ``UnsupportedModelError`` saying so when they differ (a norm, an activation or another
    dense layer after the pooling means the network has no exact CAM).
    """
    from gapcam.errors import UnsupportedModelError

    expected: torch.Tensor | None
    ours: torch.Tensor | None
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(2, model.num_features, 3, 3, generator=generator)
    probe = probe.to(device=model.device, dtype=model.weight.dtype)
    try:
        with inference_state(model.module):
            expected = head_fn(probe)
            ours = model.logits(probe)
    except RuntimeError:  # the head does not even take features of the classifier's width
        expected = ours = None
    if not same_logits(expected, ours):
        raise UnsupportedModelError(
            f"{model.name}: its head is not global average pooling + one linear layer "
            "(something after the pooling, e.g. a norm, an activation or another dense layer, "
            "changes the result), so a class activation map would not explain its logits"
        )

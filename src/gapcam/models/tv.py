"""Adapters for torchvision's classification families that end in GAP + one linear layer.

Each family says, once, where its last convolutional features are and which module is its
classifier; nothing is guessed. Families whose head is not GAP + linear are refused with the
reason (see ``REFUSED``).
"""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gapcam.errors import ModelError, UnsupportedModelError
from gapcam.models.base import GapModel
from gapcam.models.imagenet import default_names
from gapcam.models.weights import load_into, load_state_dict
from gapcam.types import Preprocess

FeatureFn = Callable[[Any, torch.Tensor], torch.Tensor]


def _resnet(m: Any, x: torch.Tensor) -> torch.Tensor:
    x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    return m.layer4(m.layer3(m.layer2(m.layer1(x))))


def _shufflenet(m: Any, x: torch.Tensor) -> torch.Tensor:
    x = m.maxpool(m.conv1(x))
    return m.conv5(m.stage4(m.stage3(m.stage2(x))))


@dataclass(frozen=True)
class Family:
    prefixes: tuple[str, ...]
    features: FeatureFn
    classifier: Callable[[Any], nn.Module]
    classifier_key: str
    head: str = "linear"


FAMILIES: dict[str, Family] = {
    "resnet": Family(("resnet", "resnext", "wide_resnet"), _resnet, lambda m: m.fc, "fc.weight"),
    "densenet": Family(
        ("densenet",),
        lambda m, x: F.relu(m.features(x)),
        lambda m: m.classifier,
        "classifier.weight",
    ),
    "mobilenet_v2": Family(
        ("mobilenet_v2",),
        lambda m, x: m.features(x),
        lambda m: m.classifier[-1],
        "classifier.1.weight",
    ),
    "efficientnet": Family(
        ("efficientnet_b", "efficientnet_v2"),
        lambda m, x: m.features(x),
        lambda m: m.classifier[-1],
        "classifier.1.weight",
    ),
    "regnet": Family(
        ("regnet",), lambda m, x: m.trunk_output(m.stem(x)), lambda m: m.fc, "fc.weight"
    ),
    "mnasnet": Family(
        ("mnasnet",), lambda m, x: m.layers(x), lambda m: m.classifier[-1], "classifier.1.weight"
    ),
    "shufflenet": Family(("shufflenet_v2",), _shufflenet, lambda m: m.fc, "fc.weight"),
    "squeezenet": Family(
        ("squeezenet",),
        lambda m, x: m.features(x),
        lambda m: m.classifier[1],
        "classifier.1.weight",
        head="conv-relu",
    ),
}

REFUSED: dict[str, str] = {
    "vgg": "flattens its last feature maps into three dense layers (which hold most of its "
    "parameters) instead of averaging them, so no map explains its logits",
    "alexnet": "flattens its last feature maps into three dense layers instead of global "
    "average pooling, so no map explains its logits",
    "convnext": "applies a LayerNorm after the global pooling, which is not linear, so the "
    "logits are not a weighted sum of the feature maps",
    "mobilenet_v3": "puts a dense layer and a Hardswish between the pooling and the "
    "classifier, so the logits are not a weighted sum of the feature maps",
    "vit": "is a vision transformer: it has no convolutional feature maps and no GAP head",
    "swin": "is a transformer with a LayerNorm after the pooling, not a GAP + linear CNN",
    "maxvit": "is a hybrid transformer whose head adds a norm and a dense layer after pooling",
    "googlenet": "is not yet adapted by gapcam (its auxiliary heads and input transform need "
    "care); use a ResNet or EfficientNet",
    "inception": "is not yet adapted by gapcam (its auxiliary heads and input transform need "
    "care); use a ResNet or EfficientNet",
}


def family_of(name: str) -> Family | None:
    for family in FAMILIES.values():
        if name.startswith(family.prefixes):
            return family
    return None


def refusal_reason(name: str) -> str | None:
    for prefix, reason in REFUSED.items():
        if name.startswith(prefix):
            return reason
    return None


def supported_names() -> list[str]:
    """torchvision classification models gapcam has an adapter for."""
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    return sorted(n for n in names if family_of(n) is not None)


def weights_cached(name: str) -> bool:
    """Whether torchvision's pretrained weights for ``name`` are in the local torch hub cache."""
    import torchvision

    url = torchvision.models.get_model_weights(name).DEFAULT.url
    return (Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name).is_file()


def build(name: str, weights: str | Path | None = None) -> GapModel:
    """torchvision model ``name`` with ``weights``: None (pretrained), "random", or a file."""
    import torchvision

    family = family_of(name)
    if family is None:
        reason = refusal_reason(name)
        if reason:
            raise UnsupportedModelError(f"{name}: {reason}")
        raise ModelError(f"{name}: not a torchvision model gapcam knows; see `gapcam models`")
    enum = torchvision.models.get_model_weights(name).DEFAULT
    if weights is None:
        module = _download(name, torchvision)
        names, aliases = default_names(1000)
    else:
        state = None if weights == "random" else load_state_dict(weights)
        classes = 1000 if state is None else _num_classes(state, family, weights)
        module = torchvision.models.get_model(name, weights=None, num_classes=classes)
        if state is not None:
            load_into(module, state, f"--weights {weights}")
        names, aliases = default_names(classes)
    transforms = enum.transforms()
    preprocess = Preprocess(
        size=(transforms.crop_size[0], transforms.crop_size[0]),
        mean=tuple(transforms.mean),
        std=tuple(transforms.std),
        interpolation=transforms.interpolation.value,
    )
    return GapModel(
        name=name,
        module=module,
        feature_fn=family.features,
        classifier=family.classifier(module),
        class_names=names,
        aliases=aliases,
        preprocess=preprocess,
        head=family.head,
        source="torchvision",
    )


def _download(name: str, torchvision: Any) -> nn.Module:
    # torch.hub announces the download (on stdout in torch >= 2.x, which would corrupt
    # `--json -`) and draws a bar on stderr; hold both back so an offline failure is one line
    held = io.StringIO()
    try:
        with contextlib.redirect_stdout(held), contextlib.redirect_stderr(held):
            module = torchvision.models.get_model(name, weights="DEFAULT")
        sys.stderr.write(held.getvalue())
        return module
    except OSError as exc:  # urllib.error.URLError is an OSError
        reason = getattr(exc, "reason", exc)
        raise ModelError(
            f"{name}: cannot download its pretrained weights ({reason}); connect once to the "
            f"internet (they are cached under {torch.hub.get_dir()}), or pass --weights FILE, "
            "or use the embedded default model efficientnet_lite0"
        ) from exc


def _num_classes(state: dict[str, torch.Tensor], family: Family, weights: str | Path) -> int:
    tensor = state.get(family.classifier_key)
    if tensor is None:
        raise ModelError(
            f"--weights {weights}: no {family.classifier_key!r} entry; these weights are not "
            "for this architecture"
        )
    return int(tensor.shape[0])

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


def _children(m: nn.Module) -> dict[str, nn.Module]:
    return dict(m.named_children())


def _layer4(m: nn.Module) -> list[str] | None:
    return ["layer4."] if "layer4" in _children(m) else None


def _dense_block4(m: nn.Module) -> list[str] | None:
    features = _children(m).get("features")
    if isinstance(features, nn.Sequential) and "denseblock4" in _children(features):
        return ["features.denseblock4.", "features.norm5."]
    return None


def _features_last_two(m: nn.Module) -> list[str] | None:
    """The last block group and the final 1x1 convolution: the last two modules of
    ``features`` (MobileNetV2, EfficientNet)."""
    features = _children(m).get("features")
    if not isinstance(features, nn.Sequential) or "denseblock4" in _children(features):
        return None
    return [f"features.{name}." for name in list(_children(features))[-2:]]


def _mnasnet_stage(m: nn.Module) -> list[str] | None:
    """The last block stack (a Sequential) and what follows it: the 1x1 conv, norm, ReLU."""
    layers = _children(m).get("layers")
    if not isinstance(layers, nn.Sequential):
        return None
    named = list(layers.named_children())
    stacks = [i for i, (_, child) in enumerate(named) if isinstance(child, nn.Sequential)]
    last = stacks[-1] if stacks else max(len(named) - 3, 0)
    return [f"layers.{name}." for name, _ in named[last:]]


def _stage4_conv5(m: nn.Module) -> list[str] | None:
    return ["stage4.", "conv5."] if {"stage4", "conv5"} <= set(_children(m)) else None


def _last_trunk_block(m: nn.Module) -> list[str] | None:
    trunk = _children(m).get("trunk_output")
    return None if trunk is None else [f"trunk_output.{list(_children(trunk))[-1]}."]


@dataclass(frozen=True)
class Family:
    """A torchvision family: its name prefixes, where its features are, its classifier (and
    the classifier's state-dict key), its head, and ``last_stage``: the state-dict name
    prefixes of its backbone's last stage (what ``finetune='last-stage'`` trains), or None
    for a module without the family's layout."""

    prefixes: tuple[str, ...]
    features: FeatureFn
    classifier: Callable[[Any], nn.Module]
    classifier_key: str
    last_stage: Callable[[nn.Module], list[str] | None] | None
    head: str = "linear"


#: in the order ``last_stage`` tries them
FAMILIES: dict[str, Family] = {
    "resnet": Family(
        ("resnet", "resnext", "wide_resnet"), _resnet, lambda m: m.fc, "fc.weight", _layer4
    ),
    "densenet": Family(
        ("densenet",),
        lambda m, x: F.relu(m.features(x)),
        lambda m: m.classifier,
        "classifier.weight",
        _dense_block4,
    ),
    "mobilenet_v2": Family(
        ("mobilenet_v2",),
        lambda m, x: m.features(x),
        lambda m: m.classifier[-1],
        "classifier.1.weight",
        _features_last_two,
    ),
    "efficientnet": Family(
        ("efficientnet_b", "efficientnet_v2"),
        lambda m, x: m.features(x),
        lambda m: m.classifier[-1],
        "classifier.1.weight",
        _features_last_two,
    ),
    "mnasnet": Family(
        ("mnasnet",),
        lambda m, x: m.layers(x),
        lambda m: m.classifier[-1],
        "classifier.1.weight",
        _mnasnet_stage,
    ),
    "shufflenet": Family(
        ("shufflenet_v2",), _shufflenet, lambda m: m.fc, "fc.weight", _stage4_conv5
    ),
    "regnet": Family(
        ("regnet",),
        lambda m, x: m.trunk_output(m.stem(x)),
        lambda m: m.fc,
        "fc.weight",
        _last_trunk_block,
    ),
    "squeezenet": Family(  # its conv-relu head is not trained by `gapcam train`
        ("squeezenet",),
        lambda m, x: m.features(x),
        lambda m: m.classifier[1],
        "classifier.1.weight",
        None,
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


def last_stage(module: nn.Module) -> list[str] | None:
    """The last stage's prefixes (``Family.last_stage``) of the first family whose layout
    ``module`` has, or None."""
    for family in FAMILIES.values():
        found = family.last_stage(module) if family.last_stage is not None else None
        if found is not None:
            return found
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
            load_into(module, state, f"weights={str(weights)!r}")
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
            f"internet (they are cached under {torch.hub.get_dir()}), or pass weights=FILE, "
            "or use the embedded default model efficientnet_lite0"
        ) from exc


def _num_classes(state: dict[str, torch.Tensor], family: Family, weights: str | Path) -> int:
    tensor = state.get(family.classifier_key)
    if tensor is None:
        raise ModelError(
            f"weights={str(weights)!r}: no {family.classifier_key!r} entry; these weights are not "
            "for this architecture"
        )
    return int(tensor.shape[0])

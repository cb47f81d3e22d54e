"""Model adapters: the GapModel contract, the registry and the adapters behind it."""

from gapcam.models.base import GapModel, inference_state
from gapcam.models.custom import from_module
from gapcam.models.registry import DEFAULT_MODEL, build_model, model_or_checkpoint, specs

__all__ = [
    "DEFAULT_MODEL",
    "GapModel",
    "build_model",
    "from_module",
    "inference_state",
    "model_or_checkpoint",
    "specs",
]

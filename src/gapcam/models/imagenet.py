"""ImageNet-1k class names (short names, and the synonym lists used for lookups)."""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def imagenet_names() -> tuple[str, ...]:
    """The 1000 short class names in the standard sorted-WordNet-id order (torchvision's)."""
    from torchvision.models import ResNet50_Weights

    return tuple(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


@lru_cache(maxsize=1)
def imagenet_aliases() -> tuple[str, ...]:
    """Comma-separated synonyms per class (e.g. ``"tabby, tabby cat"``), from timm's tables."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return tuple(info.index_to_description(i) for i in range(1000))


def default_names(num_classes: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Names and aliases for a classifier with ``num_classes`` outputs."""
    if num_classes == 1000:
        return imagenet_names(), imagenet_aliases()
    return tuple(f"class_{i}" for i in range(num_classes)), ()

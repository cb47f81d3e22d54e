"""Where gapcam keeps caches (exported ONNX models, pooled training features)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$GAPCAM_CACHE_DIR``, else ``$XDG_CACHE_HOME/gapcam``, else ``~/.cache/gapcam``."""
    explicit = os.environ.get("GAPCAM_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gapcam"

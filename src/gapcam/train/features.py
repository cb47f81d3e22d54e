"""Pooled backbone features, computed once per image and kept in an on-disk cache.

Training the head of a frozen backbone only needs each image's globally average-pooled features
(a C-vector), so they are computed once and stored as ``.npy`` files (no pickles)::

    CACHE/features/<model key>/<d[:2]>/<d>.npy       d = sha256 of the image file's bytes

The model key is a sha256 of the backbone's name, every backbone tensor (names, shapes, dtypes
and values: the classifier is left out, so heads can change) and the preprocessing (input size,
mean, std, resize mode, interpolation). A changed file, other weights or other preprocessing
therefore never reuse a stale entry. ``CACHE`` is ``--cache-dir``, else ``$GAPCAM_CACHE_DIR``,
else ``$XDG_CACHE_HOME/gapcam``, else ``~/.cache/gapcam``; deleting it is always safe.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gapcam import images
from gapcam.console import progress_bar, safe_text
from gapcam.errors import GapcamError, OutputError
from gapcam.models.base import GapModel, inference_state, weights_digest
from gapcam.outputs import atomic_write, encode_npy

KIND = "gapcam.pooled-features/1"


def model_key(model: GapModel) -> str:
    """sha256 over the backbone tensors (classifier excluded) and the preprocessing."""
    preprocess = json.dumps(dataclasses.asdict(model.preprocess), sort_keys=True)
    return weights_digest(model, KIND, preprocess, head=False)


class FeatureCache:
    """``digest -> C-vector`` files under one model key; any unreadable entry is a miss."""

    def __init__(self, root: Path, key: str, width: int) -> None:
        self.folder = root / "features" / key[:32]
        self.width = width
        self.enabled = True
        self.notes: list[str] = []

    def _path(self, digest: str) -> Path:
        return self.folder / digest[:2] / f"{digest}.npy"

    def get(self, digest: str) -> np.ndarray | None:
        if not self.enabled:
            return None
        try:
            vector = np.load(self._path(digest), allow_pickle=False)
        except (OSError, ValueError):
            return None
        if vector.shape != (self.width,) or vector.dtype != np.float32:
            return None
        return vector

    def put(self, digest: str, vector: np.ndarray) -> None:
        """Write one entry (atomically; no fsync: a lost entry is only a miss). The first entry
        that cannot be written disables the cache, with a note."""
        if not self.enabled:
            return
        data = encode_npy(vector.astype(np.float32))
        try:
            atomic_write(self._path(digest), data, overwrite=True, sync=False)
        except OutputError as exc:
            cause = exc.__cause__
            reason = (cause.strerror or cause) if isinstance(cause, OSError) else exc
            self.enabled = False
            self.notes.append(f"feature cache {self.folder} disabled: {reason}")


@dataclass
class Extracted:
    """Pooled features of the readable images, their labels, and what failed."""

    features: torch.Tensor
    labels: torch.Tensor
    paths: list[Path] = field(default_factory=list)
    digests: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    hits: int = 0
    misses: int = 0


def pooled_features(
    model: GapModel,
    items: Sequence[tuple[Path, int]],
    cache: FeatureCache | None,
    *,
    batch_size: int = 32,
    label: str = "features",
    quiet: bool = False,
) -> Extracted:
    """GAP features (N x C float32, CPU) of ``items``; unreadable images are listed, not fatal."""
    vectors: dict[int, np.ndarray] = {}
    out = Extracted(torch.empty(0), torch.empty(0))
    pending: list[tuple[int, np.ndarray, str]] = []
    digests: dict[int, str] = {}
    bar = progress_bar(len(items), label, quiet=quiet)
    for index, (path, _) in enumerate(items):
        try:
            data = path.read_bytes()
        except OSError as exc:
            reason = f"{path}: cannot read the file ({exc.strerror or exc})"
            out.failed.append((str(path), safe_text(reason, limit=300)))
            bar.update(1)
            continue
        digests[index] = digest = hashlib.sha256(data).hexdigest()
        cached = cache.get(digest) if cache is not None else None
        if cached is not None:
            vectors[index] = cached
            out.hits += 1
            bar.update(1)
            continue
        try:
            loaded = images.load_image(path)  # read again on a miss: its own error messages
        except GapcamError as exc:
            out.failed.append((str(path), safe_text(exc, limit=300)))
            bar.update(1)
            continue
        pending.append((index, images.resize_for_model(loaded.image, model.preprocess), digest))
        if len(pending) >= batch_size:
            _run_batch(model, pending, vectors, cache, bar)
            out.misses += len(pending)
            pending = []
    if pending:
        _run_batch(model, pending, vectors, cache, bar)
        out.misses += len(pending)
    bar.close()
    _collect(out, items, vectors, digests, model.num_features)
    return out


def _collect(
    out: Extracted,
    items: Sequence[tuple[Path, int]],
    vectors: dict[int, np.ndarray],
    digests: dict[int, str],
    width: int,
) -> None:
    """Stack the vectors of the readable items, in the items' order."""
    kept = sorted(vectors)
    stacked = np.stack([vectors[i] for i in kept]) if kept else np.zeros((0, width), np.float32)
    out.features = torch.from_numpy(stacked)
    out.labels = torch.tensor([items[i][1] for i in kept], dtype=torch.long)
    out.paths = [items[i][0] for i in kept]
    out.digests = [digests[i] for i in kept]


def _run_batch(
    model: GapModel,
    pending: list[tuple[int, np.ndarray, str]],
    vectors: dict[int, np.ndarray],
    cache: FeatureCache | None,
    bar: Any,
) -> None:
    x = images.to_tensor([array for _, array, _ in pending], model.preprocess)
    x = x.to(device=model.device, dtype=model.weight.dtype)
    with inference_state(model.module):
        pooled = model.pooled(model.features(x)).float().cpu().numpy()
    for (index, _, digest), vector in zip(pending, pooled, strict=True):
        vectors[index] = np.ascontiguousarray(vector)
        if cache is not None:
            cache.put(digest, vectors[index])
    bar.update(len(pending))

"""Localize many image files and write their outputs: the pipeline behind ``gapcam localize``.

Reader threads decode, ``localizer.concurrency`` inference threads explain batches, writer
threads draw, encode and write (``gapcam.pipeline``'s module doc). Every queue is bounded, so
memory does not grow with the number of files. A bad file is reported through ``on_error``
and the rest go on; an error of the model stops the run.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gapcam import images
from gapcam._version import __version__
from gapcam.errors import GapcamError
from gapcam.localizer import Localizer
from gapcam.outputs import OutputGuard, encode_image, encode_npy
from gapcam.pipeline import batched, default_batch_size, default_workers, executor, ordered_map
from gapcam.pipeline import outcome as pipeline_outcome
from gapcam.result import Result
from gapcam.schema import LOCALIZE_FORMAT

#: (input file, its path relative to the argument it was found under)
Job = tuple[Path, Path]


@dataclass(frozen=True)
class Outputs:
    """What to write for each image, under ``folder``: its overlay (unless ``overlay`` is
    False) in ``fmt`` with ``alpha`` and ``cmap``, and with ``save_cam`` the raw maps at image
    size as ``.npy`` (k x H x W float32)."""

    folder: Path
    overlay: bool = True
    fmt: str = "png"
    alpha: float = 0.5
    cmap: str = "jet"
    save_cam: bool = False


def unique_targets(relatives: Sequence[Path]) -> list[Path]:
    """Output stems mirroring the inputs, made unique (``cat``, ``cat-2``, ...)."""
    seen: set[str] = set()
    targets = []
    for relative in relatives:
        base = relative.with_suffix("")
        candidate, n = base, 1
        while str(candidate).lower() in seen:
            n += 1
            candidate = base.with_name(f"{base.name}-{n}")
        seen.add(str(candidate).lower())
        targets.append(candidate)
    return targets


def write_outputs(
    result: Result, stem: Path, outputs: Outputs, guard: OutputGuard
) -> dict[str, Any]:
    """Write one result's files next to ``stem``; its JSON entry, with their paths."""
    document = result.to_dict()
    if outputs.overlay:
        figure = result.figure(alpha=outputs.alpha, cmap=outputs.cmap)
        target = stem.with_name(f"{stem.name}.cam.{outputs.fmt}")
        document["overlay"] = str(guard.write_bytes(target, encode_image(figure, outputs.fmt)))
    if outputs.save_cam:
        raw = np.stack([result.raw_cam(i) for i in range(len(result.maps))]).astype(np.float32)
        target = stem.with_name(f"{stem.name}.cam.npy")
        document["cam_npy"] = str(guard.write_bytes(target, encode_npy(raw)))
    return document


def run_head(
    localizer: Localizer,
    weights: str | None,
    classes: Sequence[int | str] | None,
    top_k: int,
) -> dict[str, Any]:
    """The ``--json`` document before its ``results`` and ``errors`` (``gapcam.schema``)."""
    settings = localizer.settings()
    backend, note = localizer.backend_used
    return {
        "schema": LOCALIZE_FORMAT,
        "gapcam_version": __version__,
        "settings": {
            "model": settings.model,
            "weights": weights,
            "threshold": settings.threshold,
            "normalize": settings.normalize,
            "min_area": settings.min_area,
            "resize": settings.resize,
            "input_size": list(settings.input_size),
            **settings.extras,  # hflip and scales, precision: only when not the default
            "classes": localizer.resolve_classes(classes) if classes else None,
            "top_k": None if classes else top_k,
            "backend": backend,
            **({"backend_note": note} if note else {}),
        },
    }


def localize_files(
    localizer: Localizer,
    jobs: Sequence[tuple[Job, Path]],
    outputs: Outputs,
    guard: OutputGuard,
    *,
    on_result: Callable[[Result, dict[str, Any]], None],
    on_error: Callable[[str, str], None],
    classes: Sequence[int | str] | None = None,
    top_k: int = 1,
    predictions: int = 5,
    max_pixels: int = images.DEFAULT_MAX_PIXELS,
    workers: int | None = None,
    batch_size: int | None = None,
) -> None:
    """Explain and write every ``(job, output stem)`` of ``jobs`` (stems relative to
    ``outputs.folder``). Each finished image goes to ``on_result(result, its JSON entry)``, in
    input order; each failed one to ``on_error(name, message)``. ``workers``: reader and writer
    threads each (default: ``default_workers()``; 0 runs everything on this thread)."""
    workers = default_workers() if workers is None else workers
    batch_size = batch_size or default_batch_size()

    def load(job: tuple[Job, Path]) -> images.LoadedImage:
        return images.load_image(job[0][0], max_pixels=max_pixels)

    def write(result: Result, target: Path) -> dict[str, Any]:
        return write_outputs(result, outputs.folder / target, outputs, guard)

    def explain(group: tuple[list[tuple[Any, images.LoadedImage]], Any]) -> list[Result]:
        loaded = [item for _, item in group[0]]
        return localizer.explain(loaded, classes=classes, top_k=top_k, predictions=predictions)

    def finish(result: Result, future: Future[dict[str, Any]]) -> None:
        document = pipeline_outcome(future)
        if isinstance(document, GapcamError):
            on_error(result.name, str(document))
        else:
            on_result(result, document)

    streams = localizer.concurrency if workers > 0 else 1
    with ExitStack() as stack:
        readers = executor(workers, stack, "read")
        writers = executor(workers, stack, "write")
        inference = executor(streams if streams > 1 else 0, stack, "infer")
        loads = ordered_map(load, jobs, readers, window=(1 + streams) * batch_size + workers)
        groups = ordered_map(explain, batched(loads, batch_size), inference, window=streams)
        pending: deque[tuple[Result, Future[dict[str, Any]]]] = deque()
        for (good, bad), results in groups:
            for ((path, _), _), error in bad:
                on_error(str(path), str(error))
            if isinstance(results, GapcamError):
                raise results  # a model error stops the run, as on the sequential path
            for (job, _), result in zip(good, results, strict=True):
                pending.append((result, writers.submit(write, result, job[1])))
            while len(pending) > batch_size + 2 * workers:
                finish(*pending.popleft())
        while pending:
            finish(*pending.popleft())

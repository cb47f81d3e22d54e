"""Localize many image files and write their outputs: the pipeline behind ``gapcam localize``.

Reader threads decode, ``localizer.concurrency`` inference threads explain batches, writer
threads draw, encode and write (``gapcam.pipeline``'s module doc). Every queue is bounded, so
memory does not grow with the number of files; and every image is charged what its header
says it will cost before it is decoded, against a memory budget, so memory does not grow with
what the files claim either. A bad file is reported through ``on_error`` and the rest go on;
an error of the model stops the run.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
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
from gapcam.overlay import display_scale
from gapcam.pipeline import (
    DEFAULT_MEMORY_BUDGET,
    MemoryBudget,
    default_batch_size,
    default_workers,
    executor,
    ordered_map,
    torch_threads,
)
from gapcam.pipeline import outcome as pipeline_outcome
from gapcam.result import Result, map_size
from gapcam.schema import LOCALIZE_FORMAT

#: (input file, its path relative to the argument it was found under)
Job = tuple[Path, Path]


@dataclass(frozen=True)
class Outputs:
    """What to write for each image, under ``folder``: its overlay (unless ``overlay`` is
    False) in ``fmt`` with ``alpha`` and ``cmap``, and with ``save_cam`` the raw maps at image
    size as ``.npy`` (k x H x W float32). ``fmt`` ``auto``: a JPEG photo's overlay is a JPEG
    (quality 92: a photo's heatmap needs no lossless copy, and JPEG encodes about 15x faster
    than PNG), any other input's a PNG."""

    def format_for(self, result: Result) -> str:
        """The overlay format of ``result``'s input."""
        if self.fmt != "auto":
            return self.fmt
        return "jpg" if result.source_format in ("JPEG", "MPO") else "png"

    folder: Path
    overlay: bool = True
    fmt: str = "auto"
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
        fmt = outputs.format_for(result)
        target = stem.with_name(f"{stem.name}.cam.{fmt}")
        document["overlay"] = str(guard.write_bytes(target, encode_image(figure, fmt)))
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


#: what each row and column of an image costs besides its pixels: Pillow's pointer to each row
#: (8 bytes, in each image it holds), and resizing to the model's input, whose coefficients
#: take about 16 bytes per row and column of the source (measured: a 1 x 50,000,000 PNG took
#: 587 MB decoded, 200 of them pixels, and 763 MB more to resize)
LINE_BYTES = 24


def image_cost(info: images.ImageInfo, maps: int, outputs: Outputs) -> int:
    """Bytes one image is charged against the memory budget, from its header alone: decoding
    it (``ImageInfo.decode_bytes``), its ``maps`` normalised maps at box resolution (4 bytes a
    pixel each, ``gapcam.result.map_size``), drawing its overlay (about 16 bytes a pixel of
    each panel: the photo and map resized to the figure, colours, blend, boxes, caption band)
    and with ``save_cam`` its raw maps at full size (12 bytes a pixel each: the maps, their
    stack, the encoded file); and ``LINE_BYTES`` a row and a column, which only an image of
    an extreme shape makes count."""
    rows, columns = map_size(info.width, info.height)
    cost = info.decode_bytes() + maps * rows * columns * 4
    cost += LINE_BYTES * (info.width + info.height)
    if outputs.overlay:
        scale = display_scale((info.width, info.height))
        panel = max(1, round(info.width * scale)) * max(1, round(info.height * scale))
        cost += maps * panel * 16
    if outputs.save_cam:
        cost += maps * info.pixels * 12
    return cost


#: one file to localize: (its job, its output stem relative to ``Outputs.folder``)
Item = tuple[Job, Path]


def localize_files(
    localizer: Localizer,
    jobs: Sequence[Item],
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
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> None:
    """Explain and write every ``(job, output stem)`` of ``jobs`` (stems relative to
    ``outputs.folder``). Each finished image goes to ``on_result(result, its JSON entry)``, in
    input order; each failed one to ``on_error(name, message)``. ``workers``: reader and writer
    threads each (default: ``default_workers()``; 0 runs everything on this thread).

    ``memory_budget``: bytes the images in flight may take at once. Each file's header is read
    first and the image charged ``image_cost`` before its pixels are decoded; it waits until
    the images ahead of it have been written and leave room (docs/speed.md, "Memory")."""
    workers = default_workers() if workers is None else workers
    batch_size = batch_size or default_batch_size()
    maps = len(classes) if classes else max(1, min(top_k, localizer.gap_model.num_classes))

    def look(item: Item) -> images.ImageInfo:
        return images.read_header(item[0][0], max_pixels=max_pixels)

    def load(item: Item) -> images.LoadedImage:
        return images.load_image(item[0][0], max_pixels=max_pixels)

    def explain(loaded: list[images.LoadedImage]) -> list[Result]:
        return localizer.explain(loaded, classes=classes, top_k=top_k, predictions=predictions)

    def write(result: Result, target: Path) -> dict[str, Any]:
        return write_outputs(result, outputs.folder / target, outputs, guard)

    streams = localizer.concurrency if workers > 0 else 1
    window = (1 + streams) * batch_size + workers
    budget = MemoryBudget(memory_budget)
    with ExitStack() as stack:
        if streams > 1:  # the streams are the parallelism (``pipeline.torch_threads``)
            stack.enter_context(torch_threads(1))
        readers = executor(workers, stack, "read")
        flow = _Flow(
            budget,
            batch_size,
            streams,
            inference=executor(streams if streams > 1 else 0, stack, "infer"),
            writers=executor(workers, stack, "write"),
            backlog=batch_size + 2 * workers,
            explain=explain,
            write=write,
            on_result=on_result,
            on_error=on_error,
        )
        for item, info in ordered_map(look, jobs, readers, window=window):
            if isinstance(info, GapcamError):
                flow.decoding.append((item, info, 0))
            else:
                cost = image_cost(info, maps, outputs)
                while not budget.fits(cost):
                    flow.free()
                budget.take(cost)
                flow.decoding.append((item, readers.submit(load, item), cost))
            while len(flow.decoding) >= window:
                flow.take()
        flow.drain()


class _Flow:
    """The images between the stages of one ``localize_files`` run, moved on by the thread
    that runs it: decoding (readers) -> a batch being filled -> explaining (``streams``
    inference threads) -> writing (writers) -> reported, in input order. Each image holds its
    cost against the budget until it is reported (a failed one gives it back at once)."""

    def __init__(
        self,
        budget: MemoryBudget,
        batch_size: int,
        streams: int,
        *,
        inference: Executor,
        writers: Executor,
        backlog: int,
        explain: Callable[[list[images.LoadedImage]], list[Result]],
        write: Callable[[Result, Path], dict[str, Any]],
        on_result: Callable[[Result, dict[str, Any]], None],
        on_error: Callable[[str, str], None],
    ) -> None:
        self.budget = budget
        self.batch_size, self.streams, self.backlog = batch_size, streams, backlog
        self.inference, self.writers = inference, writers
        self.explain, self.write = explain, write
        self.on_result, self.on_error = on_result, on_error
        self.decoding: deque[tuple[Item, Future[images.LoadedImage] | GapcamError, int]] = deque()
        self.good: list[tuple[Item, images.LoadedImage, int]] = []
        self.bad: list[tuple[Item, GapcamError]] = []
        self.explaining: deque[
            tuple[
                list[tuple[Item, images.LoadedImage, int]],
                list[tuple[Item, GapcamError]],
                Future[list[Result]],
            ]
        ] = deque()
        self.writing: deque[tuple[Result, Future[dict[str, Any]], int]] = deque()

    def take(self) -> None:
        """The oldest decoded image into the batch being filled (a full batch goes on)."""
        item, future, cost = self.decoding.popleft()
        loaded = future if isinstance(future, GapcamError) else pipeline_outcome(future)
        if isinstance(loaded, GapcamError):
            self.budget.release(cost)
            self.bad.append((item, loaded))
        else:
            self.good.append((item, loaded, cost))
        if len(self.good) >= self.batch_size:
            self.submit()

    def submit(self) -> None:
        """The batch being filled to the inference threads (its failures travel with it)."""
        group = [loaded for _, loaded, _ in self.good]
        future = self.inference.submit(self.explain, group)
        self.explaining.append((self.good, self.bad, future))
        self.good, self.bad = [], []
        # with streams, one batch more than them: a stream that finishes takes the next at
        # once, instead of idling until this thread has handed its results on
        while len(self.explaining) >= (self.streams + 1 if self.streams > 1 else 1):
            self.collect()

    def collect(self) -> None:
        """The oldest batch's failures reported and its results sent to the writers."""
        good, bad, future = self.explaining.popleft()
        for ((path, _), _), error in bad:
            self.on_error(str(path), str(error))
        results = pipeline_outcome(future)
        if isinstance(results, GapcamError):
            raise results  # a model error stops the run, as on the sequential path
        for ((_, target), _, cost), result in zip(good, results, strict=True):
            self.writing.append((result, self.writers.submit(self.write, result, target), cost))
        while len(self.writing) > self.backlog:
            self.finish()

    def finish(self) -> None:
        """The oldest written image reported, and its memory given back."""
        result, future, cost = self.writing.popleft()
        document = pipeline_outcome(future)
        if isinstance(document, GapcamError):
            self.on_error(result.name, str(document))
        else:
            self.on_result(result, document)
        self.budget.release(cost)

    def free(self) -> None:
        """The budget is short: move images on until one is reported and gives its memory
        back. Work that does not wait goes first (decoded images into a batch, a batch cut
        short to the inference threads), so the writers are kept busy; then the oldest
        image's writing, or whatever holds it, is waited for."""
        head = self.decoding[0][1] if self.decoding else None
        if head is not None and (isinstance(head, GapcamError) or head.done()):
            self.take()
        elif self.good or self.bad:
            self.submit()  # a batch cut short: the next image has to wait for its memory
        elif self.writing:
            self.finish()
        elif self.explaining:
            self.collect()
        else:
            self.take()

    def drain(self) -> None:
        while self.decoding:
            self.take()
        if self.good or self.bad:
            self.submit()
        while self.explaining:
            self.collect()
        while self.writing:
            self.finish()

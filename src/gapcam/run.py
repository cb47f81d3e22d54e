"""The ``gapcam localize`` job: expand inputs, explain them in batches, write outputs, report.

A bad input is reported (one line naming the file) and counted; the rest of the batch goes on.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from gapcam import images
from gapcam._version import __version__
from gapcam.errors import GapcamError
from gapcam.explain import Localizer, Result, view_options_from_args
from gapcam.export import JsonStream, OutputGuard, check_folder, encode_image, encode_npy
from gapcam.models import model_or_checkpoint
from gapcam.overlay import colormap_lut
from gapcam.pipeline import (
    batched,
    default_batch_size,
    default_workers,
    executor,
    ordered_map,
    tune_allocator,
)
from gapcam.pipeline import outcome as pipeline_outcome

PROGRESS_AFTER = 3

#: concurrent forward passes in the pipeline (module doc of gapcam.pipeline)
DEFAULT_STREAMS = 2


@dataclass
class Outcome:
    done: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    sink: JsonStream | None = None


def run_localize(args: argparse.Namespace) -> int:
    tune_allocator()
    # the output folder is skipped inside input folders: a second run never reads the first's
    found, problems = images.expand_inputs(args.inputs, exclude=[Path(args.out)])
    found = found[: args.limit] if getattr(args, "limit", None) else found
    human: TextIO = sys.stderr if args.json == "-" else sys.stdout
    localizer = localizer_from_args(args)
    if args.classes:
        localizer.resolve_classes(args.classes)  # a bad --class stops the run before any work
    if not args.no_overlay:
        try:
            colormap_lut(args.cmap)
        except ValueError as exc:
            raise GapcamError(str(exc)) from exc
    check_folder(Path(args.out))  # a file or a read-only folder stops the run before any work
    guard = OutputGuard((path for path, _ in found), overwrite=args.overwrite)
    sink: JsonStream | None = None
    progress: Any = None
    try:
        # results are streamed into --json as they finish; an existing FILE stops the run here
        sink = JsonStream(args.json, _run_head(localizer, args), guard) if args.json else None
        outcome = Outcome(failed=[(p.split(":", 1)[0], p) for p in problems], sink=sink)
        for message in problems:
            print(f"error: {message}", file=sys.stderr)
        targets = _unique_targets([relative for _, relative in found])
        progress = _progress(len(found), args.quiet)
        _stream(
            localizer, list(zip(found, targets, strict=True)), args, guard, outcome, human, progress
        )
        if sink is not None:
            sink.close([{"input": name, "error": message} for name, message in outcome.failed])
    finally:
        if sink is not None:
            sink.abort()  # an interrupted run leaves no partial JSON behind
        if progress is not None:
            progress.close()
    total = outcome.done + len(outcome.failed)
    print(
        f"gapcam: {outcome.done} of {total} inputs done, {len(outcome.failed)} failed",
        file=sys.stderr,
    )
    return 0 if not outcome.failed else 1


def localizer_from_args(args: argparse.Namespace) -> Localizer:
    return Localizer(
        model_or_checkpoint(args.model, args.weights, getattr(args, "checkpoint", None)),
        weights=args.weights,
        threshold=args.threshold,
        normalize=args.normalize,
        min_area=args.min_area,
        resize=args.resize,
        device=args.device,
        max_pixels=args.max_pixels,
        backend=getattr(args, "backend", None) or "eager",
        streams=_streams(args),
        precision=getattr(args, "precision", None) or "float32",
        **view_options_from_args(args),
    )


def _streams(args: argparse.Namespace) -> int:
    """Concurrent ``explain`` calls: ``--streams``, else 2 on a multi-core machine for the
    pipeline (1 with ``--workers 0``, the plain sequential loop)."""
    if getattr(args, "workers", None) == 0:
        return 1  # the sequential loop runs one stream, with all the cores
    streams = getattr(args, "streams", None)
    if streams:
        return int(streams)
    return 1 if (os.cpu_count() or 1) < 2 else DEFAULT_STREAMS


def _stream(
    localizer: Localizer,
    jobs: Sequence[tuple[tuple[Path, Path], Path]],
    args: argparse.Namespace,
    guard: OutputGuard,
    outcome: Outcome,
    human: TextIO,
    progress: Any,
) -> None:
    """Decode on reader threads, explain batches on ``localizer.concurrency`` inference threads
    (here when 1), write on writer threads (``gapcam.pipeline``'s module doc)."""
    workers = args.workers if args.workers is not None else default_workers()
    batch_size = args.batch_size or default_batch_size()

    def load(job: tuple[tuple[Path, Path], Path]) -> images.LoadedImage:
        return images.load_image(job[0][0], max_pixels=args.max_pixels)

    def write(result: Result, target: Path) -> dict[str, Any]:
        return _write_outputs(result, Path(args.out) / target, args, guard)

    def explain(group: tuple[list[tuple[Any, images.LoadedImage]], Any]) -> list[Result]:
        return localizer.explain(
            [item for _, item in group[0]],
            classes=args.classes,
            cam_top_k=args.top_k,
            top_k=max(5, args.top_k),
        )

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
                _fail(outcome, str(path), str(error))
            if isinstance(results, GapcamError):
                raise results  # a model error stops the run, as on the sequential path
            for (job, _), result in zip(good, results, strict=True):
                pending.append((result, writers.submit(write, result, job[1])))
            while len(pending) > batch_size + 2 * workers:
                _finish(*pending.popleft(), args, outcome, human, progress)
            if progress is not None and bad:
                progress.update(len(bad))
        while pending:
            _finish(*pending.popleft(), args, outcome, human, progress)


def _finish(
    result: Result,
    future: Future[dict[str, Any]],
    args: argparse.Namespace,
    outcome: Outcome,
    human: TextIO,
    progress: Any,
) -> None:
    document = pipeline_outcome(future)
    if progress is not None:
        progress.update(1)
    if isinstance(document, GapcamError):
        _fail(outcome, result.name, str(document))
        return
    outcome.done += 1
    if outcome.sink is not None:
        outcome.sink.add(document)
    if not args.quiet:
        _print_result(result, document, human)


def _fail(outcome: Outcome, name: str, message: str) -> None:
    outcome.failed.append((name, message))
    print(f"error: {message}", file=sys.stderr)


def _unique_targets(relatives: Sequence[Path]) -> list[Path]:
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


def _write_outputs(
    result: Result, stem: Path, args: argparse.Namespace, guard: OutputGuard
) -> dict[str, Any]:
    document = result.to_dict()
    if not args.no_overlay:
        figure = result.figure(alpha=args.alpha, cmap=args.cmap)
        target = stem.with_name(f"{stem.name}.cam.{args.format}")
        document["overlay"] = str(guard.write_bytes(target, encode_image(figure, args.format)))
    if args.save_cam:
        import numpy as np

        raw = np.stack([result.raw_cam(i) for i in range(len(result.maps))]).astype(np.float32)
        target = stem.with_name(f"{stem.name}.cam.npy")
        document["cam_npy"] = str(guard.write_bytes(target, encode_npy(raw)))
    return document


def _print_result(result: Result, document: dict[str, Any], out: TextIO) -> None:
    width, height = result.size
    lines = [f"{result.name}  ({width}x{height})"]
    lines += [f"  {p.probability:7.2%}  {p.name} [{p.index}]" for p in result.predictions[:5]]
    for class_map in result.maps:
        boxes = class_map.boxes
        if not boxes:
            lines.append(
                f"  no box for {class_map.prediction.name}: the map is flat or below the threshold"
            )
            continue
        first = boxes[0]
        share = first.area / (width * height)
        extra = f" (+{len(boxes) - 1} more)" if len(boxes) > 1 else ""
        lines.append(
            f"  box {class_map.prediction.name}: x0={first.x0} y0={first.y0} x1={first.x1} "
            f"y1={first.y1} ({share:.0%} of the image){extra}"
        )
    lines += [f"  note: {note}" for note in result.notes]
    for key in ("overlay", "cam_npy"):
        if key in document:
            lines.append(f"  {key.replace('_', ' ')}: {document[key]}")
    print("\n".join(lines), file=out)


def _progress(count: int, quiet: bool) -> Any:
    if quiet or count <= PROGRESS_AFTER:
        return None
    from tqdm import tqdm

    # disable=None: no bar unless stderr is a terminal (a bar in a log or pipe would glue
    # its carriage-return updates onto the one-line error messages)
    return tqdm(total=count, unit="img", file=sys.stderr, leave=False, disable=None)


def _run_head(localizer: Localizer, args: argparse.Namespace) -> dict[str, Any]:
    """The --json document before its ``results`` and ``errors`` (schema in docs/json.md)."""
    settings = localizer.settings()
    return {
        "schema": "gapcam.localize/1",
        "gapcam_version": __version__,
        "settings": {
            "model": settings.model,
            "weights": args.weights,
            "threshold": settings.threshold,
            "normalize": settings.normalize,
            "min_area": settings.min_area,
            "resize": settings.resize,
            "input_size": list(settings.input_size),
            **settings.extras,  # view options (hflip, scales) when not the plain single pass
            "classes": localizer.resolve_classes(args.classes) if args.classes else None,
            "top_k": None if args.classes else args.top_k,
            "backend": localizer.backend_used[0],
            **({"backend_note": note} if (note := localizer.backend_used[1]) else {}),
        },
    }

"""``gapcam localize``: expand the inputs, run ``gapcam.batch`` (or the Ray engine), report.

A bad input is reported (one line naming the file) and counted; the rest of the batch goes on.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from gapcam.cli import options
from gapcam.console import safe_text
from gapcam.errors import GapcamError
from gapcam.types import OVERLAY_FORMATS

if TYPE_CHECKING:
    from gapcam.batch import Outputs
    from gapcam.localizer import Localizer
    from gapcam.result import Result

#: progress bars only for runs of more inputs than this
PROGRESS_AFTER = 3

#: ``--memory-budget`` by default, as it is written (``gapcam.pipeline.DEFAULT_MEMORY_BUDGET``)
DEFAULT_BUDGET = "2G"
#: file names and paths are shown whole (control characters escaped) up to this length
PATH_LIMIT = 4096

_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(?:i?b)?\s*", re.IGNORECASE)
_UNITS = {"": 1 << 20, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}

EXAMPLES = """examples:
  gapcam localize examples/cat.png
  gapcam localize photos/ --out cams/ --json results.json
  gapcam localize 'shots/*.jpg' --top-k 3 --cmap inferno --alpha 0.4
  gapcam localize examples/cat.png --class "tabby cat" --class 285 --save-cam
  gapcam localize dog.jpg --model resnet50 --weights resnet50.safetensors --json -
  gapcam localize --engine ray list.txt --out results/ --limit 100     # Parquet, gapcam[ray]
"""


def add(commands: Any) -> None:
    p = commands.add_parser(
        "localize",
        help="predict classes, draw CAM overlays and boxes for images",
        description="Predict the top classes of each image, compute their class activation "
        "maps in the same forward pass, box the largest component above the threshold, and "
        "write an overlay per image.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLES,
    )
    p.add_argument(
        "inputs", nargs="+", metavar="PATH", help="image files, folders (recursive), globs"
    )
    options.add_model(p)
    p.add_argument("--out", default="gapcam-out", help="output folder (default: ./%(default)s)")
    p.add_argument("--json", metavar="FILE", help="write results as JSON to FILE, or - for stdout")
    p.add_argument(
        "--save-cam",
        action="store_true",
        help="also write the raw (not normalised) maps at image size as .npy (k x H x W float32)",
    )
    p.add_argument("--no-overlay", action="store_true", help="do not write overlay images")
    p.add_argument(
        "--top-k",
        type=options.positive,
        metavar="K",
        help="map the K best classes (default: 1; not with --class)",
    )
    p.add_argument(
        "--class",
        dest="classes",
        action="append",
        metavar="C",
        help="map this class (index or name) instead; repeatable",
    )
    options.add_box(p)
    options.add_views(p)
    p.add_argument("--alpha", type=options.fraction, help="heatmap opacity (default: 0.5)")
    p.add_argument("--cmap", help="any matplotlib colormap (default: jet)")
    p.add_argument(
        "--format",
        choices=OVERLAY_FORMATS,
        help="overlay format (default: auto, a JPEG for a JPEG photo, else a PNG)",
    )
    options.add_backend(p, "auto")
    p.add_argument(
        "--batch-size",
        type=options.positive,
        help="images per forward pass (default: 8, 16 on 16+ cores)",
    )
    p.add_argument(
        "--workers",
        type=options.count,
        help="decoding and writing threads each (default: the core count, 2..16; 0: sequential)",
    )
    p.add_argument(
        "--streams",
        type=options.positive,
        metavar="N",
        help="forward passes run at once with the onnx backend, each on its share of the cores "
        "(default: 2 on a multi-core machine; 1 with --workers 0)",
    )
    options.add_device(p)
    options.add_precision(p, "default: the first 32 inputs")
    p.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="ray: run on a Ray cluster (gapcam[ray]; $RAY_ADDRESS or a local one), write "
        "Parquet to --out",
    )
    p.add_argument("--limit", type=options.positive, metavar="N", help="only the first N images")
    p.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="with --engine ray: ray://HEAD:10001 from outside the cluster (the driver runs "
        "on the head node), auto or HEAD:6379 on a cluster node (default: $RAY_ADDRESS, else "
        "a local Ray)",
    )
    p.add_argument(
        "--max-pixels",
        type=options.positive,
        default=120_000_000,
        help="refuse images with more pixels (decompression-bomb guard)",
    )
    p.add_argument(
        "--memory-budget",
        type=memory_size,
        metavar="SIZE",
        help=f"memory the images in flight may take at once, e.g. 512M, 4G (default: "
        f"{DEFAULT_BUDGET}); a larger image waits for the ones before it, and runs alone",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace existing outputs (never inputs)"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="print only errors and the summary")
    p.set_defaults(handler=run)


def memory_size(text: str) -> int:
    """``--memory-budget``: bytes from ``512M``, ``1.5G``, ``4GB``, ``2GiB``, ``800`` (MB)."""
    match = _SIZE.fullmatch(text)
    size = round(float(match.group(1)) * _UNITS[match.group(2).lower()]) if match else 0
    if size < 1 << 20:
        raise argparse.ArgumentTypeError(
            f"{safe_text(text, 40)} is not a size of at least 1M; give e.g. 512M or 4G"
        )
    return size


def error_line(message: str, flags: Collection[str]) -> str:
    """One failure as the one line it is printed on: flags as typed, escaped, bounded."""
    from gapcam.cli import LINE_LIMIT

    prefix = "error: "
    return prefix + options.error_text(message, flags, LINE_LIMIT - len(prefix))


#: what the overlay flags mean when they are not given
OVERLAY_DEFAULTS = {"alpha": 0.5, "cmap": "jet", "format": "auto"}


def check_flags(args: argparse.Namespace) -> None:
    """Refuse, in one line and before any work, what would otherwise be ignored; then fill in
    the defaults of the flags that may only be given in some combinations."""
    refused = []
    if args.ray_address and args.engine != "ray":
        refused.append("--ray-address: only with --engine ray")
    if args.top_k is not None and args.classes:
        refused.append("--top-k: not with --class (the classes given are the ones mapped)")
    given = [f"--{name}" for name in OVERLAY_DEFAULTS if getattr(args, name) is not None]
    if args.no_overlay and given:
        refused.append(f"{', '.join(given)}: not with --no-overlay (they draw the overlay)")
    if args.streams and args.workers == 0:
        refused.append(f"--streams {args.streams}: --workers 0 runs one stream")
    if args.streams and (args.backend == "eager" or args.precision != "float32"):
        refused.append(
            f"--streams {args.streams}: only the onnx backend runs streams (drop --streams, "
            "or use --backend onnx in float32)"
        )
    if args.engine == "ray":
        for name, flag in (
            ("json", "--json"),
            ("save_cam", "--save-cam"),
            ("memory_budget", "--memory-budget"),
            ("streams", "--streams"),
        ):
            if getattr(args, name):
                refused.append(f"{flag}: not with --engine ray (it writes Parquet rows to --out)")
    if refused:
        raise GapcamError(refused[0])
    args.top_k = args.top_k or 1
    for name, default in OVERLAY_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.memory_budget is None:
        args.memory_budget = memory_size(DEFAULT_BUDGET)


def run(args: argparse.Namespace) -> int:
    check_flags(args)
    if "torch" not in sys.modules:  # idle OpenMP threads sleep: the writers need cores
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from gapcam.pipeline import tune_allocator

    tune_allocator()
    if args.engine == "ray":
        return _run_ray(args)
    return _run_local(args)


def _run_local(args: argparse.Namespace) -> int:
    from gapcam import batch, images
    from gapcam.console import progress_bar
    from gapcam.outputs import JsonStream, OutputGuard, check_folder
    from gapcam.overlay import colormap_lut

    # the output folder is skipped inside input folders: a second run never reads the first's
    found, problems = images.expand_inputs(args.inputs, exclude=[Path(args.out)])
    found = found[: args.limit] if args.limit else found
    human: TextIO = sys.stderr if args.json == "-" else sys.stdout
    localizer = _localizer(args, [path for path, _ in found])
    if args.classes:
        localizer.resolve_classes(args.classes)  # a bad --class stops the run before any work
    if not args.no_overlay:
        try:
            colormap_lut(args.cmap)
        except ValueError as exc:
            raise GapcamError(str(exc)) from exc
    check_folder(Path(args.out))  # a file or a read-only folder stops the run before any work
    guard = OutputGuard((path for path, _ in found), overwrite=args.overwrite)
    outputs = _outputs(args)
    sink: JsonStream | None = None
    progress: Any = None
    done = 0
    failed = [(problem.path, str(problem)) for problem in problems]
    # a warning while a file is decoded becomes a note of that file (gapcam.images), each time
    warnings.filterwarnings("always", module=r"PIL(\.|$)")
    try:
        # results are streamed into --json as they finish; an existing FILE stops the run here
        head = batch.run_head(localizer, args.weights, args.classes, args.top_k)
        sink = JsonStream(args.json, head, guard) if args.json else None
        for message in problems:
            print(error_line(message, args.flags), file=sys.stderr)
        progress = progress_bar(len(found), quiet=args.quiet, after=PROGRESS_AFTER)

        def on_result(result: Result, document: dict[str, Any]) -> None:
            nonlocal done
            progress.update(1)
            done += 1
            if sink is not None:
                sink.add(document)
            if not args.quiet:
                print_result(result, document, human)

        def on_error(name: str, message: str) -> None:
            progress.update(1)
            failed.append((name, options.flag_message(message, args.flags)))
            print(error_line(message, args.flags), file=sys.stderr)

        targets = batch.unique_targets([relative for _, relative in found])
        batch.localize_files(
            localizer,
            list(zip(found, targets, strict=True)),
            outputs,
            guard,
            on_result=on_result,
            on_error=on_error,
            classes=args.classes,
            top_k=args.top_k,
            predictions=max(5, args.top_k),
            max_pixels=args.max_pixels,
            workers=args.workers,
            batch_size=args.batch_size,
            memory_budget=args.memory_budget,
        )
        if sink is not None:
            sink.close([{"input": name, "error": message} for name, message in failed])
    finally:
        if sink is not None:
            sink.abort()  # an interrupted run leaves no partial JSON behind
        if progress is not None:
            progress.close()
    total = done + len(failed)
    print(f"gapcam: {done} of {total} inputs done, {len(failed)} failed", file=sys.stderr)
    return 0 if not failed else 1


def _outputs(args: argparse.Namespace) -> Outputs:
    from gapcam.batch import Outputs

    return Outputs(
        Path(args.out),
        overlay=not args.no_overlay,
        fmt=args.format,
        alpha=args.alpha,
        cmap=args.cmap,
        save_cam=args.save_cam,
    )


def _localizer(args: argparse.Namespace, inputs: list[Path]) -> Localizer:
    from gapcam.localizer import Localizer
    from gapcam.quantize import CALIBRATION_IMAGES

    settings = options.localizer_options(args)
    if args.precision == "int8" and "calibration" not in settings and inputs:
        # static quantization calibrates on the run's own first images (docs/speed.md)
        settings["calibration"] = [str(path) for path in inputs[:CALIBRATION_IMAGES]]
    localizer = Localizer.from_options(settings)
    backend = localizer.backend_used[0]
    if args.streams and backend != "onnx":
        raise GapcamError(
            f"--streams {args.streams}: only the onnx backend runs streams; this run uses "
            f"{backend} (drop --streams, or use --backend onnx)"
        )
    return localizer


def _run_ray(args: argparse.Namespace) -> int:
    from gapcam import ray_engine
    from gapcam.localizer import Localizer

    settings = options.localizer_options(args)
    settings["streams"] = 1  # each Ray actor runs one
    if args.precision == "int8" and "calibration" not in settings:
        raise GapcamError(
            "--precision int8 with --engine ray: give --calibration IMAGES (files every node "
            "can read), the images each actor calibrates on"
        )
    Localizer.check_options(settings)  # the actors would fail alike, after Ray has started
    run = ray_engine.run(
        args.inputs,
        settings,
        _outputs(args),
        classes=args.classes,
        top_k=args.top_k,
        limit=args.limit,
        overwrite=args.overwrite,
        address=args.ray_address,
        actors=args.workers,
        batch_size=args.batch_size,
        quiet=args.quiet,
        on_error=lambda message: print(error_line(message, args.flags), file=sys.stderr),
    )
    done, failed = run.done, run.failed
    lines = [
        f"{done} of {done + failed} inputs done, {failed} failed; Parquet in {run.out / 'parquet'}"
    ]
    lines += [f"  node {node}: {count} rows" for node, count in run.nodes.items()]
    lines += [f"note: {note}" for note in run.notes]
    print("gapcam: " + "\n".join(lines), file=sys.stderr)
    return 0 if not failed else 1


def print_result(result: Result, document: dict[str, Any], out: TextIO) -> None:
    """What one image got, a few lines; every name in them shown escaped (``safe_text``)."""
    width, height = result.size
    lines = [f"{safe_text(result.name, PATH_LIMIT)}  ({width}x{height})"]
    lines += [
        f"  {p.probability:7.2%}  {safe_text(p.name)} [{p.index}]" for p in result.predictions[:5]
    ]
    for class_map in result.maps:
        boxes = class_map.boxes
        name = safe_text(class_map.prediction.name)
        if not boxes:
            lines.append(f"  no box for {name}: the map is flat or below the threshold")
            continue
        first = boxes[0]
        share = first.area / (width * height)
        extra = f" (+{len(boxes) - 1} more)" if len(boxes) > 1 else ""
        lines.append(
            f"  box {name}: x0={first.x0} y0={first.y0} x1={first.x1} "
            f"y1={first.y1} ({share:.0%} of the image){extra}"
        )
    lines += [f"  note: {safe_text(note)}" for note in result.notes]
    for key in ("overlay", "cam_npy"):
        if key in document:
            lines.append(f"  {key.replace('_', ' ')}: {safe_text(document[key], PATH_LIMIT)}")
    print("\n".join(lines), file=out)

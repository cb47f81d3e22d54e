"""``gapcam localize``: expand the inputs, run ``gapcam.batch`` (or the Ray engine), report.

A bad input is reported (one line naming the file) and counted; the rest of the batch goes on.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import sys
import warnings
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from gapcam.cli import options
from gapcam.console import safe_text
from gapcam.errors import GapcamError
from gapcam.types import OVERLAY_FORMATS, VIDEO_SUFFIXES

if TYPE_CHECKING:
    from gapcam.batch import Outputs
    from gapcam.localizer import Localizer
    from gapcam.outputs import JsonStream, OutputGuard
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
        "--fps",
        type=options.positive_float,
        metavar="F",
        help="videos: analyse at most F frames a second (default: every frame); the others "
        "carry the latest map",
    )
    p.add_argument(
        "--smooth",
        type=options.seconds,
        metavar="SECONDS",
        help="videos: half-life of the moving average of maps and scores over time "
        "(default: 0.08; 0: none)",
    )
    p.add_argument(
        "--sampled-only",
        action="store_true",
        help="videos: write only the analysed frames (with --fps), not every source frame",
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
    if args.sampled_only and args.fps is None:
        refused.append("--sampled-only: only with --fps (without it every frame is analysed)")
    if args.sampled_only and args.no_overlay:
        refused.append("--sampled-only: not with --no-overlay (it chooses the frames written)")
    if args.engine == "ray":
        for name, flag in (
            ("json", "--json"),
            ("save_cam", "--save-cam"),
            ("memory_budget", "--memory-budget"),
            ("streams", "--streams"),
        ):
            if getattr(args, name):
                refused.append(f"{flag}: not with --engine ray (it writes Parquet rows to --out)")
        for flag in video_flags(args):
            refused.append(f"{flag}: not with --engine ray (videos run on the local engine)")
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
    check_out_folder(args)
    suffixes = images.IMAGE_SUFFIXES | VIDEO_SUFFIXES
    found, problems = images.expand_inputs(args.inputs, exclude=[Path(args.out)], suffixes=suffixes)
    found = found[: args.limit] if args.limit else found
    check_video_flags(args, found)
    human: TextIO = sys.stderr if args.json == "-" else sys.stdout
    localizer = _localizer(args, [path for path, _ in found if not is_video(path)])
    if args.classes:
        localizer.resolve_classes(args.classes)  # a bad --class stops the run before any work
    classes = localizer.gap_model.num_classes
    if args.top_k > classes:
        raise GapcamError(
            f"--top-k {args.top_k}: {safe_text(localizer.gap_model.name)} has {classes} "
            f"classes; give at most {classes}"
        )
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
        pictures = sum(1 for path, _ in found if not is_video(path))
        progress = progress_bar(pictures, quiet=args.quiet, after=PROGRESS_AFTER)

        def on_result(result: Result, document: dict[str, Any]) -> None:
            nonlocal done
            progress.update(1)
            done += 1
            if sink is not None:
                sink.add(document)
            if not args.quiet:
                print_result(result, document, human)

        def on_video_error(name: str, message: str) -> None:
            failed.append((name, options.flag_message(message, args.flags)))
            print(error_line(message, args.flags), file=sys.stderr)

        def on_error(name: str, message: str) -> None:  # an image: counted by the bar too
            progress.update(1)
            on_video_error(name, message)

        targets = batch.unique_targets([relative for _, relative in found])
        # consecutive images go through the image pipeline together, each video on its own,
        # so that the results keep the input order
        items = zip(found, targets, strict=True)
        for videos, group in itertools.groupby(items, key=lambda item: is_video(item[0][0])):
            if videos:
                for (path, _), target in group:
                    if _run_video(
                        args, localizer, path, target, guard, sink, on_video_error, human
                    ):
                        done += 1
                continue
            batch.localize_files(
                localizer,
                list(group),
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


def check_out_folder(args: argparse.Namespace) -> None:
    """Refuse ``--out`` that is a folder given as input (with overlays: the next run would read
    them as images); say so when it lies inside one (its files are not inputs)."""
    out = Path(os.path.realpath(args.out))
    for argument in args.inputs:
        if not os.path.isdir(argument):
            continue
        folder = Path(os.path.realpath(argument))
        if out == folder and not args.no_overlay:
            raise GapcamError(
                f"--out {safe_text(args.out)}: is the input folder {safe_text(argument)}; the "
                "next run would read its overlays as images: give another folder (one inside "
                "it is skipped as input)"
            )
        if out != folder and out.is_relative_to(folder) and out.is_dir() and not args.quiet:
            print(
                f"gapcam: note: {safe_text(args.out)} is the output folder (--out): its files "
                f"are not read as inputs of {safe_text(argument)}",
                file=sys.stderr,
            )


def is_video(path: Path) -> bool:
    """Whether ``gapcam localize`` reads ``path`` as a video (by its suffix)."""
    return path.suffix.lower() in VIDEO_SUFFIXES


def video_flags(args: argparse.Namespace) -> list[str]:
    """The video flags given (``--fps``, ``--smooth``, ``--sampled-only``), as typed."""
    values = (("--fps", args.fps), ("--smooth", args.smooth), ("--sampled-only", args.sampled_only))
    return [flag for flag, value in values if value is not None and value is not False]


def check_video_flags(args: argparse.Namespace, found: list[tuple[Path, Path]]) -> None:
    """The video flags are refused, in one line, when no input is a video."""
    given = video_flags(args)
    if given and not any(is_video(path) for path, _ in found):
        raise GapcamError(
            f"{', '.join(given)}: for videos, and no input is one "
            f"({', '.join(sorted(VIDEO_SUFFIXES))})"
        )


def _run_video(
    args: argparse.Namespace,
    localizer: Localizer,
    path: Path,
    stem: Path,
    guard: OutputGuard,
    sink: JsonStream | None,
    on_error: Callable[[str, str], None],
    human: TextIO,
) -> bool:
    """One video of the batch: its overlay video, its --json entry; False when it failed
    (``on_error`` was told)."""
    import tempfile

    from gapcam.console import progress_bar
    from gapcam.pipeline import default_workers

    target = None if args.no_overlay else Path(args.out) / stem.with_name(f"{stem.name}.cam.mp4")
    bars: dict[str, Any] = {}

    def on_frames(stage: str, count: int, total: int) -> None:
        if stage not in bars:  # a bar per pass: "scan" (choosing the class), "write"
            for bar in bars.values():
                bar.close()
            bars[stage] = progress_bar(
                total or None,
                f"{stage} {safe_text(path.name, 40)}",
                quiet=args.quiet,
                unit="frame",
            )
        bars[stage].update(count)

    try:
        from gapcam import video

        with tempfile.TemporaryFile(prefix="gapcam-frames-") as spill:
            _, document = video.localize_video(
                localizer,
                path,
                target,
                guard,
                spill,
                alpha=args.alpha,
                cmap=args.cmap,
                workers=args.workers if args.workers is not None else default_workers(),
                classes=args.classes,
                top_k=args.top_k,
                fps=args.fps,
                smooth=video.DEFAULT_SMOOTH if args.smooth is None else args.smooth,
                sampled_only=args.sampled_only,
                predictions=max(5, args.top_k),
                batch_size=args.batch_size or 8,
                memory_budget=args.memory_budget,
                on_frames=on_frames,
            )
            if args.save_cam:
                document["notes"].append("--save-cam: maps are not saved for videos")
            if sink is not None:
                sink.add(document, items=video.spilled_entries(spill))
    except GapcamError as exc:
        on_error(str(path), str(exc))
        return False
    finally:
        for bar in bars.values():
            bar.close()
    if not args.quiet:
        print_video(document, human)
    return True


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

    settings = options.localizer_options(args)
    if args.precision == "int8" and "calibration" not in settings and inputs:
        # static quantization calibrates on the run's own first images (docs/speed.md)
        first = (str(path) for path in inputs)  # read as far as needed, not all listed
        settings["calibration"] = options.own_calibration(first, args.max_pixels)
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
    refuse_videos(args.inputs)
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


def refuse_videos(arguments: list[str]) -> None:
    """``--engine ray`` runs images only: a video among the inputs (given, or inside a folder
    or glob) stops the run, in one line, before Ray starts (README "Video")."""
    from gapcam.images import IMAGE_SUFFIXES, expand_inputs

    found, _ = expand_inputs(arguments, suffixes=IMAGE_SUFFIXES | VIDEO_SUFFIXES)
    videos = [path for path, _ in found if is_video(path)]
    if videos:
        more = f" (and {len(videos) - 1} more)" if len(videos) > 1 else ""
        raise GapcamError(
            f"{videos[0]}{more}: a video; --engine ray runs images only, "
            "run videos with the local engine (leave out --engine ray)"
        )


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


def print_video(document: dict[str, Any], out: TextIO) -> None:
    """What one video got, a few lines; names escaped (``safe_text``)."""
    lines = [
        f"{safe_text(document['input'], PATH_LIMIT)}  ({document['width']}x{document['height']}, "
        f"{document['frame_count']} frames, {document['analysed']} analysed)"
    ]
    lines += [
        f"  {c['mean_probability']:7.2%}  {safe_text(c['name'])} [{c['index']}] "
        "(mean over the clip)"
        for c in document["classes"]
    ]
    lines += [f"  note: {safe_text(note)}" for note in document["notes"]]
    if "overlay" in document:
        lines.append(f"  overlay: {safe_text(document['overlay'], PATH_LIMIT)}")
    print("\n".join(lines), file=out)

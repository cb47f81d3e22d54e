"""``gapcam localize --engine ray SOURCE --out OUT``: the localize pipeline on Ray Data.

SOURCE: image files, folders, globs, or manifest files (``.txt``/``.lst``: one path or URI per
line, relative paths resolved against the manifest's folder; URIs are read with pyarrow's
filesystems, e.g. ``s3://bucket/a.jpg``). The paths become a Ray dataset; ``map_batches``
runs them through ``LocalizeActor`` (one model per actor, built once) and the rows are written
as Parquet to OUT (written to a temporary folder next to it, renamed when complete).

One row per input, failures included (``error`` set, the other columns empty): path, error,
width, height, top-k ``classes``/``names``/``scores``, ``map_classes``, ``boxes`` (per map, xyxy
in original pixels, largest first), ``cam`` (the raw low-res maps, float16 bytes of shape
``cam_shape`` = k x h x w) and ``overlay`` (path of the overlay image, unless --no-overlay).

The model is ``--model``/``--weights`` or ``--checkpoint RUN`` (a run folder made by ``gapcam
train``), as with the local engine: the actors get the run folder's path in their options and
each loads it with ``load_checkpoint`` (safetensors and JSON: nothing is unpickled).

Connect to a cluster with ``--ray-address ray://HEAD:10001`` (or ``$RAY_ADDRESS``); without one
a local Ray instance is started. OUT, the image paths and the --checkpoint folder must then be
reachable from every node (a shared filesystem, or URIs for the images).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from gapcam import images
from gapcam.errors import GapcamError, OutputError
from gapcam.explain import Localizer, Result, view_options_from_args
from gapcam.export import atomic_write, encode_image
from gapcam.models import model_or_checkpoint

MANIFEST_SUFFIXES = (".txt", ".lst")


def list_sources(
    arguments: list[str], exclude: list[Path] | None = None
) -> tuple[list[str], list[str]]:
    """(paths or URIs in a stable order, problems): files, folders, globs and manifests."""
    paths: list[str] = []
    plain: list[str] = []
    for argument in arguments:
        if "://" in argument:
            paths.append(argument)
        elif argument.lower().endswith(MANIFEST_SUFFIXES) and Path(argument).is_file():
            paths += _read_manifest(Path(argument))
        else:
            plain.append(argument)
    found, problems = images.expand_inputs(plain, exclude or []) if plain else ([], [])
    return paths + [str(path) for path, _ in found], problems


def _read_manifest(manifest: Path) -> list[str]:
    lines = manifest.read_text(encoding="utf-8").splitlines()
    entries = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    return [e if "://" in e or Path(e).is_absolute() else str(manifest.parent / e) for e in entries]


def _read(path: str, max_pixels: int) -> images.LoadedImage:
    if "://" not in path:
        return images.load_image(path, max_pixels=max_pixels)
    import pyarrow.fs

    try:
        filesystem, inner = pyarrow.fs.FileSystem.from_uri(path)
        with filesystem.open_input_stream(inner) as stream:
            data = stream.read()
    except (OSError, ValueError) as exc:
        raise GapcamError(f"{path}: cannot read ({exc})") from exc
    return images.load_image(data, name=path, max_pixels=max_pixels)


def schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            ("path", pa.string()),
            ("error", pa.string()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("classes", pa.list_(pa.int32())),
            ("names", pa.list_(pa.string())),
            ("scores", pa.list_(pa.float32())),
            ("map_classes", pa.list_(pa.int32())),
            ("boxes", pa.list_(pa.list_(pa.list_(pa.int32(), 4)))),
            ("cam", pa.binary()),
            ("cam_shape", pa.list_(pa.int32())),
            ("overlay", pa.string()),
        ]
    )


def result_row(result: Result, path: str, overlay: str | None = None) -> dict[str, Any]:
    import numpy as np

    low = np.stack([m.low_res for m in result.maps]).astype(np.float16)
    return {
        "path": path,
        "error": None,
        "width": result.size[0],
        "height": result.size[1],
        "classes": [p.index for p in result.predictions],
        "names": [p.name for p in result.predictions],
        "scores": [p.probability for p in result.predictions],
        "map_classes": [m.prediction.index for m in result.maps],
        "boxes": [[b.as_list() for b in m.boxes] for m in result.maps],
        "cam": low.tobytes(),
        "cam_shape": list(low.shape),
        "overlay": overlay,
    }


def error_row(path: str, message: str) -> dict[str, Any]:
    empty = dict.fromkeys(schema().names)
    return {**empty, "path": path, "error": message}


class LocalizeActor:
    """One Localizer per Ray actor; ``__call__`` maps a batch of paths to result rows."""

    def __init__(self, options: dict[str, Any], threads: int = 1) -> None:
        import torch

        torch.set_num_threads(max(1, threads))
        self.options = options
        settings = dict(options["localizer"])
        model = model_or_checkpoint(
            settings.pop("model"), settings["weights"], options.get("checkpoint")
        )
        self.localizer = Localizer(model, **settings)

    def __call__(self, batch: dict[str, Any]) -> Any:
        import pyarrow as pa

        rows: list[dict[str, Any] | None] = []
        loaded: list[tuple[int, images.LoadedImage]] = []
        for path in [str(p) for p in batch["path"]]:
            try:
                loaded.append((len(rows), _read(path, self.options["max_pixels"])))
                rows.append(None)
            except GapcamError as exc:
                rows.append(error_row(path, str(exc)))
        results = self.localizer.explain(
            [item for _, item in loaded],
            classes=self.options["classes"],
            cam_top_k=self.options["top_k"],
            top_k=max(5, self.options["top_k"]),
        )
        for (index, _), result in zip(loaded, results, strict=True):
            path = str(batch["path"][index])
            try:
                rows[index] = result_row(result, path, self._overlay(result, path))
            except GapcamError as exc:
                rows[index] = error_row(path, str(exc))
        return pa.Table.from_pylist(rows, schema=schema())

    def _overlay(self, result: Result, path: str) -> str | None:
        folder = self.options["overlays"]
        if folder is None:
            return None
        digest = hashlib.sha1(path.encode()).hexdigest()[:10]
        fmt = self.options["format"]
        target = Path(folder) / f"{Path(path).stem}-{digest}.cam.{fmt}"
        figure = result.figure(alpha=self.options["alpha"], cmap=self.options["cmap"])
        atomic_write(target, encode_image(figure, fmt), overwrite=True)
        return str(Path(self.options["final_out"]) / "overlays" / target.name)


def actor_options(args: argparse.Namespace, staging: Path) -> dict[str, Any]:
    """The plain (picklable) settings every actor builds its Localizer from."""
    return {
        "checkpoint": _checkpoint(args),
        "localizer": {
            "model": args.model,
            "weights": args.weights,
            "threshold": args.threshold,
            "normalize": args.normalize,
            "min_area": args.min_area,
            "resize": args.resize,
            "device": args.device,
            "max_pixels": args.max_pixels,
            "backend": args.backend or "auto",
            "precision": getattr(args, "precision", None) or "float32",
            **view_options_from_args(args),
        },
        "max_pixels": args.max_pixels,
        "classes": args.classes,
        "top_k": args.top_k,
        "overlays": None if args.no_overlay else str(staging / "overlays"),
        "final_out": str(args.out),
        "format": args.format,
        "alpha": args.alpha,
        "cmap": args.cmap,
    }


def _checkpoint(args: argparse.Namespace) -> str | None:
    """``--checkpoint RUN`` as an absolute path for the actors (None without one), checked here
    first so that a bad run folder fails before Ray starts, with the local engine's messages."""
    checkpoint = getattr(args, "checkpoint", None)
    if not checkpoint:
        return None
    if args.model or args.weights:
        model_or_checkpoint(args.model, args.weights, checkpoint)  # refuses the mix
    from gapcam.models.checkpoint import read_metadata

    read_metadata(Path(checkpoint))
    return str(Path(checkpoint).resolve())


def run_ray(args: argparse.Namespace) -> int:
    """The Ray job: list, map with actors, write Parquet; returns the exit code."""
    try:
        import ray
    except ImportError as exc:
        raise GapcamError("--engine ray needs Ray Data: pip install 'gapcam[ray]'") from exc
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise OutputError(f"{out}: already exists; pass --overwrite or choose another --out")
    _checkpoint(args)  # a bad --checkpoint fails here, before Ray starts
    paths, problems = list_sources(args.inputs)
    paths = paths[: args.limit] if args.limit else paths
    for message in problems:
        print(f"error: {message}", file=sys.stderr)
    if not paths:
        raise GapcamError("no images to process: check the SOURCE arguments")
    if not ray.is_initialized():
        level = logging.WARNING if args.quiet else logging.INFO
        ray.init(address=args.ray_address, log_to_driver=False, logging_level=level)
    ray.data.DataContext.get_current().enable_progress_bars = not args.quiet
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        rows = localize_dataset(paths, actor_options(args, staging), args)
        rows.write_parquet(str(staging / "parquet"))
        errors = _count_errors(staging / "parquet")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    failed = errors + len(problems)
    print(
        f"gapcam: {len(paths) - errors} of {len(paths) + len(problems)} inputs done, "
        f"{failed} failed; Parquet in {out / 'parquet'}",
        file=sys.stderr,
    )
    return 0 if not failed else 1


def localize_dataset(paths: list[str], options: dict[str, Any], args: argparse.Namespace) -> Any:
    """The lazy Ray dataset of result rows (one per path, in order)."""
    import ray

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    cpus = int(ray.cluster_resources().get("CPU", 1))
    per_actor = 1 if cpus <= 4 else 4
    actors = args.workers or max(1, (cpus - 1) // per_actor)
    dataset = ray.data.from_items([{"path": p} for p in paths])
    return dataset.map_batches(
        LocalizeActor,
        fn_constructor_kwargs={"options": options, "threads": per_actor},
        batch_size=args.batch_size or 16,
        batch_format="numpy",
        concurrency=actors,
        num_cpus=per_actor,
    )


def _count_errors(folder: Path) -> int:
    import pyarrow.parquet as pq

    table = pq.read_table(folder, columns=["error"])
    return int(table.column("error").is_valid().to_numpy(zero_copy_only=False).sum())

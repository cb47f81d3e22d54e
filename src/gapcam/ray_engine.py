"""``gapcam localize --engine ray SOURCE --out OUT``: the localize pipeline on Ray Data.

SOURCE: image files, folders, globs, or manifest files (``.txt``/``.lst``: one path or URI per
line, relative paths resolved against the manifest's folder; URIs are read with pyarrow's
filesystems, e.g. ``s3://bucket/a.jpg``). The paths become a Ray dataset; ``map_batches``
runs them through ``LocalizeActor`` (one model per actor, built once) and the rows are written
as Parquet to OUT (written to a temporary folder next to it, renamed when complete).

One row per input, failures included (``error`` set, the other columns empty): path, error,
width, height, top-k ``classes``/``names``/``scores``, ``map_classes``, ``boxes`` (per map, xyxy
in original pixels, largest first), ``cam`` (the raw low-res maps, float16 bytes of shape
``cam_shape`` = k x h x w), ``cam_region`` (where that grid lies over the image, for
``gapcam.cam.upsample(maps, (height, width), region)``: the letterbox, and a dilated grid's
placement) and ``overlay`` (path of the overlay image, unless --no-overlay).

Each actor builds its Localizer once, with ``Localizer.from_options`` from the same plain
settings the local engine uses (``gapcam.cli.options.localizer_options``): a model name and
weights, or ``checkpoint``, a run folder made by ``gapcam train``, whose path the actors get and
load with ``load_checkpoint`` (safetensors and JSON: nothing is unpickled).

Connect to a cluster with ``address="ray://HEAD:10001"`` (or ``$RAY_ADDRESS``); without one a
local Ray instance is started. OUT, the image paths and the checkpoint folder must then be
reachable from every node (a shared filesystem, or URIs for the images).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from gapcam import images
from gapcam.batch import Outputs
from gapcam.console import safe_text
from gapcam.errors import GapcamError, OutputError
from gapcam.localizer import Localizer
from gapcam.outputs import atomic_write, encode_image
from gapcam.result import Result

MANIFEST_SUFFIXES = (".txt", ".lst")
#: a path or URI is quoted whole in an error row (control characters escaped)
PATH_LIMIT = 4096


def list_sources(
    arguments: list[str], exclude: list[Path] | None = None
) -> tuple[list[str], Sequence[str]]:
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
    try:
        lines = manifest.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise GapcamError(
            f"{safe_text(manifest)}: cannot read the list of images ({reason or exc}); give a "
            "UTF-8 text file with one path or URI per line"
        ) from exc
    entries = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    return [e if "://" in e or Path(e).is_absolute() else str(manifest.parent / e) for e in entries]


def _read(path: str, max_pixels: int) -> images.LoadedImage:
    if "\x00" in path:  # a manifest line may hold anything; no file name holds a NUL
        raise GapcamError(
            f"{safe_text(path, PATH_LIMIT)}: not a file name (it holds a NUL character)"
        )
    if "://" not in path:
        return images.load_image(path, max_pixels=max_pixels)
    import pyarrow.fs

    try:
        filesystem, inner = pyarrow.fs.FileSystem.from_uri(path)
        with filesystem.open_input_stream(inner) as stream:
            data = stream.read()
    except (OSError, ValueError) as exc:
        raise GapcamError(f"{safe_text(path, PATH_LIMIT)}: cannot read ({safe_text(exc)})") from exc
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
            ("cam_region", pa.list_(pa.float64(), 4)),
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
        "cam_region": list(result.region),
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
        self.localizer = Localizer.from_options(options["localizer"])

    def __call__(self, batch: dict[str, Any]) -> Any:
        import pyarrow as pa

        rows: list[dict[str, Any] | None] = []
        loaded: list[tuple[int, images.LoadedImage]] = []
        for path in [str(p) for p in batch["path"]]:
            try:
                loaded.append((len(rows), _read(path, self.localizer.max_pixels)))
                rows.append(None)
            except GapcamError as exc:
                rows.append(error_row(path, str(exc)))
        top_k = self.options["top_k"]
        results = self.localizer.explain(
            [item for _, item in loaded],
            classes=self.options["classes"],
            top_k=top_k,
            predictions=max(5, top_k),
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
        outputs = Outputs(**self.options["outputs"])
        digest = hashlib.sha1(path.encode()).hexdigest()[:10]
        fmt = outputs.format_for(result)
        target = Path(folder) / f"{Path(path).stem}-{digest}.cam.{fmt}"
        figure = result.figure(alpha=outputs.alpha, cmap=outputs.cmap)
        atomic_write(target, encode_image(figure, fmt), overwrite=True)
        return str(Path(self.options["final_out"]) / "overlays" / target.name)


def check_checkpoint(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` with its ``checkpoint`` (if any) as an absolute path for the actors, checked
    here first so that a bad run folder fails before Ray starts, with the local engine's
    messages."""
    checkpoint = settings.get("checkpoint")
    if not checkpoint:
        return dict(settings)
    if settings.get("model") or settings.get("weights"):
        from gapcam.models import model_or_checkpoint

        model_or_checkpoint(settings.get("model"), settings.get("weights"), checkpoint)
    from gapcam.models.checkpoint import read_metadata

    read_metadata(Path(checkpoint))
    return {**settings, "checkpoint": str(Path(checkpoint).resolve())}


def run(
    inputs: Sequence[str],
    localizer: Mapping[str, Any],
    outputs: Outputs,
    *,
    classes: Sequence[int | str] | None = None,
    top_k: int = 1,
    limit: int | None = None,
    overwrite: bool = False,
    address: str | None = None,
    actors: int | None = None,
    batch_size: int | None = None,
    quiet: bool = False,
    on_error: Callable[[str], None] = lambda _: None,
) -> tuple[int, int, Path]:
    """The Ray job: list ``inputs``, map them with actors that build their Localizer from the
    plain settings ``localizer`` (``Localizer.from_options``), write Parquet (and the overlays
    ``outputs`` asks for) to ``outputs.folder``. Returns (inputs done, inputs failed, the
    folder); unreadable inputs go to ``on_error`` as they are listed (the actors' failures are
    rows with ``error`` set). ``outputs.save_cam`` is not supported: the rows hold the maps."""
    out = outputs.folder
    if outputs.save_cam:
        raise GapcamError("save_cam=True: the Ray engine's rows hold the raw maps (column cam)")
    try:
        import ray
    except ImportError as exc:
        raise GapcamError("the Ray engine needs Ray Data: pip install 'gapcam[ray]'") from exc
    if out.exists() and not overwrite:
        raise OutputError(f"{out}: already exists; pass overwrite=True or choose another out=")
    settings = check_checkpoint(localizer)  # a bad checkpoint fails here, before Ray starts
    paths, problems = list_sources(list(inputs))
    paths = paths[:limit] if limit else paths
    for message in problems:
        on_error(message)
    if not paths:
        raise GapcamError("no images to process: check the SOURCE arguments")
    if not ray.is_initialized():
        level = logging.WARNING if quiet else logging.INFO
        ray.init(address=address, log_to_driver=False, logging_level=level)
    ray.data.DataContext.get_current().enable_progress_bars = not quiet
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        options = {
            "localizer": settings,
            "classes": classes,
            "top_k": top_k,
            "overlays": str(staging / "overlays") if outputs.overlay else None,
            "outputs": asdict(outputs),
            "final_out": str(out),
        }
        rows = localize_dataset(paths, options, actors=actors, batch_size=batch_size)
        rows.write_parquet(str(staging / "parquet"))
        errors = _count_errors(staging / "parquet")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return len(paths) - errors, errors + len(problems), out


def localize_dataset(
    paths: list[str],
    options: dict[str, Any],
    *,
    actors: int | None = None,
    batch_size: int | None = None,
) -> Any:
    """The lazy Ray dataset of result rows (one per path, in order). ``actors``: how many
    (default: one per 4 CPUs of the cluster, one per CPU up to 4 CPUs, keeping one CPU for the
    Parquet writers)."""
    import ray

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    cpus = int(ray.cluster_resources().get("CPU", 1))
    per_actor = 1 if cpus <= 4 else 4
    actors = actors or max(1, (cpus - 1) // per_actor)
    dataset = ray.data.from_items([{"path": p} for p in paths])
    return dataset.map_batches(
        LocalizeActor,
        fn_constructor_kwargs={"options": options, "threads": per_actor},
        batch_size=batch_size or 16,
        batch_format="numpy",
        concurrency=actors,
        num_cpus=per_actor,
    )


def _count_errors(folder: Path) -> int:
    import pyarrow.parquet as pq

    table = pq.read_table(folder, columns=["error"])
    return int(table.column("error").is_valid().to_numpy(zero_copy_only=False).sum())

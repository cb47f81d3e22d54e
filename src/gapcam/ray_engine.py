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
placement), ``overlay`` (path of the overlay image, unless --no-overlay) and ``node`` (the Ray
node ID of the actor that made the row).

Each actor builds its Localizer once, with ``Localizer.from_options`` from the same plain
settings the local engine uses (``gapcam.cli.options.localizer_options``): a model name and
weights, or ``checkpoint``, a run folder made by ``gapcam train``, whose path the actors get and
load with ``load_checkpoint`` (safetensors and JSON: nothing is unpickled).

Where the driver runs (``address``, else ``$RAY_ADDRESS``, else a local Ray started here):

- ``ray://HEAD:10001`` (Ray Client, from a laptop outside the cluster): Ray Data is not meant to
  be driven through the client, so this process only connects, and the whole job (listing,
  ``map_batches``, Parquet) runs as one task pinned to the head node (``run_on_cluster``);
  paths are made absolute here and must mean the same files on the cluster's nodes.
- ``auto`` or ``HEAD:6379`` (on a cluster node, or inside ``ray job submit``): the driver is this
  process.

OUT, the image paths and the checkpoint folder must be reachable from every node (a shared
filesystem, or URIs for the images). Each row records the node that made it (``node``). Ray Data
restarts actors and retries their batches when a node dies, so a lost worker node costs time,
not rows.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import shutil
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
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
            ("node", pa.string()),
        ]
    )


def result_row(
    result: Result, path: str, overlay: str | None = None, node: str | None = None
) -> dict[str, Any]:
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
        "node": node,
    }


def error_row(path: str, message: str, node: str | None = None) -> dict[str, Any]:
    empty = dict.fromkeys(schema().names)
    return {**empty, "path": path, "error": message, "node": node}


class LocalizeActor:
    """One Localizer per Ray actor; ``__call__`` maps a batch of paths to result rows."""

    def __init__(self, options: dict[str, Any], threads: int = 1) -> None:
        import ray
        import torch

        torch.set_num_threads(max(1, threads))
        self.options = options
        self.node = ray.get_runtime_context().get_node_id()
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
                rows.append(error_row(path, str(exc), self.node))
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
                rows[index] = result_row(result, path, self._overlay(result, path), self.node)
            except GapcamError as exc:
                rows[index] = error_row(path, str(exc), self.node)
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
        data = encode_image(figure, fmt)
        if not target.parent.is_dir():  # a cancelled run removed it: never made again here
            raise GapcamError(f"{target.parent}: gone (the run was cancelled)")
        atomic_write(target, data, overwrite=True, parents=False)  # nor between check and write
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


def check_out(out: Path, overwrite: bool) -> None:
    """``OutputError`` when OUT exists and may not be replaced: where the command runs, before
    Ray starts, and again in the driver (the cluster may see a folder this machine does not)."""
    if out.exists() and not overwrite:
        raise OutputError(f"{out}: already exists; pass overwrite=True or choose another out=")


@dataclass(frozen=True)
class RayRun:
    """What a Ray run did: inputs done and failed, the OUT folder, rows per node (a label
    ``<node id, 8 hex digits> (<ip>)`` -> rows made there), and notes for the user."""

    done: int
    failed: int
    out: Path
    nodes: dict[str, int] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


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
) -> RayRun:
    """The Ray job: list ``inputs``, map them with actors that build their Localizer from the
    plain settings ``localizer`` (``Localizer.from_options``), write Parquet (and the overlays
    ``outputs`` asks for) to ``outputs.folder``. Unreadable inputs go to ``on_error`` (the
    actors' failures are rows with ``error`` set). ``outputs.save_cam`` is not supported: the
    rows hold the maps. ``address`` ``ray://...`` runs the driver on the cluster's head node
    (module docstring); anything else drives Ray Data from this process."""
    if outputs.save_cam:
        raise GapcamError("save_cam=True: the Ray engine's rows hold the raw maps (column cam)")
    try:
        import ray
    except ImportError as exc:
        raise GapcamError("the Ray engine needs Ray Data: pip install 'gapcam[ray]'") from exc
    job = {
        "inputs": list(inputs),
        "localizer": dict(localizer),
        "outputs": outputs,
        "classes": list(classes) if classes is not None else None,
        "top_k": top_k,
        "limit": limit,
        "overwrite": overwrite,
        "actors": actors,
        "batch_size": batch_size,
    }
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:  # a cluster's workers do not run in this folder
        job = _absolute_paths(job)
    if address and address.startswith("ray://"):
        return _run_through_client(address, job, quiet=quiet, on_error=on_error)
    check_out(outputs.folder, overwrite)  # before Ray starts
    settings = check_checkpoint(localizer)  # a bad checkpoint fails here, before Ray starts
    if not ray.is_initialized():
        level = logging.ERROR if quiet else logging.INFO  # -q: Ray's notices too
        ray.init(address=address, log_to_driver=False, logging_level=level)
    return _drive({**job, "localizer": settings}, progress=not quiet, on_error=on_error)


def _drive(
    job: dict[str, Any],
    *,
    progress: bool,
    on_error: Callable[[str], None],
    staging_name: str | None = None,
) -> RayRun:
    """The driver, in a process connected to the cluster: list, map, write to a staging folder
    next to OUT (``staging_name``, else a fresh one), rename it to OUT when complete."""
    import ray

    outputs: Outputs = job["outputs"]
    out = outputs.folder
    check_out(out, job["overwrite"])
    paths, problems = list_sources(job["inputs"])
    paths = paths[: job["limit"]] if job["limit"] else paths
    for message in problems:
        on_error(message)
    if not paths:
        raise GapcamError("no images to process: check the SOURCE arguments")
    ray.data.DataContext.get_current().enable_progress_bars = progress
    if not progress:  # -q: Ray Data's own notices too (INFO and WARNING)
        logging.getLogger("ray.data").setLevel(logging.ERROR)
    out.parent.mkdir(parents=True, exist_ok=True)
    if staging_name:
        staging = out.parent / staging_name
        staging.mkdir()
    else:
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (staging / STAGING_MARK).touch()  # gone when a stopped run's folder was removed
        if outputs.overlay:
            (staging / "overlays").mkdir()  # made here only: the actors never make it
        options = {
            "localizer": job["localizer"],
            "classes": job["classes"],
            "top_k": job["top_k"],
            "overlays": str(staging / "overlays") if outputs.overlay else None,
            "outputs": asdict(outputs),
            "final_out": str(out),
        }
        rows = localize_dataset(paths, options, actors=job["actors"], batch_size=job["batch_size"])
        # writing Parquet takes no CPU slot: every CPU of a small cluster runs an actor
        rows.write_parquet(str(staging / "parquet"), ray_remote_args={"num_cpus": 0})
        errors, nodes, failures = _tally(staging / "parquet", len(paths))
        if not (staging / STAGING_MARK).is_file():
            # the run was stopped (Ctrl-C where a ray:// command was typed) and its folder
            # removed, but this driver went on: a write made the folder again, without it
            raise GapcamError(f"{out}: the run was stopped; nothing was written")
        (staging / STAGING_MARK).unlink()
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:  # a failure, or a cancel (Ctrl-C where a ray:// command was typed)
        remove_settled(staging)
        raise
    for message in failures:  # the inputs whose rows hold an error, as the local engine says
        on_error(message)
    if errors > len(failures):
        on_error(
            f"{out / 'parquet'}: {errors - len(failures)} more rows hold an error (column error)"
        )
    return RayRun(len(paths) - errors, errors + len(problems), out, nodes)


#: A file in each staging folder from its start until it is renamed to OUT: a folder without it
#: was removed by a stop and made again by a write still on its way, and is never renamed.
STAGING_MARK = ".gapcam-staging"

#: ``remove_settled``: a folder counts as gone once it stayed away this long (seconds), and
#: is watched this long at most
SETTLE_SECONDS, SETTLE_LIMIT = 2.0, 20.0


def remove_settled(folder: Path) -> None:
    """Remove ``folder`` and keep removing it while it comes back, until it has stayed away
    ``SETTLE_SECONDS`` (at most ``SETTLE_LIMIT``): when a run is stopped, a Parquet write task
    of Ray Data already on its way can still make its folder again, after the first removal."""
    deadline = time.monotonic() + SETTLE_LIMIT
    gone_since = time.monotonic()
    while True:
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
            gone_since = time.monotonic()
        now = time.monotonic()
        if now - gone_since >= SETTLE_SECONDS or now >= deadline:
            return
        time.sleep(0.2)


def run_on_cluster(job: dict[str, Any], staging_name: str) -> dict[str, Any]:
    """The body of the driver task that ``ray://`` runs on the head node: ``_drive``, with its
    expected failures (a bad path, an existing OUT, a bad checkpoint) returned as text rather
    than raised through Ray Client, and the listing problems returned for the caller."""
    import gapcam

    problems: list[str] = []
    answer: dict[str, Any] = {"version": gapcam.__version__, "problems": problems}
    try:
        job = {**job, "localizer": check_checkpoint(job["localizer"])}
        answer["run"] = _drive(
            job, progress=False, on_error=problems.append, staging_name=staging_name
        )
    except OutputError as exc:
        answer["error"], answer["kind"] = str(exc), "output"
    except GapcamError as exc:
        answer["error"], answer["kind"] = str(exc), "input"
    return answer


#: How many times a ``ray://`` connection is tried when the head answers "Initialization
#: failure from server": it could not start this client's own server in time (seen on a busy
#: head), which a later try usually can. Other failures are reported at once.
CONNECT_ATTEMPTS = 3


def _connect(address: str) -> None:
    """Connect to the cluster at ``address`` (``ray://``) unless connected; ``GapcamError``,
    one line, when it cannot."""
    import ray

    for attempt in range(1, CONNECT_ATTEMPTS + 1):
        try:
            # the client's own warnings and logs are not the user's: failures are raised
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if not ray.is_initialized():
                    ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
            return
        except (ConnectionError, TimeoutError, RuntimeError, ValueError) as exc:
            transient = isinstance(exc, ConnectionAbortedError) and "Initialization failure" in str(
                exc
            )
            if transient and attempt < CONNECT_ATTEMPTS:
                time.sleep(2.0 * attempt)  # the client disconnected itself: start afresh
                continue
            raise GapcamError(
                f"--ray-address {safe_text(address)}: cannot connect to the Ray cluster "
                f"({safe_text(exc)}); is the head's client server running (ray start --head "
                "--ray-client-server-port 10001), and are RAY_AUTH_MODE=token and the "
                "cluster's token set here?"
            ) from exc


def _run_through_client(
    address: str, job: dict[str, Any], *, quiet: bool, on_error: Callable[[str], None]
) -> RayRun:
    import ray

    import gapcam

    out: Path = job["outputs"].folder
    check_out(out, job["overwrite"])  # when OUT is visible here too: before connecting
    _connect(address)
    # its reconnection notices are not ours either: a lost cluster is one line, below
    logging.getLogger("ray.util.client.logsclient").setLevel(logging.ERROR)
    staging_name = f".{out.name}.{uuid.uuid4().hex[:12]}"
    task = ray.remote(run_on_cluster).options(
        num_cpus=0, resources={HEAD_RESOURCE: 0.001}, max_retries=0
    )
    running = task.remote(job, staging_name)
    try:
        answer = ray.get(running)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM here: the driver task stops too; its own
        # Ray Client prints what the cluster's processes print; their messages about the
        # stopped job (tracebacks of its cancelled tasks) are not the user's: not shown
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            # first its mark (where OUT's folder is visible here): a driver that went on
            # regardless never renames the folder to OUT, however soon it would finish
            with contextlib.suppress(OSError):
                (out.parent / staging_name / STAGING_MARK).unlink()
            ray.cancel(running)  # clean-up stops the actors and removes the staging folder
            ended, _ = ray.wait([running], timeout=CANCEL_WAIT)
            for task_ref in ended:  # its error is taken here, not printed at exit as unhandled
                with contextlib.suppress(Exception):
                    ray.get(task_ref)
            remove_settled(out.parent / staging_name)
            ray.shutdown()  # and nothing more is streamed after this
        raise
    except Exception as exc:  # the cluster, or the connection to it, went away
        shutil.rmtree(out.parent / staging_name, ignore_errors=True)
        raise GapcamError(
            f"the Ray cluster at {safe_text(address)} failed during the run "
            f"({safe_text(_first_line(exc))}); nothing was written to {safe_text(out)}"
        ) from exc
    for message in answer["problems"]:
        on_error(message)
    if "error" in answer:
        kind = OutputError if answer["kind"] == "output" else GapcamError
        raise kind(answer["error"])
    result: RayRun = answer["run"]
    if answer["version"] != gapcam.__version__:
        note = (
            f"the cluster runs gapcam {safe_text(answer['version'])}, this machine "
            f"{gapcam.__version__}: install the same version on both"
        )
        result = replace(result, notes=(*result.notes, note))
    return result


#: seconds a cancelled ``ray://`` run waits for the driver task's clean-up on the cluster
CANCEL_WAIT = 30

#: the resource only the head node has: where the ``ray://`` driver task runs
HEAD_RESOURCE = "node:__internal_head__"


def _absolute_paths(job: dict[str, Any]) -> dict[str, Any]:
    """``job`` with every local path absolute, as the cluster's processes must see it (the
    ``ray://`` driver task and every actor run in folders of Ray's, not this one)."""

    def absolute(path: str) -> str:
        return path if "://" in path else str(Path(path).absolute())

    settings = dict(job["localizer"])
    for key in ("checkpoint", "weights"):
        if settings.get(key):
            settings[key] = absolute(str(settings[key]))
    if settings.get("calibration"):
        settings["calibration"] = [absolute(str(p)) for p in settings["calibration"]]
    outputs = replace(job["outputs"], folder=job["outputs"].folder.absolute())
    inputs = [absolute(p) for p in job["inputs"]]
    return {**job, "inputs": inputs, "localizer": settings, "outputs": outputs}


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def localize_dataset(
    paths: list[str],
    options: dict[str, Any],
    *,
    actors: int | None = None,
    batch_size: int | None = None,
) -> Any:
    """The lazy Ray dataset of result rows (one per path, in order). ``actors``: how many
    (default: one per CPU of the cluster when its smallest node has up to 4 CPUs, else one per
    4 CPUs, each with 4 threads). Ray Data restarts the actors, and retries their batches,
    when their node dies (its defaults for actor pools: ``max_restarts=-1``,
    ``max_task_retries=-1``; tests/test_ray_cluster.py kills a node)."""
    import ray

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    per_node = [int(node["Resources"].get("CPU", 0)) for node in ray.nodes() if node.get("Alive")]
    per_node = [cpus for cpus in per_node if cpus > 0] or [1]
    per_actor = 1 if min(per_node) <= 4 else 4
    actors = actors or max(1, sum(cpus // per_actor for cpus in per_node))
    dataset = ray.data.from_items([{"path": p} for p in paths])
    return dataset.map_batches(
        LocalizeActor,
        fn_constructor_kwargs={"options": options, "threads": per_actor},
        batch_size=batch_size or 16,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=per_actor,
    )


#: the most failed rows a Ray run names one by one (the rest are counted)
MAX_NAMED_FAILURES = 1000


def _tally(folder: Path, expected: int) -> tuple[int, dict[str, int], list[str]]:
    """(rows with an error, rows per node label, the first ``MAX_NAMED_FAILURES`` errors) of
    the Parquet rows in ``folder``, which must hold ``expected`` rows: a write cut short (a
    cancelled run whose Ray Data execution ended early instead of raising) is never taken for
    a finished one. Each error names its input."""
    from collections import Counter

    import pyarrow.parquet as pq
    import ray

    table = pq.read_table(folder, columns=["error", "node"])
    if table.num_rows != expected:
        raise GapcamError(
            f"the run stopped after {table.num_rows} of {expected} rows; nothing was written"
        )
    errors = int(table.column("error").is_valid().to_numpy(zero_copy_only=False).sum())
    counts = Counter(table.column("node").to_pylist())
    addresses = {node["NodeID"]: node.get("NodeManagerAddress", "?") for node in ray.nodes()}
    nodes = {
        f"{(node or 'none')[:8]} ({addresses.get(node, '?')})": count
        for node, count in sorted(counts.items(), key=lambda item: -item[1])
    }
    failed = table.column("error").drop_null().slice(0, MAX_NAMED_FAILURES)
    return errors, nodes, [str(message) for message in failed.to_pylist()]

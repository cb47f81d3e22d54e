"""Throughput of gapcam against the plain forward pass of the same model, measured in one run.

    python benchmarks/bench_localize.py                       # efficientnet_lite0, 300 images
    python benchmarks/bench_localize.py --models resnet50 --limit 60
    python benchmarks/bench_localize.py --profile             # + where the CLI's time goes

For each model, on the same N images of the ILSVRC dev set (``--data DIR``, by default the
folder named by $GAPCAM_ILSVRC_DEV; docs/evaluate.md says how to build it):

- ``forward``: the module alone (eval, ``torch.inference_mode``) on the already preprocessed
  batches: the floor any CAM tool pays;
- ``cam-only``: ``Localizer.explain`` on preloaded images (resize, forward, CAMs, upsampling,
  normalisation, boxes), nothing written;
- ``cli``: ``gapcam localize`` end to end, in-process through ``gapcam.cli.main`` (decode,
  everything above, overlay, PNG encoding, atomic writes, JSON), into a temporary folder;
  ``cli-build`` is the same minus the time to build the model (measured separately).

Images/s and the ratios to the plain forward pass are printed; absolute figures depend on the
machine (printed too), the ratios much less. resnet50 runs with random weights (offline): the
CLI gets them through a temporary ``--weights`` safetensors file. Warm-up runs precede timing.

On a small machine shared with other work, torch's OpenMP threads busy-wait between parallel
regions and take the CPU from the single-threaded steps (decode, PNG encoding) and from each
other: compare a run under ``OMP_WAIT_POLICY=PASSIVE`` or with ``--threads 1``.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import platform
import pstats
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from devset import add_data_option, dev_set

from gapcam import cli, images
from gapcam.localizer import Localizer
from gapcam.models import GapModel, build_model

#: profile stages: label -> (module file suffix, function name); cumulative times
STAGES = (
    ("decode (load_image)", "gapcam/images.py", "load_image"),
    ("resize for the model", "gapcam/images.py", "resize_for_model"),
    ("to tensor + normalise", "gapcam/images.py", "to_tensor"),
    ("forward: features", "gapcam/models/base.py", "features"),
    ("CAMs (class_maps)", "gapcam/cam.py", "class_maps"),
    ("upsample to image size", "gapcam/cam.py", "upsample"),
    ("normalise maps", "gapcam/cam.py", "normalize"),
    ("boxes", "gapcam/boxes.py", "boxes_from_map"),
    ("colorize", "gapcam/overlay.py", "colorize"),
    ("blend", "gapcam/overlay.py", "blend"),
    ("draw boxes", "gapcam/overlay.py", "draw_boxes"),
    ("caption", "gapcam/overlay.py", "add_caption"),
    ("PNG encode", "gapcam/outputs.py", "encode_image"),
    ("write files (atomic)", "gapcam/outputs.py", "write_bytes"),
    ("JSON (encode + write)", "gapcam/outputs.py", "write_json"),
    ("print results", "gapcam/cli/localize.py", "_print_result"),
    ("model build", "gapcam/models/registry.py", "build_model"),
)


@dataclass(frozen=True)
class Row:
    model: str
    path: str
    seconds: float
    count: int

    @property
    def rate(self) -> float:
        return self.count / self.seconds


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="efficientnet_lite0", help="comma-separated names")
    p.add_argument("--limit", type=int, default=300, help="images (default: all 300)")
    p.add_argument("--batch-size", type=int, default=8, help="batch size for every path")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per path; best is kept")
    add_data_option(p)
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--profile", action="store_true", help="cProfile one extra CLI run")
    return p.parse_args(argv)


def image_paths(data: Path, limit: int) -> list[Path]:
    ids = (data / "image_ids.txt").read_text().split()
    if not ids:
        raise SystemExit(f"{data}: image_ids.txt lists no images")
    return [data / name for name in ids[:limit]]


def build(name: str, folder: Path) -> tuple[GapModel, list[str], Callable[[], object]]:
    """The model, the CLI arguments that build the same one, and that build as the CLI does it
    (to time it)."""
    if name == "efficientnet_lite0":
        return build_model(name), ["--model", name], lambda: build_model(name)
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = build_model(name, "random")
    weights = folder / f"{name}-random.safetensors"
    save_file(model.module.state_dict(), str(weights))
    return model, ["--model", name, "--weights", str(weights)], lambda: build_model(name, weights)


def best_time(action: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        action()
        best = min(best, time.perf_counter() - start)
    return best


def chunks(items: Sequence, size: int) -> list[Sequence]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def run_cli(paths: Sequence[Path], model_args: list[str], out: Path, batch: int) -> None:
    argv = ["localize", *map(str, paths), *model_args, "--out", str(out)]
    argv += ["--json", str(out / "results.json"), "--batch-size", str(batch), "-q"]
    argv += ["--overwrite"]  # repeats write into the same folder
    with contextlib.redirect_stderr(io.StringIO()) as err:
        code = cli.main(argv)
    if code != 0:
        raise SystemExit(f"gapcam localize exited {code}:\n{err.getvalue()}")


def bench_model(name: str, paths: list[Path], args: argparse.Namespace) -> list[Row]:
    with tempfile.TemporaryDirectory(prefix="gapcam-bench-") as temp:
        folder = Path(temp)
        model, model_args, rebuild = build(name, folder)
        preprocess = model.preprocess
        loaded = [images.load_image(p) for p in paths]
        tensors = [
            images.to_tensor([images.resize_for_model(item.image, preprocess) for item in chunk],
                             preprocess)
            for chunk in chunks(loaded, args.batch_size)
        ]  # fmt: skip
        localizer = Localizer(model=model)
        module = model.module.eval()

        def forward() -> None:
            with torch.inference_mode():
                for x in tensors:
                    module(x)

        def cam_only() -> None:
            for chunk in chunks(loaded, args.batch_size):
                localizer.explain(chunk)

        build_seconds = best_time(rebuild, 1)
        # warm-up: one batch through each path (and the CLI on one batch)
        with torch.inference_mode():
            module(tensors[0])
        localizer.explain(loaded[: args.batch_size])
        run_cli(paths[: args.batch_size], model_args, folder / "warm", args.batch_size)

        n = len(paths)
        forward_s = best_time(forward, args.repeats)
        cam_s = best_time(cam_only, args.repeats)
        cli_s = best_time(lambda: run_cli(paths, model_args, folder / "out", args.batch_size),
                          args.repeats)  # fmt: skip
        rows = [
            Row(name, "forward", forward_s, n),
            Row(name, "cam-only", cam_s, n),
            Row(name, "cli", cli_s, n),
            Row(name, "cli-build", max(cli_s - build_seconds, 1e-9), n),
        ]
        if args.profile:
            profile_cli(paths, model_args, folder / "profiled", args.batch_size, name)
        return rows


def profile_cli(
    paths: Sequence[Path], model_args: list[str], out: Path, batch: int, name: str
) -> None:
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.runcall(run_cli, paths, model_args, out, batch)
    total = time.perf_counter() - start
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    print(
        f"\nwhere `gapcam localize` spends its time ({name}, {len(paths)} images, batch {batch}; "
        f"cProfile, {total:.1f} s including its overhead; cumulative seconds per function)"
    )
    print(f"  {'stage':<28} {'seconds':>8} {'share':>6}")
    accounted = 0.0
    for label, suffix, function in STAGES:
        seconds = sum(
            cumulative
            for (filename, _, func), (_, _, _, cumulative, _) in stats.items()
            if func == function and filename.replace(os.sep, "/").endswith(suffix)
        )
        accounted += seconds if function != "write_json" else 0.0  # its write is counted above
        print(f"  {label:<28} {seconds:8.2f} {seconds / total:6.1%}")
    rest = total - accounted
    print(f"  {'everything else':<28} {rest:8.2f} {rest / total:6.1%}")


def machine() -> str:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    omp = " ".join(
        f"{key}={os.environ[key]}"
        for key in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")
        if key in os.environ
    )
    return (
        f"machine: {platform.machine()} {platform.processor() or ''} | CPUs: {os.cpu_count()} "
        f"(usable {affinity}) | load average: {load}\n"
        f"python {platform.python_version()} | torch {torch.__version__} | torch threads "
        f"{torch.get_num_threads()} (interop {torch.get_num_interop_threads()}) | "
        f"{omp or 'no OMP_* variables set'}"
    )


def print_table(rows: list[Row], batch: int) -> None:
    print(f"\nbatch size {batch}; images/s (higher is better); ratio = path / plain forward")
    print(f"{'model':<20} {'path':<10} {'images':>6} {'seconds':>8} {'img/s':>8} {'ratio':>6}")
    plain = {r.model: r.rate for r in rows if r.path == "forward"}
    for r in rows:
        ratio = r.rate / plain[r.model]
        print(
            f"{r.model:<20} {r.path:<10} {r.count:>6} {r.seconds:8.2f} {r.rate:8.1f} {ratio:6.2f}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    paths = image_paths(dev_set(args.data), args.limit)
    print(machine())
    rows: list[Row] = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        rows += bench_model(name, paths, args)
    print_table(rows, args.batch_size)
    print(machine().splitlines()[0].split("| ")[-1].replace("load average", "load after"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

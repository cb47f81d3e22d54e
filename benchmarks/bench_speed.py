"""gapcam against the plain forward pass and against its peers, in one run, as one table.

    python benchmarks/bench_speed.py                        # Lite0 + ResNet-50, 300 images
    python benchmarks/bench_speed.py --models efficientnet_lite0 --limit 100 --repeat 0

Every row runs in its own fresh process (so each peak RSS is its own) on the same images of the
ILSVRC dev set (``--data DIR``, by default the folder named by $GAPCAM_ILSVRC_DEV;
docs/evaluate.md says how to build it), batch ``--batch``, after a warm-up batch; model
building and ONNX export are outside the timed part. Rows, per model:

- ``forward eager`` / ``forward eager, malloc kept``: the module alone on preprocessed tensors
  (glibc default vs ``gapcam.pipeline.tune_allocator``); ``forward onnx``: ONNX Runtime, one
  batch at a time on all cores; ``forward onnx, 2 streams``: two threads running alternate
  batches, each with half the cores (what the gapcam pipeline does). The faster of the two
  float32 onnx rows is *the limit*; ``forward onnx int8`` (and ``, 2 streams``): the same with
  the int8 model (``gapcam.quantize``, calibrated on the first 32 images);
- ``gapcam cam-only``: ``Localizer.explain`` (auto backend) on decoded images, nothing written;
- ``gapcam files->json`` / ``files->overlays``: ``gapcam localize`` (streaming pipeline, auto
  backend) from the files to JSON boxes (``--no-overlay``), and to overlays + JSON (the
  default ``--format auto``: JPEG overlays for these JPEG photos; ``, png``: ``--format png``);
  ``files->json, bfloat16`` / ``, int8``: the same with ``--precision bfloat16`` (eager,
  autocast) / ``--precision int8`` (onnx, calibrated on the run's first 32 images);
- ``torchcam CAM`` / ``grad-cam GradCAM``: the peers on the same task, files -> top-1 CAM ->
  upsampled, min-max normalised, box at 0.2 (gapcam's box function) -> one JSON file. They need
  ``pip install torchcam grad-cam`` (benchmark environment only, not gapcam dependencies);
- with ``--repeat R``: ``files->json`` again on the images repeated R times (copies in a
  temporary folder) to show that peak memory does not grow with the number of images.

``--megapixels M``: instead of the dev images themselves (227 x 227), photos the size of a
phone's: each dev image enlarged (bicubic) to M megapixels, with a little noise so that it
holds as much detail as a JPEG of a photo (the enlarged image alone would compress to a few
hundred KB), saved as a JPEG at quality 90. The forward rows are the same (the network sees
224 x 224 either way); the gapcam rows then show the cost of decoding, resizing, mapping and
drawing a large photo:

    python benchmarks/bench_speed.py --models efficientnet_lite0 --limit 24 --megapixels 12 \
        --repeat 0 --rows "onnx, 2" "files->json" "files->overlays"

Ratios are to the limit and to each peer. ``CPU ms / img`` is the process's CPU time (user and
system, all threads) over the timed run, per image, and ``cores busy`` that time over the
run's: on a machine whose cores are all busy, a path's rate is set by its CPU time per image,
so the difference to the limit's is what the path costs besides the forward pass.

``--rows`` runs some rows only (substrings); ``--rounds N`` runs a model's rows N times over,
in turn, keeping each row's best (a slow spell of a shared machine then falls on every row
alike instead of on one). The children run with OMP_WAIT_POLICY=PASSIVE (as the gapcam CLI
sets by default) unless it is already set.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from devset import add_data_option, dev_set

from gapcam.console import safe_text

ROWS = (
    "forward eager",
    "forward eager, malloc kept",
    "forward onnx",
    "forward onnx, 2 streams",
    "forward onnx int8",
    "forward onnx int8, 2 streams",
    "gapcam cam-only",
    "gapcam files->json",
    "gapcam files->json, bfloat16",
    "gapcam files->json, int8",
    "gapcam files->overlays",
    "gapcam files->overlays, png",
    "torchcam CAM",
    "grad-cam GradCAM",
)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", default=["efficientnet_lite0", "resnet50"])
    add_data_option(p)
    p.add_argument("--limit", type=int, default=300, help="images (default: all 300)")
    p.add_argument("--resnet-limit", type=int, default=100, help="images for resnet50")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeat", type=int, default=10, help="memory check: N x images (0: skip)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per row; the best counts")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the rows of a model this many times over, in turn, and keep each row's best "
        "(a slow spell of a shared machine then hits every row alike)",
    )
    p.add_argument("--rows", nargs="+", help="only rows containing one of these (default: all)")
    p.add_argument(
        "--megapixels",
        type=float,
        default=0.0,
        help="photos of this many megapixels made from the dev images (default: the images)",
    )
    p.add_argument(
        "--child", nargs=4, metavar=("ROW", "MODEL", "LIST", "TMP"), help=argparse.SUPPRESS
    )
    return p.parse_args(argv)


# -- children: one measurement each, printed as a JSON line -------------------------------------
def build(name: str) -> Any:
    from gapcam.models import build_model

    return build_model(name, None if name == "efficientnet_lite0" else "random")


def tensors(model: Any, paths: Sequence[Path], batch: int) -> list[Any]:
    from gapcam import images

    loaded = [images.load_image(p) for p in paths]
    arrays = [images.resize_for_model(item.image, model.preprocess) for item in loaded]
    return [
        images.to_tensor(arrays[i : i + batch], model.preprocess)
        for i in range(0, len(arrays), batch)
    ]


def forward_row(row: str, model: Any, paths: Sequence[Path], batch: int) -> Callable[[], None]:
    import torch

    from gapcam.backends import make_backend
    from gapcam.pipeline import tune_allocator

    if row.endswith("malloc kept"):
        tune_allocator()
    streams = 2 if row.endswith("2 streams") else 1
    threads = max(1, torch.get_num_threads() // streams) if streams > 1 else 0
    # eager rows: the plain module (default layout), as a user's loop runs it
    inputs = tensors(model, paths, batch)
    features = None
    if "int8" in row:  # calibrated on the first 32 images, as gapcam localize does
        calibration = torch.cat(inputs)[:32]
        features = make_backend(
            model, "onnx", threads=threads, precision="int8", calibration=lambda _: calibration
        ).features
    elif "onnx" in row:
        features = make_backend(model, "onnx", threads=threads).features
    model.module.eval()

    def forward(x: Any) -> None:
        with torch.inference_mode():
            model.logits(features(x) if features else model.features(x))

    if streams > 1:
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(streams)
        return lambda: list(pool.map(forward, inputs))
    return lambda: [forward(x) for x in inputs]


def cam_only_row(model: Any, paths: Sequence[Path], batch: int) -> Callable[[], None]:
    from gapcam import images
    from gapcam.localizer import Localizer
    from gapcam.pipeline import tune_allocator

    tune_allocator()
    localizer = Localizer(model, backend="auto")
    loaded = [images.load_image(p) for p in paths]
    return lambda: [localizer.explain(loaded[i : i + batch]) for i in range(0, len(loaded), batch)]


def cli_row(row: str, name: str, listing: Path, tmp: Path, batch: int) -> Callable[[], None]:
    from gapcam import cli
    from gapcam.cli import localize as run

    folder, inputs = read_listing(listing)
    argv = ["--model", name, "--batch-size", str(batch), "-q"]
    if name != "efficientnet_lite0":
        from safetensors.torch import save_file

        save_file(build(name).module.state_dict(), str(tmp / "w.safetensors"))
        argv += ["--weights", str(tmp / "w.safetensors")]
    if "json" in row:
        argv.append("--no-overlay")
    if row.endswith("bfloat16"):
        argv += ["--precision", "bfloat16"]
    if row.endswith("int8"):
        argv += ["--precision", "int8"]
    if row.endswith("png"):
        argv += ["--format", "png"]
    parser = cli.build_parser()
    runs = iter(range(1000))

    def once() -> None:  # each run writes a new folder, kept until the child ends (deleting
        i = next(runs)  # the last run's overlays would be timed with this one)
        out = ["--out", str(tmp / f"out{i}"), "--json", str(tmp / f"r{i}.json")]
        if run.run(parser.parse_args(["localize", str(folder), *out, *argv])) != 0:
            raise SystemExit("gapcam localize reported images it could not read: no rate")

    localizer = run._localizer(parser.parse_args(["localize", "x", *argv]), inputs)
    run._localizer = lambda _args, _inputs: localizer  # type: ignore[assignment]
    return once


def peer_row(
    row: str, model: Any, paths: Sequence[Path], tmp: Path, batch: int
) -> Callable[[], None]:
    import torch
    import torch.nn.functional as F

    from gapcam import images
    from gapcam.boxes import boxes_from_map

    module = model.module.eval()
    layer, fc = ("layer4", "fc") if hasattr(module, "layer4") else ("bn2", "classifier")
    if row.startswith("torchcam"):
        from torchcam.methods import CAM

        extractor = CAM(module, target_layer=layer, fc_layer=fc)

        def maps(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                out = module(x)
            return extractor(out.argmax(1).tolist(), out)[0][:, None]
    else:
        from pytorch_grad_cam import GradCAM

        gradcam = GradCAM(model=module, target_layers=[getattr(module, layer)])

        def maps(x: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(gradcam(input_tensor=x, targets=None))[:, None]

    def run() -> None:
        documents = []
        for start in range(0, len(paths), batch):
            loaded = [images.load_image(p) for p in paths[start : start + batch]]
            arrays = [images.resize_for_model(item.image, model.preprocess) for item in loaded]
            low = maps(images.to_tensor(arrays, model.preprocess)).float()
            for item, m in zip(loaded, low, strict=True):
                up = F.interpolate(m[None], size=item.size[::-1], mode="bilinear")[0, 0]
                up = (up - up.min()) / (up.max() - up.min()).clamp_min(1e-12)
                boxes = boxes_from_map(up.numpy(), 0.2)
                documents.append({"input": item.name, "boxes": [b.as_list() for b in boxes]})
        (tmp / f"{row[:5]}.json").write_text(json.dumps(documents))

    return run


def child(row: str, name: str, listing: Path, tmp: Path, batch: int, repeats: int) -> None:
    _, paths = read_listing(listing)
    if row.startswith("gapcam files"):
        action = cli_row(row, name, listing, tmp, batch)  # built and exported, not yet timed
    else:
        model = build(name)
        make = {
            "gapcam cam-only": lambda ps: cam_only_row(model, ps, batch),
            "torchcam CAM": lambda ps: peer_row(row, model, ps, tmp, batch),
            "grad-cam GradCAM": lambda ps: peer_row(row, model, ps, tmp, batch),
        }.get(row, lambda ps: forward_row(row, model, ps, batch))
        make(paths[:batch])()  # warm-up
        action = make(paths)
    best, cpu = float("inf"), 0.0
    for _ in range(repeats):  # the best of several: shared machines are noisy
        start, used = time.perf_counter(), cpu_seconds()
        action()
        seconds, spent = time.perf_counter() - start, cpu_seconds() - used
        if seconds < best:
            best, cpu = seconds, spent
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": best, "cpu_seconds": cpu, "count": len(paths), "rss_mb": rss}))


def cpu_seconds() -> float:
    """CPU time of this process so far, user and system, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def read_listing(listing: Path) -> tuple[Path, list[Path]]:
    """(the images' folder, the images) that ``measure`` gave a child."""
    data = json.loads(listing.read_text())
    return Path(data["folder"]), [Path(p) for p in data["paths"]]


# -- the parent: one child per row, then the table ------------------------------------------------
def measure(
    row: str, name: str, folder: Path, paths: Sequence[Path], batch: int, repeats: int
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        listing = Path(tmp) / "list.json"  # JSON: a file name may hold a newline
        listing.write_text(json.dumps({"folder": str(folder), "paths": [str(p) for p in paths]}))
        env = {**os.environ}
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        env.setdefault("GAPCAM_CACHE_DIR", str(Path(tempfile.gettempdir()) / "gapcam-bench-cache"))
        argv = [
            sys.executable,
            __file__,
            "--child",
            row,
            name,
            str(listing),
            tmp,
            "--batch",
            str(batch),
        ]
        done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            tail = (done.stderr.strip().splitlines() or ["?"])[-1]
            return {"error": safe_text(tail, 90)}  # a file name may hold terminal escapes
        return json.loads(lines[-1])


def subset(
    data: Path, limit: int, folder: Path, repeat: int = 1, megapixels: float = 0.0
) -> list[Path]:
    """``limit`` images of ``data`` linked (or copied) into ``folder``, ``repeat`` times over;
    with ``megapixels``, photos of that size made from them instead (``enlarge``)."""
    sources = sorted((data / "images").iterdir())[:limit]
    folder.mkdir(parents=True)
    out = []
    for r in range(repeat):
        for i, source in enumerate(sources):
            target = folder / f"{r:03d}-{source.name}"
            if megapixels > 0:
                enlarge(source, target, megapixels, seed=i)
            else:
                try:
                    os.link(source, target)
                except OSError:
                    shutil.copyfile(source, target)
            out.append(target)
    return out


def enlarge(source: Path, target: Path, megapixels: float, seed: int) -> None:
    """``source`` enlarged to ``megapixels`` (its aspect kept), with uniform noise of +-12
    levels, as a JPEG of quality 90 at ``target`` (``--megapixels``)."""
    import numpy as np
    from PIL import Image

    with Image.open(source) as image:
        rgb = image.convert("RGB")
    scale = (megapixels * 1e6 / (rgb.width * rgb.height)) ** 0.5
    size = (round(rgb.width * scale), round(rgb.height * scale))
    pixels = np.asarray(rgb.resize(size, Image.Resampling.BICUBIC), dtype=np.int16)
    noise = np.random.default_rng(seed).integers(-12, 13, pixels.shape, dtype=np.int16)
    photo = Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8))
    photo.save(target, "JPEG", quality=90)


def machine() -> str:
    import onnxruntime
    import torch

    cpu = platform.processor() or platform.machine()
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    cpu = names[0] if names else cpu
    return (
        f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch "
        f"{torch.__version__} ({torch.get_num_threads()} threads), onnxruntime {onnxruntime.__version__}"
    )


def table(results: list[tuple[str, str, int, dict[str, Any]]]) -> str:
    lines = [
        "| model | path | images | img/s | x limit | CPU ms / img | cores busy | peak RSS MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    limit: dict[str, float] = {}
    for m, row, _, r in results:
        if row.startswith("forward onnx") and "int8" not in row and "seconds" in r:
            limit[m] = max(limit.get(m, 0.0), r["count"] / r["seconds"])
    for model, row, count, r in results:
        if "error" in r:
            lines.append(f"| {model} | {row} | {count} | failed: {r['error']} | | | | |")
            continue
        rate = r["count"] / r["seconds"]
        ratio = f"{rate / limit[model]:.2f}" if model in limit else "-"
        cpu = f"{r['cpu_seconds'] / r['count'] * 1000:.2f} | {r['cpu_seconds'] / r['seconds']:.2f}"
        lines.append(
            f"| {model} | {row} | {count} | {rate:.1f} | {ratio} | {cpu} | {r['rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def peers(results: list[tuple[str, str, int, dict[str, Any]]]) -> list[str]:
    rates = {(m, row): r["count"] / r["seconds"] for m, row, _, r in results if "seconds" in r}
    notes = []
    for model in dict.fromkeys(m for m, *_ in results):
        for row in ("gapcam files->json", "gapcam files->json, bfloat16"):
            ours = rates.get((model, row))
            for peer in ("torchcam CAM", "grad-cam GradCAM"):
                if ours and (model, peer) in rates:
                    notes.append(f"{model}: {row} = {ours / rates[(model, peer)]:.1f}x {peer}")
    return notes


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if args.child:
        row, name, listing, tmp = args.child
        child(row, name, Path(listing), Path(tmp), args.batch, args.repeats)
        return 0
    data = dev_set(args.data)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            limit = (
                args.limit if name == "efficientnet_lite0" else min(args.limit, args.resnet_limit)
            )
            folder = Path(tmp) / f"{name}-{limit}"
            paths = subset(data, limit, folder, megapixels=args.megapixels)
            rows = [r for r in ROWS if not args.rows or any(part in r for part in args.rows)]
            best: dict[str, dict[str, Any]] = {}
            for round_ in range(max(1, args.rounds)):
                for row in rows:
                    print(f"... {name}: {row} (round {round_ + 1})", file=sys.stderr, flush=True)
                    r = measure(row, name, folder, paths, args.batch, args.repeats)
                    kept = best.get(row)
                    if kept is None or "error" in kept or r.get("seconds", 1e9) < kept["seconds"]:
                        best[row] = r
            results += [(name, row, len(paths), best[row]) for row in rows]
        if args.repeat > 1:
            name = args.models[0]
            folder = Path(tmp) / "repeated"
            paths = subset(data, args.limit, folder, args.repeat, args.megapixels)
            print(f"... {name}: files->json x{args.repeat}", file=sys.stderr, flush=True)
            r = measure("gapcam files->json", name, folder, paths, args.batch, 1)
            results.append((name, f"gapcam files->json ({args.repeat}x the images)", len(paths), r))
    photos = f"; photos of {args.megapixels:g} MP (--megapixels)" if args.megapixels else ""
    print(f"machine: {machine()}; batch {args.batch}{photos}\n")
    print(table(results))
    print("\n" + "\n".join(peers(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where one image's time goes in ``gapcam localize``, stage by stage, on one core.

    python benchmarks/bench_stages.py                       # Lite0, ONNX, 160 dev images
    python benchmarks/bench_stages.py --precision int8
    python benchmarks/bench_stages.py --model resnet50 --weights random --precision int8

Each stage of the pipeline runs alone over the same images (``--limit``, batch ``--batch``),
with torch and ONNX Runtime on one thread, after a warm-up pass; the best of ``--repeats``
passes counts. It prints wall and CPU milliseconds per image, then the *ceilings*: the most
each path of ``benchmarks/bench_speed.py`` could reach, as a ratio to the float32 forward pass
alone, if the pipeline had no cost of its own (no threads handing work on, no GIL, no
scheduling): the network's CPU time over the network's and the path's stages' together (CPU
time, as the pipeline's writers wait for the disk while the other threads work). A path
cannot beat its ceiling on any number of cores, since its stages take the same cores as the
forward pass.

Two rows time the fastest other libraries known for the two largest stages, which gapcam does
not use (docs/speed.md, "Where the time goes"): torchvision's JPEG decoder (the same pixels as
Pillow's) and torch's antialiased uint8 resize (pixels one or two levels apart on about 0.2%
of them, so the maps would change). The last ceiling column counts them instead of Pillow's.

``--data``: the ILSVRC dev set (default: $GAPCAM_ILSVRC_DEV; docs/evaluate.md says how to
build it).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.nn.functional as F
from devset import add_data_option, dev_set
from torchvision.io import ImageReadMode, decode_image

from gapcam import cam, images
from gapcam.boxes import boxes_from_map
from gapcam.localizer import Localizer
from gapcam.models import build_model
from gapcam.outputs import atomic_write, encode_image
from gapcam.overlay import heat_image


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--weights", default=None, help="None: pretrained; 'random' for speed only")
    p.add_argument("--backend", default="onnx")
    p.add_argument("--precision", default="float32")
    add_data_option(p)
    p.add_argument("--limit", type=int, default=160)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    return p.parse_args(argv)


def timed(action: Callable[[], Any], count: int, repeats: int) -> tuple[tuple[float, float], Any]:
    """((wall, CPU) milliseconds per image of the fastest of ``repeats`` passes after a
    warm-up, the last output). CPU: the process's, all threads; it leaves out the time spent
    waiting, for the disk above all (the pipeline's other threads work meanwhile)."""
    out = action()
    best, cpu = float("inf"), 0.0
    for _ in range(repeats):
        start, used = time.perf_counter(), time.process_time()
        out = action()
        seconds, spent = time.perf_counter() - start, time.process_time() - used
        if seconds < best:
            best, cpu = seconds, spent
    return (best / count * 1000, cpu / count * 1000), out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(1)
    data = dev_set(args.data)
    paths = sorted((data / "images").iterdir())[: args.limit]
    n, batch = len(paths), args.batch
    calibration = [str(p) for p in paths[:32]] if args.precision == "int8" else None
    model = build_model(args.model, args.weights)
    loc = Localizer(model, backend=args.backend, precision=args.precision, calibration=calibration)
    floating = loc if args.precision == "float32" else Localizer(model, backend=args.backend)
    pp = loc.preprocess
    rows: list[tuple[str, tuple[float, float]]] = []

    def stage(label: str, action: Callable[[], Any]) -> Any:
        ms, out = timed(action, n, args.repeats)
        rows.append((label, ms))
        return out

    stage("read the header", lambda: [images.read_header(p) for p in paths])
    loaded = stage("decode (open, checks, RGB)", lambda: [images.load_image(p) for p in paths])
    arrays = stage(
        "resize to the input", lambda: [images.resize_for_model(i.image, pp) for i in loaded]
    )
    groups = [arrays[i : i + batch] for i in range(0, n, batch)]
    tensors = stage("to tensor, normalise", lambda: [images.to_tensor(g, pp) for g in groups])
    if loc is not floating:
        stage("network, float32", lambda: [floating._runner.features(x) for x in tensors])
    features = stage(
        f"network, {args.precision}", lambda: [loc._runner.features(x) for x in tensors]
    )
    chunks = [loaded[i : i + batch] for i in range(0, n, batch)]
    scores = [loc.scores(c) for c in chunks]

    def head() -> Any:
        out = []
        for f in features:
            logits = model.logits(f)
            top = torch.softmax(logits, 1).topk(5, 1).indices
            out.append(cam.class_maps(f, model.weight, top[:, :1], model.bias, model.head))
        return out

    stage("logits, top-5, CAM (7x7)", head)

    def maps() -> Any:
        out = []
        for c, s in zip(chunks, scores, strict=True):
            out += loc._placed_maps(c, s.low, s.preprocess, s.placement)
        return out

    placed = stage("upsample, normalise", maps)
    stage(
        "boxes",
        lambda: [boxes_from_map(p.box_maps[0], loc.threshold, loc.min_area) for p in placed],
    )
    results = [r for c in chunks for r in loc.explain(c)]
    stage("JSON entry", lambda: [json.dumps(r.to_dict(), indent=2) for r in results])
    figures = stage("overlay drawing", lambda: [r.figure() for r in results])
    stage("  of which colours", lambda: [heat_image(p.box_maps[0]) for p in placed])
    encoded = stage("overlay JPEG encoding", lambda: [encode_image(f, "jpg") for f in figures])
    with tempfile.TemporaryDirectory(prefix="gapcam-stages-") as folder:
        passes = iter(range(1000))

        def write() -> None:  # a new folder each pass: outputs are never overwritten
            target = Path(folder) / str(next(passes))
            for i, data in enumerate(encoded):
                atomic_write(target / f"{i}.cam.jpg", data)

        stage("overlay file written (atomic, fsync)", write)
    files = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in paths]
    decoded = stage(
        "other: decode, torchvision",
        lambda: [decode_image(b, mode=ImageReadMode.RGB) for b in files],
    )
    if pp.interpolation not in ("bilinear", "bicubic"):
        raise SystemExit(f"{pp.interpolation} resize: torch has no antialiased one to compare")
    sizes = [images.fit_region(x.shape[2], x.shape[1], pp)[0][3:1:-1] for x in decoded]
    stage(
        "other: resize, torch antialiased uint8",
        lambda: [
            F.interpolate(x[None], size=hw, mode=pp.interpolation, antialias=True)
            for x, hw in zip(decoded, sizes, strict=True)
        ],
    )

    print(
        f"{args.model} ({args.weights or 'pretrained'}), {args.backend} {args.precision}, "
        f"{n} images of {data.name}, batch {batch}, one thread, best of {args.repeats}\n"
    )
    print("| stage | ms / image | CPU ms / image |\n|---|---:|---:|")
    for label, (ms, cpu) in rows:
        print(f"| {label} | {ms:.3f} | {cpu:.3f} |")
    print_ceilings({label: cpu for label, (_, cpu) in rows}, args.precision)
    return 0


#: the stages of each path besides the network (labels of ``main``'s rows, by their start)
JSON_STAGES = ("read", "decode (", "resize to", "to tensor", "logits", "upsample", "boxes", "JSON")
OVERLAY_STAGES = (*JSON_STAGES, "overlay drawing", "overlay JPEG", "overlay file")
#: each of the other libraries' rows, and the gapcam row it stands in for
OTHERS = {"decode (": "other: decode", "resize to": "other: resize"}


def print_ceilings(ms: dict[str, float], precision: str) -> None:
    """The ceilings (this module's doc) of the paths of ``bench_speed.py`` whose targets are
    set against the float32 forward pass, with gapcam's stages and with the other libraries,
    from each stage's CPU milliseconds per image (``ms``, by row label)."""

    def besides(prefixes: Sequence[str], others: bool) -> float:
        total = 0.0
        for label, value in ms.items():
            start = next((p for p in prefixes if label.startswith(p)), None)
            if start is None:
                continue
            other = OTHERS.get(start) if others else None
            total += next(v for k, v in ms.items() if k.startswith(other)) if other else value
        return total

    floating = ms["network, float32"]
    network = ms[f"network, {precision}"]
    paths = [(f"files -> JSON ({precision})", JSON_STAGES), ("files -> overlays", OVERLAY_STAGES)]
    print(
        f"\nCeilings, x the float32 forward pass alone ({floating:.2f} ms), in CPU time, with no "
        "pipeline cost of its own:\n\n| path | stages besides the network, ms | ceiling | with the "
        "fastest other decode and resize |\n|---|---:|---:|---:|"
    )
    for label, prefixes in paths if precision == "float32" else paths[:1]:
        own, fastest = besides(prefixes, False), besides(prefixes, True)
        print(
            f"| {label} | {own:.2f} | {floating / (network + own):.2f}x | "
            f"{floating / (network + fastest):.2f}x |"
        )


if __name__ == "__main__":
    raise SystemExit(main())

"""Where one image's time goes in ``gapcam localize``, stage by stage, on one core.

    python benchmarks/bench_stages.py                       # Lite0, ONNX, 160 dev images
    python benchmarks/bench_stages.py --model resnet50 --weights random --precision int8

Each stage of the pipeline runs alone over the same images (``--limit``, batch ``--batch``),
with torch and ONNX Runtime on one thread, after a warm-up pass; the best of ``--repeats``
passes counts. It prints milliseconds per image, and what the stages besides the network add
up to as a share of the network's: how close ``gapcam localize`` can come to the plain forward
pass on any number of cores (``benchmarks/bench_speed.py`` measures the whole runs).

``--data``: the ILSVRC dev set (default: $GAPCAM_ILSVRC_DEV; docs/evaluate.md says how to
build it).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from devset import add_data_option, dev_set

from gapcam import cam, images
from gapcam.boxes import boxes_from_map
from gapcam.localizer import Localizer
from gapcam.models import build_model
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


def timed(action: Callable[[], Any], count: int, repeats: int) -> tuple[float, Any]:
    """(best milliseconds per image over ``repeats`` passes after a warm-up, the last output)."""
    out = action()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = action()
        best = min(best, time.perf_counter() - start)
    return best / count * 1000, out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(1)
    data = dev_set(args.data)
    paths = sorted((data / "images").iterdir())[: args.limit]
    n, batch = len(paths), args.batch
    calibration = [str(p) for p in paths[:32]] if args.precision == "int8" else None
    model = build_model(args.model, args.weights)
    loc = Localizer(model, backend=args.backend, precision=args.precision, calibration=calibration)
    pp = loc.preprocess
    rows: list[tuple[str, float]] = []

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
    features = stage("network", lambda: [loc._runner.features(x) for x in tensors])
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
    stage("overlay drawing", lambda: [r.figure() for r in results])
    stage("  of which colours", lambda: [heat_image(p.box_maps[0]) for p in placed])

    print(
        f"{args.model} ({args.weights or 'pretrained'}), {args.backend} {args.precision}, "
        f"{n} images of {data.name}, batch {batch}, one thread, best of {args.repeats}\n"
    )
    print("| stage | ms / image |\n|---|---:|")
    for label, ms in rows:
        print(f"| {label} | {ms:.3f} |")
    network = dict(rows)["network"]
    counted = ("read", "decode", "resize", "to tensor", "logits", "upsample", "boxes", "JSON")
    other = sum(ms for label, ms in rows if label.startswith(counted))
    print(
        f"\nfiles -> JSON, besides the network: {other:.2f} ms = {other / network:.0%} of the "
        f"network's {network:.2f} ms; at best {network / (network + other):.2f}x of the forward "
        "pass alone (before the pipeline's own Python)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

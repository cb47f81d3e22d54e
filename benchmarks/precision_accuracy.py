"""How far bfloat16 and int8 move the answers from float32, on the ILSVRC dev set.

    python benchmarks/precision_accuracy.py                     # Lite0, all 300 images
    python benchmarks/precision_accuracy.py --model resnet50 --weights random --limit 48

For each precision (``float32`` on the ONNX backend, the reference; ``bfloat16`` on the eager
backend, autocast; ``int8`` on the ONNX backend, statically quantized, calibrated on the first
``--calibration`` images of the set, as ``gapcam evaluate`` does by default), every image's
map of its ground-truth class is scored as ``gapcam evaluate`` scores it, and compared with
float32's:

- the dev-set metrics: top-1 classification, GT-known loc (box at 0.2, IoU >= 0.5),
  MaxBoxAccV2, on all images and on those not used for calibration;
- agreement with float32: the top-1 class, the largest absolute difference between the two
  normalised maps (median / 95th percentile / worst image), and the IoU of the box at 0.2
  with float32's box (median / 5th percentile / worst).

``--data``: the ILSVRC dev set (default: $GAPCAM_ILSVRC_DEV; docs/evaluate.md says how to build
it). Precisions this machine cannot run are reported as such and skipped.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from typing import Any

import numpy as np
import torch
from devset import add_data_option, dev_set

from gapcam import images
from gapcam.boxes import box_iou
from gapcam.errors import GapcamError
from gapcam.eval import metrics
from gapcam.eval.datasets import load_dataset
from gapcam.eval.evaluate import label_resolver
from gapcam.localizer import Localizer
from gapcam.models import build_model

PRECISIONS = ("float32", "bfloat16", "int8")
BATCH = 16


def outcomes(localizer: Localizer, samples: list[Any]) -> dict[str, Any]:
    maps, boxes, top1, known, any_iou = [], [], [], [], []
    for start in range(0, len(samples), BATCH):
        batch = samples[start : start + BATCH]
        loaded = [images.load_image(s.path, name=s.name) for s in batch]
        results = localizer.explain(loaded, classes_per_image=[[s.label] for s in batch])
        for sample, result in zip(batch, results, strict=True):
            normalized = result.normalized[0]
            maps.append(normalized)
            found = result.maps[0].boxes
            boxes.append(found[0].as_list() if found else None)
            top1.append(result.predictions[0].index)
            iou = 0.0
            if found and sample.boxes:
                box = metrics.edges_to_inclusive(found[0].as_list())
                iou = float(metrics.inclusive_iou(box, sample.boxes).max())
            known.append(iou >= 0.5)
            if sample.boxes:
                components = metrics.component_boxes(normalized)
                any_iou.append(metrics.sweep_ious(components, sample.boxes)[1])
    return {"maps": maps, "boxes": boxes, "top1": top1, "known": known, "any": any_iou}


def max_box_acc_v2(any_iou: list[np.ndarray]) -> float:
    hits = np.asarray(any_iou)[None] >= np.asarray(metrics.IOU_THRESHOLDS)[:, None, None]
    return float(hits.mean(axis=1).max(axis=1).mean() * 100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_option(parser)
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--weights", default=None, help="random: random weights (agreement only)")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--calibration", type=int, default=32)
    args = parser.parse_args()
    os.environ.setdefault("GAPCAM_CACHE_DIR", tempfile.mkdtemp(prefix="gapcam-bench-"))
    model = build_model(args.model, args.weights)
    dataset = load_dataset(dev_set(args.data), label_resolver(model))
    samples = list(dataset.samples[: args.limit] if args.limit else dataset.samples)
    labels = np.array([s.label for s in samples])
    calibration = [str(s.path) for s in samples[: args.calibration]]
    runs: dict[str, dict[str, Any]] = {}
    for precision in PRECISIONS:
        extra: dict[str, Any] = {"backend": "eager" if precision == "bfloat16" else "onnx"}
        if precision == "int8":
            extra["calibration"] = calibration
        try:
            localizer = Localizer(model, precision=precision, **extra)
        except GapcamError as exc:
            print(f"{precision}: skipped ({exc})")
            continue
        runs[precision] = outcomes(localizer, samples)
    reference = runs["float32"]
    held = slice(args.calibration, None)
    print(
        f"\n{args.model} ({args.weights or 'trained'}), {len(samples)} images, torch "
        f"{torch.__version__}; int8 calibrated on the first {args.calibration}\n"
    )
    print(
        "| precision | top-1 cls | GT-known | MaxBoxAccV2 | same on the other "
        f"{len(samples) - args.calibration} (top-1 / GT-known / MaxBoxAccV2) |\n|---|---:|---:|---:|---|"
    )
    for precision, run in runs.items():
        top1 = np.array(run["top1"]) == labels
        known = np.array(run["known"])
        rest = (
            f"{top1[held].mean() * 100:.2f} / {known[held].mean() * 100:.2f} / "
            f"{max_box_acc_v2(run['any'][held]):.2f}"
        )
        print(
            f"| {precision} | {top1.mean() * 100:.2f} | {known.mean() * 100:.2f} | "
            f"{max_box_acc_v2(run['any']):.2f} | {rest} |"
        )
    print(
        "\n| against float32 | top-1 agreement | normalised CAM max abs diff "
        "(median / p95 / max) | box IoU (median / p5 / min) |\n|---|---:|---|---|"
    )
    for precision, run in runs.items():
        if precision == "float32":
            continue
        agree = np.mean(np.array(run["top1"]) == np.array(reference["top1"])) * 100
        diffs = [
            float(np.abs(a - b).max()) for a, b in zip(run["maps"], reference["maps"], strict=True)
        ]
        ious = [
            float(box_iou([a], [b])[0, 0]) if a and b else 0.0
            for a, b in zip(run["boxes"], reference["boxes"], strict=True)
        ]
        print(
            f"| {precision} | {agree:.1f}% | {np.median(diffs):.3f} / "
            f"{np.percentile(diffs, 95):.3f} / {max(diffs):.3f} | {np.median(ious):.3f} / "
            f"{np.percentile(ious, 5):.3f} / {min(ious):.3f} |"
        )


if __name__ == "__main__":
    main()

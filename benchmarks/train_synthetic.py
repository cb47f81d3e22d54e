"""Train the default backbone's head on a synthetic shapes dataset and measure localization.

    python benchmarks/train_synthetic.py [--classes 4 --per-class 60 --val-per-class 25]

Generates the data with ``gapcam.train.synthetic`` (seeded), trains with ``gapcam.train`` (frozen
backbone, cached features), then on the validation split prints classification accuracy and,
with the CAM of the true class (GT-known), box accuracy at the default threshold 0.2 and
MaxBoxAcc (best threshold in 0.00..0.99, largest 8-connected component, IoU >= 0.5), against
a centred-box baseline (a box centred in the image with the mean true box's width and height).
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import numpy as np

from gapcam import Localizer, load_checkpoint, train_classifier
from gapcam.boxes import box_iou, boxes_from_map
from gapcam.train.synthetic import CSV_NAME, generate

THRESHOLDS = np.round(np.arange(0.0, 1.0, 0.01), 2)


def read_boxes(split: Path) -> list[tuple[Path, str, tuple[int, int, int, int]]]:
    with (split / CSV_NAME).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    # the CSV is inclusive (last column/row); gapcam.boxes uses pixel edges: x1, y1 + 1
    return [
        (
            split / r["path"],
            r["label"],
            (int(r["x0"]), int(r["y0"]), int(r["x1"]) + 1, int(r["y1"]) + 1),
        )
        for r in rows
    ]


def centred_baseline(rows: list[tuple[Path, str, tuple[int, int, int, int]]]) -> float:
    """Share of true boxes with IoU >= 0.5 with one box of the mean true width and height,
    centred in the image."""
    from PIL import Image

    truths = np.array([box for _, _, box in rows], dtype=np.float64)
    width, height = (truths[:, 2:] - truths[:, :2]).mean(axis=0)
    image_w, image_h = Image.open(rows[0][0]).size
    centred = [(image_w - width) / 2, (image_h - height) / 2]
    centred += [centred[0] + width, centred[1] + height]
    return float((box_iou(np.array([centred]), truths)[0] >= 0.5).mean())


def localization(run: Path, split: Path) -> dict[str, float]:
    """Accuracy, box accuracy @0.2, MaxBoxAcc (GT-known) and the centred baseline on ``split``."""
    rows = read_boxes(split)
    localizer = Localizer(model=load_checkpoint(run))
    hits = np.zeros(len(THRESHOLDS))
    correct = 0
    for path, label, truth in rows:
        result = localizer(path, classes=[label])  # the CAM of the true class
        correct += result.predictions[0].name == label
        for t, threshold in enumerate(THRESHOLDS):
            boxes = boxes_from_map(result.cam(0), float(threshold))
            if boxes and box_iou(np.array([boxes[0].as_list()]), np.array([truth]))[0, 0] >= 0.5:
                hits[t] += 1
    best = int(np.argmax(hits))
    return {
        "images": len(rows),
        "accuracy": correct / len(rows),
        "box_accuracy_at_0.2": hits[20] / len(rows),
        "max_box_acc": hits[best] / len(rows),
        "best_threshold": float(THRESHOLDS[best]),
        "centred_baseline": centred_baseline(rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--val-per-class", type=int, default=25)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", help="folder for data, run and cache (default: a temp dir)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="gapcam-bench-"))
    data, run = work / "data", work / "run"
    if not (data / "synth.json").is_file():
        generate(
            data,
            classes=args.classes,
            per_class=args.per_class,
            val_per_class=args.val_per_class,
            size=args.size,
            seed=args.seed,
        )
    started = time.perf_counter()
    report = train_classifier(data, run, cache_dir=work / "cache", overwrite=True, seed=args.seed)
    seconds = time.perf_counter() - started
    figures = localization(run, data / "val")
    print(
        f"data: {data} ({args.classes} classes, {args.per_class} train + "
        f"{args.val_per_class} val per class, {args.size}px); run: {run}"
    )
    print(f"train (features + head): {seconds:.1f} s, best epoch {report.metrics['best_epoch']}")
    for key, value in figures.items():
        print(f"{key:>22}: {value:.3f}" if isinstance(value, float) else f"{key:>22}: {value}")


if __name__ == "__main__":
    main()

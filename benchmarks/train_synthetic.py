"""Train the default backbone's head on a synthetic shapes dataset and measure localization.

    python benchmarks/train_synthetic.py [--classes 4 --per-class 60 --val-per-class 25]

Generates the data with ``gapcam.train.synthetic`` (seeded), trains with ``gapcam.train`` (frozen
backbone, cached features), then on the validation split prints classification accuracy and,
with the CAM of the true class (GT-known), box accuracy at the default threshold 0.2 and
MaxBoxAcc (best threshold in 0.00..0.99, largest 8-connected component, IoU >= 0.5; scored by
``gapcam.eval.metrics``, as ``gapcam evaluate`` scores them), against a centred-box baseline (a
box centred in the image with the mean true box's width and height).
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import numpy as np

from gapcam import Localizer, load_checkpoint, train_classifier
from gapcam.eval.metrics import THRESHOLDS, BoxAccuracy, component_boxes, inclusive_iou, sweep_ious
from gapcam.train.synthetic import CSV_NAME, generate


def read_boxes(split: Path) -> list[tuple[Path, str, tuple[int, int, int, int]]]:
    """The split's ``boxes.csv``: inclusive pixel boxes (x1, y1 the last column and row), the
    convention of ``gapcam evaluate`` (``gapcam.eval.metrics``), kept as they are."""
    with (split / CSV_NAME).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [
        (split / r["path"], r["label"], (int(r["x0"]), int(r["y0"]), int(r["x1"]), int(r["y1"])))
        for r in rows
    ]


def centred_baseline(rows: list[tuple[Path, str, tuple[int, int, int, int]]]) -> float:
    """Share of true boxes with IoU >= 0.5 with one box of the mean true width and height,
    centred in the image."""
    from PIL import Image

    truths = np.array([box for _, _, box in rows], dtype=np.float64)
    width, height = (truths[:, 2:] - truths[:, :2] + 1).mean(axis=0)  # inclusive: + 1 pixel
    image_w, image_h = Image.open(rows[0][0]).size
    left, top = (image_w - width) / 2, (image_h - height) / 2
    centred = [left, top, left + width - 1, top + height - 1]
    return float((inclusive_iou([centred], truths)[0] >= 0.5).mean())


def localization(run: Path, split: Path) -> dict[str, float]:
    """Accuracy, box accuracy @0.2, MaxBoxAcc (GT-known) and the centred baseline on ``split``,
    scored as ``gapcam evaluate`` scores them."""
    rows = read_boxes(split)
    localizer = Localizer(model=load_checkpoint(run))
    boxes = BoxAccuracy(iou_thresholds=(0.5,))
    correct = 0
    for path, label, truth in rows:
        result = localizer(path, classes=[label])  # the CAM of the true class
        correct += result.predictions[0].name == label
        boxes.add(*sweep_ious(component_boxes(result.cam(0)), [truth]))
    summary = boxes.summary()
    largest = boxes.curves()["largest"][0] / 100  # box accuracy per threshold, IoU 0.5
    return {
        "images": len(rows),
        "accuracy": correct / len(rows),
        "box_accuracy_at_0.2": float(largest[list(THRESHOLDS).index(0.2)]),
        "max_box_acc": summary["max_box_acc"] / 100,
        "best_threshold": summary["max_box_acc_threshold"],
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

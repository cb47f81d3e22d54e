"""The quality ladder: box quality against cost, for every offline model and view setting.

    python benchmarks/quality_ladder.py                         # everything (about 20 min)
    python benchmarks/quality_ladder.py --models efficientnet_lite0 --configs cam os16
    python benchmarks/quality_ladder.py --plot docs/ladder.png --json ladder.json

On the ILSVRC dev set (``--data DIR``, by default $GAPCAM_ILSVRC_DEV; docs/evaluate.md says
how to build it), for each model and view setting (``CONFIGS``, chosen before measuring:
the single pass, a dilated last stage, a 1.25x input, their combination, and the multi-view
settings), every image's map of its ground-truth class is scored as ``gapcam evaluate``
scores it (min-max normalised at the image's size, the wsolevaluation threshold sweep):

- MaxBoxAccV2 with a 90% bootstrap interval (2,000 resamples of the images, fixed seed;
  each resample takes its own best thresholds), and the paired difference to the same
  model's single pass with its interval;
- MaxBoxAcc, GT-known loc and top-1 loc at the box threshold 0.2, top-1 classification;
- images/s of ``Localizer.explain`` (forward passes, CAMs, upsampling, normalisation and the
  boxes at 0.2: what a user waits for; eager backend, batch 16, all of torch's threads),
  and its cost relative to efficientnet_lite0's single pass, all measured in this run.

Ensembles (``ENSEMBLES``): the mean of the three models' normalised maps at the image's size
(each model's own min-max map), scored the same way; their cost is the sum of the members'.
The images of one run are the same for every row, so differences between rows are paired.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from devset import add_data_option, dev_set

from gapcam import images
from gapcam.eval import metrics
from gapcam.eval.datasets import Sample, load_dataset
from gapcam.eval.evaluate import label_resolver
from gapcam.localizer import Localizer
from gapcam.models import build_model

MODELS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")

#: view settings, chosen a priori (scales are factors of the model's input size)
CONFIGS: dict[str, dict[str, Any]] = {
    "cam": {},
    "os16": {"output_stride": 16},
    "os8": {"output_stride": 8},
    "hflip": {"hflip": True},
    "os16 hflip": {"output_stride": 16, "hflip": True},
    "x1.25": {"scales": (1.25,)},
    "x1.25 os16": {"scales": (1.25,), "output_stride": 16},
    "x1.25 os16 hflip": {"scales": (1.25,), "output_stride": 16, "hflip": True},
    "x1.5 os16": {"scales": (1.5,), "output_stride": 16},
    "x1+1.5": {"scales": (1.0, 1.5)},
    "x1+1.5 os16": {"scales": (1.0, 1.5), "output_stride": 16},
}

#: ensembles of the three models, each at a view setting of ``CONFIGS``
ENSEMBLES = ("cam", "os16")
RESAMPLES = 2000
SEED = 0
BATCH = 16
IOUS = np.asarray(metrics.IOU_THRESHOLDS)


@dataclass
class Row:
    """One model (or ensemble) at one view setting: per-image outcomes and the time taken."""

    model: str
    config: str
    any_iou: np.ndarray  # images x thresholds: best IoU of any component's box
    largest_iou: np.ndarray  # images x thresholds: IoU of the largest component's box
    gt_known: np.ndarray  # images: the box at 0.2 has IoU >= 0.5
    top1: np.ndarray  # images: top-1 class is the label
    seconds: float
    maps: list[np.ndarray] = field(default_factory=list, repr=False)

    @property
    def per_second(self) -> float:
        return len(self.top1) / self.seconds


def max_box_acc_v2(any_iou: np.ndarray) -> float:
    """Mean over IoU 0.3/0.5/0.7 of the accuracy at each one's best threshold (%)."""
    hits = any_iou[None, :, :] >= IOUS[:, None, None]  # iou x images x thresholds
    return float(hits.mean(axis=1).max(axis=1).mean() * 100)


def max_box_acc(largest_iou: np.ndarray) -> float:
    return float((largest_iou >= 0.5).mean(axis=0).max() * 100)


def bootstrap(rows: Sequence[np.ndarray], statistic: Any) -> np.ndarray:
    """``statistic`` of each array of ``rows`` on the same 2,000 resamples of the images."""
    generator = np.random.default_rng(SEED)
    count = len(rows[0])
    picks = generator.integers(0, count, size=(RESAMPLES, count))
    return np.array([[statistic(row[pick]) for row in rows] for pick in picks])


def interval(values: np.ndarray) -> tuple[float, float]:
    low, high = np.percentile(values, [5, 95])
    return float(low), float(high)


def run(
    model_name: str, config: str, samples: Sequence[Sample], keep_maps: bool, threads: int
) -> Row:
    localizer = Localizer(build_model(model_name), **CONFIGS[config])
    torch.set_num_threads(threads)
    loaded_all = [images.load_image(s.path, name=s.name) for s in samples]
    localizer.explain(loaded_all[:2], classes_per_image=[[s.label] for s in samples[:2]])  # warm
    any_iou, largest_iou, gt_known, top1, maps = [], [], [], [], []
    seconds = 0.0
    for start in range(0, len(samples), BATCH):
        batch, loaded = samples[start : start + BATCH], loaded_all[start : start + BATCH]
        tick = time.perf_counter()
        results = localizer.explain(
            loaded, classes_per_image=[[s.label] for s in batch], predictions=5
        )
        seconds += time.perf_counter() - tick
        for sample, result in zip(batch, results, strict=True):
            normalized = result.normalized[0]
            largest, best = metrics.sweep_ious(metrics.component_boxes(normalized), sample.boxes)
            any_iou.append(best)
            largest_iou.append(largest)
            found = result.maps[0].boxes
            iou = 0.0
            if found:
                box = metrics.edges_to_inclusive(found[0].as_list())
                iou = float(metrics.inclusive_iou(box, sample.boxes).max())
            gt_known.append(iou >= 0.5)
            top1.append(result.predictions[0].index == sample.label)
            if keep_maps:
                maps.append(normalized.astype(np.float32))
    return Row(
        model_name,
        config,
        np.asarray(any_iou),
        np.asarray(largest_iou),
        np.asarray(gt_known),
        np.asarray(top1),
        seconds,
        maps,
    )


def ensemble(members: Sequence[Row], samples: Sequence[Sample]) -> Row:
    """The mean of the members' normalised maps, scored like one model's."""
    any_iou, largest_iou = [], []
    for i, sample in enumerate(samples):
        mean = np.mean([m.maps[i] for m in members], axis=0)
        largest, best = metrics.sweep_ious(metrics.component_boxes(mean), sample.boxes)
        any_iou.append(best)
        largest_iou.append(largest)
    return Row(
        "ensemble of 3",
        members[0].config,
        np.asarray(any_iou),
        np.asarray(largest_iou),
        np.full(len(samples), np.nan),
        np.full(len(samples), np.nan),
        sum(m.seconds for m in members),
    )


def table(rows: Sequence[Row], reference: Row) -> tuple[str, list[dict[str, Any]]]:
    lines = [
        "| model | preset / views | MaxBoxAccV2 [90% CI] | vs its single pass [90% CI] | "
        "MaxBoxAcc | GT-known | top-1 loc | top-1 cls | img/s | x Lite0 time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    records = []
    for row in rows:
        base = next(
            (r for r in rows if r.model == row.model and r.config == "cam"), reference
        )
        samples = bootstrap([row.any_iou, base.any_iou], max_box_acc_v2)
        low, high = interval(samples[:, 0])
        d_low, d_high = interval(samples[:, 0] - samples[:, 1])
        v2 = max_box_acc_v2(row.any_iou)
        diff = v2 - max_box_acc_v2(base.any_iou)
        cost = row.seconds / reference.seconds * len(reference.top1) / len(row.top1)
        known = np.nanmean(row.gt_known) * 100 if not np.isnan(row.gt_known).all() else None
        top1 = np.nanmean(row.top1) * 100 if not np.isnan(row.top1).all() else None
        loc = (
            np.mean(row.gt_known.astype(bool) & row.top1.astype(bool)) * 100
            if known is not None
            else None
        )

        def cell(value: float | None) -> str:
            return "-" if value is None else f"{value:.1f}"

        paired = "-" if row is base else f"{diff:+.1f} [{d_low:+.1f}, {d_high:+.1f}]"
        lines.append(
            f"| {row.model} | {row.config} | **{v2:.1f}** [{low:.1f}, {high:.1f}] | {paired} | "
            f"{max_box_acc(row.largest_iou):.1f} | {cell(known)} | {cell(loc)} | {cell(top1)} | "
            f"{row.per_second:.1f} | {cost:.2f} |"
        )
        records.append(
            {
                "model": row.model,
                "config": row.config,
                "max_box_acc_v2": v2,
                "ci90": [low, high],
                "vs_single_pass": None if row is base else [diff, d_low, d_high],
                "max_box_acc": max_box_acc(row.largest_iou),
                "gt_known": known,
                "top1_loc": loc,
                "top1_cls": top1,
                "images_per_second": row.per_second,
                "cost": cost,
            }
        )
    return "\n".join(lines), records


def plot(records: Sequence[dict[str, Any]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8.0, 5.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    markers = {"efficientnet_lite0": "o", "efficientnet_lite1": "s", "efficientnet_lite2": "^"}
    for model in dict.fromkeys(r["model"] for r in records):
        mine = sorted((r for r in records if r["model"] == model), key=lambda r: r["cost"])
        costs = [r["cost"] for r in mine]
        values = [r["max_box_acc_v2"] for r in mine]
        errors = [
            [r["max_box_acc_v2"] - r["ci90"][0] for r in mine],
            [r["ci90"][1] - r["max_box_acc_v2"] for r in mine],
        ]
        axes.errorbar(
            costs, values, yerr=errors, fmt=markers.get(model, "D"), capsize=2, label=model
        )
        for r in mine:
            axes.annotate(
                r["config"], (r["cost"], r["max_box_acc_v2"]), fontsize=7,
                textcoords="offset points", xytext=(4, 3),
            )
    axes.set_xscale("log")
    axes.set_xlabel("time per image, x efficientnet_lite0's single pass (log scale)")
    axes.set_ylabel("MaxBoxAccV2 (%), 90% bootstrap interval")
    axes.set_title("ILSVRC dev set (300 images): box quality against cost")
    axes.grid(True, alpha=0.3)
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_option(parser)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--limit", type=int, help="only the first N images (a quick look)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--plot", type=Path, help="write the quality/cost figure here (PNG)")
    parser.add_argument("--json", type=Path, help="write the table's figures here")
    args = parser.parse_args()
    reference_model = build_model(MODELS[0])
    dataset = load_dataset(dev_set(args.data), label_resolver(reference_model))
    samples = dataset.samples[: args.limit] if args.limit else dataset.samples
    keep = set(ENSEMBLES) if set(args.models) == set(MODELS) else set()
    rows: list[Row] = []
    for name in args.models:
        for config in args.configs:
            started = time.perf_counter()
            rows.append(run(name, config, samples, config in keep, args.threads))
            print(
                f"{name} {config}: MaxBoxAccV2 {max_box_acc_v2(rows[-1].any_iou):.2f} "
                f"({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
    for config in keep & set(args.configs):
        rows.append(ensemble([r for r in rows if r.config == config and r.maps], samples))
        for row in rows:
            row.maps = [] if row.config == config else row.maps
    reference = next((r for r in rows if r.model == MODELS[0] and r.config == "cam"), None)
    if reference is None:
        reference = run(MODELS[0], "cam", samples, False, args.threads)
    text, records = table(rows, reference)
    print(f"\n{len(samples)} images, {args.threads} threads, torch {torch.__version__}\n")
    print(text)
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))
    if args.plot:
        plot(records, args.plot)


if __name__ == "__main__":
    main()

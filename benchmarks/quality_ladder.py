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
  and its cost relative to efficientnet_lite0's single pass, all measured in this run: after
  the quality pass, every row is timed on the same ``--timing-images`` images in turn,
  ``--rounds`` times round-robin, and keeps its fastest round (a busy neighbour on a shared
  machine slows a round, never speeds one up).

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
        return 1.0 / self.seconds


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


def run(localizer: Localizer, config: str, samples: Sequence[Sample], keep_maps: bool) -> Row:
    """The quality pass of one row (untimed)."""
    any_iou, largest_iou, gt_known, top1, maps = [], [], [], [], []
    for start in range(0, len(samples), BATCH):
        batch = samples[start : start + BATCH]
        loaded = [images.load_image(s.path, name=s.name) for s in batch]
        results = localizer.explain(
            loaded, classes_per_image=[[s.label] for s in batch], predictions=5
        )
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
        localizer.gap_model.name,
        config,
        np.asarray(any_iou),
        np.asarray(largest_iou),
        np.asarray(gt_known),
        np.asarray(top1),
        0.0,
        maps,
    )


def time_rows(
    rows: Sequence[Row], localizers: Sequence[Localizer], samples: Sequence[Sample], rounds: int
) -> None:
    """Seconds per image of each row's ``explain`` on ``samples``: round-robin over the rows,
    ``rounds`` times, the fastest round kept (``Row.seconds`` holds it per image)."""
    loaded = [images.load_image(s.path, name=s.name) for s in samples]
    classes = [[s.label] for s in samples]
    best = [float("inf")] * len(rows)
    for localizer in localizers:  # warm-up: first calls allocate
        localizer.explain(loaded[:BATCH], classes_per_image=classes[:BATCH])
    for _ in range(rounds):
        for i, localizer in enumerate(localizers):
            tick = time.perf_counter()
            for start in range(0, len(loaded), BATCH):
                localizer.explain(
                    loaded[start : start + BATCH],
                    classes_per_image=classes[start : start + BATCH],
                    predictions=5,
                )
            best[i] = min(best[i], (time.perf_counter() - tick) / len(loaded))
    for row, seconds in zip(rows, best, strict=True):
        row.seconds = seconds


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
        members[0].config.split(" (")[0],
        np.asarray(any_iou),
        np.asarray(largest_iou),
        np.full(len(samples), np.nan),
        np.full(len(samples), np.nan),
        sum(m.seconds for m in members),
    )


def presets_of(localizer: Localizer, model: Any) -> str:
    """`` (preset NAME)`` when ``localizer`` runs the views of the model's preset NAME."""
    mine = (localizer.views(), localizer.output_stride)
    names = []
    for name in ("cam", "fine", "best"):
        other = Localizer.from_preset(name, model)
        if (other.views(), other.output_stride) == mine:
            names.append(name)
    if not names:
        return ""
    return f" (preset{'s' if len(names) > 1 else ''} {', '.join(names)})"


def table(rows: Sequence[Row], reference: Row) -> tuple[str, list[dict[str, Any]]]:
    lines = [
        "| model | preset / views | MaxBoxAccV2 [90% CI] | vs its single pass [90% CI] | "
        "MaxBoxAcc | GT-known | top-1 loc | top-1 cls | img/s | x Lite0 time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    records = []
    for row in rows:
        base = next(
            (r for r in rows if r.model == row.model and r.config.startswith("cam")), reference
        )
        samples = bootstrap([row.any_iou, base.any_iou], max_box_acc_v2)
        low, high = interval(samples[:, 0])
        d_low, d_high = interval(samples[:, 0] - samples[:, 1])
        v2 = max_box_acc_v2(row.any_iou)
        diff = v2 - max_box_acc_v2(base.any_iou)
        cost = row.seconds / reference.seconds
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
    """MaxBoxAccV2 against cost: every row a faint point, each model's presets joined and
    labelled, with their 90% intervals."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8.0, 5.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    styles = {
        "efficientnet_lite0": ("o", "tab:blue"),
        "efficientnet_lite1": ("s", "tab:orange"),
        "efficientnet_lite2": ("^", "tab:green"),
    }
    for model in dict.fromkeys(r["model"] for r in records):
        marker, colour = styles.get(model, ("D", "tab:red"))
        mine = sorted((r for r in records if r["model"] == model), key=lambda r: r["cost"])
        axes.scatter(
            [r["cost"] for r in mine],
            [r["max_box_acc_v2"] for r in mine],
            marker=marker,
            color=colour,
            alpha=0.25,
            s=18,
        )
        presets = [r for r in mine if "(preset" in r["config"]] or mine[:1]
        axes.errorbar(
            [r["cost"] for r in presets],
            [r["max_box_acc_v2"] for r in presets],
            yerr=[
                [r["max_box_acc_v2"] - r["ci90"][0] for r in presets],
                [r["ci90"][1] - r["max_box_acc_v2"] for r in presets],
            ],
            fmt=f"-{marker}",
            color=colour,
            capsize=3,
            label=model,
        )
        for r in presets:
            label = r["config"].split("(", 1)[-1].rstrip(")") if "(" in r["config"] else ""
            axes.annotate(
                label.replace("presets ", "").replace("preset ", ""),
                (r["cost"], r["max_box_acc_v2"]),
                fontsize=8,
                color=colour,
                textcoords="offset points",
                xytext=(5, -12),
            )
    axes.set_xscale("log")
    axes.set_xlabel("time per image, x efficientnet_lite0's single pass (log scale)")
    axes.set_ylabel("MaxBoxAccV2 (%); presets with 90% bootstrap intervals")
    axes.set_title("ILSVRC dev set, 300 images: box quality against cost (faint: other views)")
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
    parser.add_argument("--timing-images", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--plot", type=Path, help="write the quality/cost figure here (PNG)")
    parser.add_argument("--json", type=Path, help="write the table's figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = {name: build_model(name) for name in dict.fromkeys([MODELS[0], *args.models])}
    dataset = load_dataset(dev_set(args.data), label_resolver(models[MODELS[0]]))
    samples = dataset.samples[: args.limit] if args.limit else dataset.samples
    keep = set(ENSEMBLES) if set(args.models) == set(MODELS) else set()
    rows: list[Row] = []
    localizers: list[Localizer] = []
    for name in args.models:
        for config in args.configs:
            started = time.perf_counter()
            localizers.append(Localizer(models[name], **CONFIGS[config]))
            rows.append(run(localizers[-1], config, samples, config in keep))
            print(
                f"{name} {config}: MaxBoxAccV2 {max_box_acc_v2(rows[-1].any_iou):.2f} "
                f"({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
    if not any(r.model == MODELS[0] and r.config == "cam" for r in rows):
        localizers.append(Localizer(models[MODELS[0]]))
        rows.append(run(localizers[-1], "cam", samples, False))
    for row, localizer in zip(rows, localizers, strict=True):
        row.config += presets_of(localizer, models[row.model])
    time_rows(rows, localizers, samples[: args.timing_images], args.rounds)
    reference = next(r for r in rows if r.model == MODELS[0] and r.config.startswith("cam"))
    for config in keep & set(args.configs):
        members = [r for r in rows if r.config.split(" (")[0] == config and r.maps]
        rows.append(ensemble(members, samples))
        for row in members:
            row.maps = []
    text, records = table(rows, reference)
    print(
        f"\n{len(samples)} images; time: the fastest of {args.rounds} rounds on "
        f"{min(args.timing_images, len(samples))} images, {args.threads} threads, "
        f"torch {torch.__version__}\n"
    )
    print(text)
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))
    if args.plot:
        plot(records, args.plot)


if __name__ == "__main__":
    main()

"""Box normalisation for ``gapcam localize``: ``minmax`` (the default) against ``max``.

    python benchmarks/normalize_boxes.py                      # the three offline models
    python benchmarks/normalize_boxes.py --models efficientnet_lite0 --limit 60

On the ILSVRC dev set (``--data DIR``, by default $GAPCAM_ILSVRC_DEV; docs/evaluate.md says
how to build it), for each model: the boxes ``localize`` itself draws (threshold 0.2, the
largest 8-connected component of the normalised map at the image's size), once for the map
of the ground-truth class and once for the map of the top-1 predicted class. An image counts
when its box has IoU >= 0.5 with any of its ground-truth boxes, inclusive pixels, as
``gapcam evaluate`` scores GT-known localization (``gapcam.eval.metrics``).

Both normalisations come from the same forward pass: the raw low-resolution maps that
``Localizer.explain`` returns (``ClassMap.low_res``) are upsampled to the image as
``gapcam.result.normalized_maps`` does, then normalised both ways (``gapcam.cam.normalize``).
The ground-truth class is mapped in the timed pass (``classes_per_image``); where the top-1
class differs, its map comes from a second, untimed pass over those images. The ``minmax``
boxes of the ground-truth maps are checked against the boxes ``explain`` drew itself.

Printed per model and normalisation: box accuracy for each class, the paired difference
``max - minmax`` with a 90% paired bootstrap interval (2,000 resamples of the images, fixed
seed) and how many images each way changed, MaxBoxAccV2 / MaxBoxAcc of the ground-truth maps
(the wsolevaluation threshold sweep, on each normalisation's map), images/s of the pass and
the post-processing time of each normalisation (upsample, normalise, boxes).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from devset import add_data_option, dev_set

from gapcam import cam, images
from gapcam.boxes import boxes_from_map
from gapcam.eval import metrics
from gapcam.eval.datasets import Sample, load_dataset
from gapcam.eval.evaluate import label_resolver
from gapcam.localizer import Localizer
from gapcam.models import build_model
from gapcam.result import Result, map_size, scale_boxes

MODELS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
MODES = ("minmax", "max")
RESAMPLES = 2000
SEED = 0
BATCH = 16


@dataclass
class Tally:
    """Per-image hits of one normalisation, and what scoring it cost."""

    gt: list[bool] = field(default_factory=list)
    top1: list[bool] = field(default_factory=list)
    sweep: metrics.BoxAccuracy = field(default_factory=metrics.BoxAccuracy)
    seconds: float = 0.0


def box_hit(low: np.ndarray, result: Result, sample: Sample, mode: str, loc: Localizer) -> bool:
    """Whether ``localize``'s box (largest component) of the raw map ``low``, normalised by
    ``mode``, has IoU >= 0.5 with any ground-truth box."""
    box = localize_box(low, result, mode, loc)
    if box is None:
        return False
    found = metrics.edges_to_inclusive(box)
    return bool(metrics.inclusive_iou(found, sample.boxes).max() >= 0.5)


def normalized_map(low: np.ndarray, result: Result, mode: str) -> tuple[np.ndarray, tuple]:
    """The map boxes are drawn on (``result.normalized_maps`` at ``map_size``), by ``mode``."""
    width, height = result.size
    size = map_size(width, height)
    up = cam.upsample(torch.from_numpy(low)[None, None], size, result.region)
    return cam.normalize(up, mode)[0, 0].numpy(), size


def localize_box(low: np.ndarray, result: Result, mode: str, loc: Localizer) -> list[int] | None:
    heat, size = normalized_map(low, result, mode)
    width, height = result.size
    found = scale_boxes(boxes_from_map(heat, loc.threshold, loc.min_area), size, (height, width))
    return found[0].as_list() if found else None


def paired(a: Sequence[bool], b: Sequence[bool], rng: np.random.Generator) -> tuple[float, ...]:
    """Mean of b - a in points, its 90% paired bootstrap interval, and (b only, a only)."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    diff = y - x
    picks = rng.integers(0, len(diff), size=(RESAMPLES, len(diff)))
    means = diff[picks].mean(axis=1) * 100
    low, high = np.percentile(means, [5, 95])
    return diff.mean() * 100, low, high, int((diff > 0).sum()), int((diff < 0).sum())


def run_model(name: str, samples: Sequence[Sample], loaded: list, sweep: bool) -> dict:
    loc = Localizer(build_model(name))
    loc.explain(loaded[:BATCH], classes_per_image=[[s.label] for s in samples[:BATCH]])  # warm
    results: list[Result] = []
    started = time.perf_counter()
    for i in range(0, len(loaded), BATCH):
        batch = samples[i : i + BATCH]
        results += loc.explain(loaded[i : i + BATCH], classes_per_image=[[s.label] for s in batch])
    elapsed = time.perf_counter() - started

    # the top-1 class's map where it is not the ground truth's: a second pass, untimed
    other = [i for i, r in enumerate(results) if r.top.index != samples[i].label]
    top_maps = {i: r.maps[0].low_res for i, r in enumerate(results) if i not in other}
    for j in range(0, len(other), BATCH):
        chunk = other[j : j + BATCH]
        extra = loc.explain(
            [loaded[i] for i in chunk], classes_per_image=[[results[i].top.index] for i in chunk]
        )
        for i, r in zip(chunk, extra, strict=True):
            assert r.top.index == results[i].top.index, "the top-1 class moved between passes"
            top_maps[i] = r.maps[0].low_res

    tallies = {mode: Tally() for mode in MODES}
    mismatched = 0
    for i, (sample, result) in enumerate(zip(samples, results, strict=True)):
        gt_low = result.maps[0].low_res
        for mode, tally in tallies.items():
            tick = time.perf_counter()
            tally.gt.append(box_hit(gt_low, result, sample, mode, loc))
            tally.top1.append(box_hit(top_maps[i], result, sample, mode, loc))
            tally.seconds += (time.perf_counter() - tick) / 2
            if sweep:
                heat, _ = normalized_map(gt_low, result, mode)
                tally.sweep.add(*metrics.sweep_ious(metrics.component_boxes(heat), sample.boxes))
        own = result.maps[0].boxes
        mine = localize_box(gt_low, result, "minmax", loc)
        mismatched += (own[0].as_list() if own else None) != mine
    top1_cls = np.mean([r.top.index == s.label for r, s in zip(results, samples, strict=True)])
    return {
        "tallies": tallies,
        "rate": len(results) / elapsed,
        "count": len(results),
        "mismatched": mismatched,
        "top1_cls": top1_cls * 100,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_data_option(parser)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--limit", type=int, default=None, help="the first N images only")
    parser.add_argument(
        "--no-sweep", action="store_true", help="skip MaxBoxAccV2 / MaxBoxAcc (the sweep)"
    )
    args = parser.parse_args()
    data = dev_set(args.data)
    dataset = load_dataset(data, label_resolver(build_model(args.models[0])), limit=args.limit)
    samples = [s for s in dataset.samples if s.boxes]
    loaded = [images.load_image(s.path, name=s.name) for s in samples]
    print(
        f"{len(samples)} images of {data}; threshold 0.2, largest component, IoU >= 0.5 "
        f"(inclusive pixels); 90% paired bootstrap, {RESAMPLES} resamples, seed {SEED}; "
        f"torch threads {torch.get_num_threads()}\n"
    )
    print(
        "| model | norm | box acc GT | box acc top-1 | max - minmax GT [90% CI] (+/-) | "
        "max - minmax top-1 [90% CI] (+/-) | MaxBoxAccV2 | MaxBoxAcc | pass img/s | "
        "post ms/img |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    notes = []
    for name in args.models:
        found = run_model(name, samples, loaded, not args.no_sweep)
        tallies = found["tallies"]
        base = tallies["minmax"]
        for mode, tally in tallies.items():
            if mode == "minmax":
                gt_diff = top_diff = "-"
            else:
                rng = np.random.default_rng(SEED)
                gt_diff = "{:+.1f} [{:+.1f}, {:+.1f}] (+{}/-{})".format(
                    *paired(base.gt, tally.gt, rng)
                )
                rng = np.random.default_rng(SEED)
                top_diff = "{:+.1f} [{:+.1f}, {:+.1f}] (+{}/-{})".format(
                    *paired(base.top1, tally.top1, rng)
                )
            summary = tally.sweep.summary() if tally.sweep.count else {}
            v2 = f"{summary['max_box_acc_v2']:.1f}" if summary else "-"
            v1 = (
                f"{summary['max_box_acc']:.1f} @{summary['max_box_acc_threshold']:.2f}"
                if summary
                else "-"
            )
            print(
                f"| {name} | {mode} | {np.mean(tally.gt) * 100:.1f} | "
                f"{np.mean(tally.top1) * 100:.1f} | {gt_diff} | {top_diff} | {v2} | {v1} | "
                f"{found['rate']:.1f} | {tally.seconds / found['count'] * 1000:.1f} |",
                flush=True,
            )
        notes.append(
            f"{name}: top-1 cls {found['top1_cls']:.1f}; minmax GT boxes differing from "
            f"explain's own: {found['mismatched']}"
        )
    print()
    print("\n".join(notes))


if __name__ == "__main__":
    main()

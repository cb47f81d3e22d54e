"""Localization quality and cost of gapcam's gradient-free view options on the ILSVRC dev set.

    python benchmarks/evaluate_options.py [--data DIR] [--threads 1]

``--data``: the ILSVRC dev set folder, by default the one named by $GAPCAM_ILSVRC_DEV
(docs/evaluate.md says how to build it).

Prints one markdown row per option: MaxBoxAccV2 (and per IoU), MaxBoxAcc, GT-known and top-1
loc at 0.2, top-1 classification, and the cost per image (process CPU time, forward passes
included) with its ratio to vanilla CAM measured in the same run. One thread by default, so
that CPU time is a stable measure on a shared machine.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from devset import add_data_option, dev_set

from gapcam.eval.datasets import load_dataset
from gapcam.eval.evaluate import evaluate, label_resolver
from gapcam.localizer import Localizer
from gapcam.models import build_model

OPTIONS: list[tuple[str, dict[str, Any]]] = [
    ("vanilla CAM (224)", {}),
    ("normalize=max", {"normalize": "max"}),
    ("input_size=256", {"input_size": 256}),
    ("input_size=288 (preset fine)", {"input_size": 288}),
    ("input_size=320", {"input_size": 320}),
    ("input_size=384", {"input_size": 384}),
    ("hflip", {"hflip": True}),
    ("scales=(1, 1.25)", {"scales": (1.0, 1.25)}),
    ("scales=(1, 1.5) (preset best)", {"scales": (1.0, 1.5)}),
    ("scales=(1, 1.25, 1.5)", {"scales": (1.0, 1.25, 1.5)}),
    ("input_size=256 + hflip", {"input_size": 256, "hflip": True}),
    ("input_size=288 + hflip", {"input_size": 288, "hflip": True}),
    ("scales=(1, 1.25) + hflip", {"scales": (1.0, 1.25), "hflip": True}),
    ("scales=(1, 1.5) + hflip", {"scales": (1.0, 1.5), "hflip": True}),
    ("input_size=288 + scales=(1, 1.25)", {"input_size": 288, "scales": (1.0, 1.25)}),
    ("scales=(1, 1.25, 1.5) + hflip", {"scales": (1.0, 1.25, 1.5), "hflip": True}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_option(parser)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="*", help="substrings of the option names to run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build_model("efficientnet_lite0")
    dataset = load_dataset(dev_set(args.data), label_resolver(model))
    print(
        "| option | MaxBoxAccV2 | IoU .3/.5/.7 | MaxBoxAcc (thr) | GT-known@.2 | top-1 loc | "
        "top-1 cls | CPU s/img | x vanilla |\n|---|---|---|---|---|---|---|---|---|"
    )
    base = None
    for name, option in OPTIONS:
        if args.only and not any(s in name for s in args.only):
            continue
        localizer = Localizer(model, **option)
        started = time.process_time()
        report = evaluate(dataset, localizer, batch_size=16)
        cost = (time.process_time() - started) / len(dataset.samples)
        base = base or cost
        m = report["metrics"]
        per = "/".join(f"{v['accuracy']:.1f}" for v in m["max_box_acc_v2_per_iou"].values())
        print(
            f"| {name} | {m['max_box_acc_v2']:.2f} | {per} | {m['max_box_acc']:.1f} "
            f"({m['max_box_acc_threshold']:.2f}) | {m['gt_known_loc']:.1f} | {m['top1_loc']:.1f} "
            f"| {m['top1_cls']:.1f} | {cost:.3f} | {cost / base:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()

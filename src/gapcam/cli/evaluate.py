"""``gapcam evaluate``: read the dataset, evaluate, print the table, write JSON and plot."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from gapcam.cli import options
from gapcam.errors import GapcamError
from gapcam.types import DATASET_LAYOUTS

#: paths the user typed are shown whole (control characters escaped)
PATH_LIMIT = 4096

EXAMPLES = """examples:
  gapcam evaluate "$GAPCAM_ILSVRC_DEV"      # the ILSVRC dev set (docs/evaluate.md)
  gapcam evaluate data/ --json eval.json --plot eval.png
  gapcam evaluate boxes.csv --model resnet50 --limit 100
  gapcam evaluate VOC2012/ --split val --preset best --skip-invalid
"""


def add(commands: Any) -> None:
    p = commands.add_parser(
        "evaluate",
        help="measure localization on box-annotated images (MaxBoxAcc, top-1 loc, ...)",
        description="Classify every image, compute the CAM of its ground-truth class in the "
        "same forward pass, and score boxes against the annotations: top-1/top-5 "
        "classification, GT-known/top-1/top-5 localization at --threshold, MaxBoxAcc and "
        "MaxBoxAccV2 (Choe et al., CVPR 2020) over thresholds 0.00..0.99, PxAP with masks. "
        "DATA: wsolevaluation metadata, a VOC/ImageNet XML folder, or a CSV file of "
        "path,label,x0,y0,x1,y1 rows (docs/evaluate.md).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLES,
    )
    p.add_argument("data", metavar="DATA", help="dataset folder or CSV file")
    p.add_argument("--layout", choices=DATASET_LAYOUTS, default="auto")
    p.add_argument("--split", help="wsol split folder, VOC ImageSets/Main/SPLIT.txt, CLS-LOC/SPLIT")
    p.add_argument("--images", metavar="DIR", help="folder image paths are relative to")
    options.add_model(p)
    p.add_argument(
        "--threshold",
        type=options.fraction,
        default=0.2,
        help="box threshold for the fixed-threshold localization accuracies (default: %(default)s)",
    )
    options.add_views(p)
    p.add_argument("--json", metavar="FILE", help="write the report as JSON to FILE, or -")
    p.add_argument("--plot", metavar="PNG", help="write box accuracy vs threshold as PNG")
    p.add_argument("--batch-size", type=options.positive, default=16)
    p.add_argument("--limit", type=options.positive, metavar="N", help="only the first N images")
    p.add_argument(
        "--skip-invalid",
        action="store_true",
        help="leave out images with bad annotations (listed in the output) instead of stopping",
    )
    options.add_device(p)
    options.add_precision(p, "default: the first 32 images of DATA")
    p.add_argument("--overwrite", action="store_true", help="replace existing --json/--plot")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Exit 0 with the table printed; problems raise (the CLI prints them, exit 2)."""
    from gapcam.console import progress_bar, safe_text
    from gapcam.eval.datasets import load_dataset
    from gapcam.eval.evaluate import check_class_table, evaluate, label_resolver
    from gapcam.eval.report import format_table
    from gapcam.localizer import Localizer
    from gapcam.outputs import OutputGuard, write_json
    from gapcam.plots import box_accuracy_curve

    guard = OutputGuard((), overwrite=args.overwrite)
    targets = [Path(t) for t in (args.json, args.plot) if t and t != "-"]
    for target in targets:
        guard.claim(target)  # before minutes of work, not after (and not both one file)
    settings = options.localizer_options(args)
    calibrate = settings.get("precision") == "int8" and "calibration" not in settings
    if calibrate:  # int8 calibrates on the first images of DATA, known once it is read
        settings["precision"] = "float32"
    localizer = Localizer.from_options(settings)
    dataset = load_dataset(
        args.data,
        label_resolver(localizer.gap_model),
        layout=args.layout,
        split=args.split,
        images=args.images,
        limit=args.limit,
        skip_invalid=args.skip_invalid,
    )
    check_class_table(dataset, localizer.gap_model)
    for path in dataset.input_files():  # never written over, even with --overwrite
        guard.protect(path)
    for target in targets:
        guard.check(target)
    if calibrate:
        paths = (str(sample.path) for sample in dataset.samples)
        first = options.own_calibration(paths, localizer.max_pixels)
        localizer = dataclasses.replace(localizer, precision="int8", calibration=first)
    progress = progress_bar(len(dataset.samples), quiet=args.quiet)
    try:
        report = evaluate(dataset, localizer, batch_size=args.batch_size, on_batch=progress.update)
    finally:
        progress.close()
    report["settings"]["weights"] = args.weights
    out = sys.stderr if args.json == "-" else sys.stdout
    print(format_table(report, lambda m: options.flag_message(m, args.flags)), file=out)
    if args.plot:
        try:
            figure = box_accuracy_curve(report)
        except ValueError as exc:
            raise GapcamError(f"--plot: {exc}") from exc
        guard.write_bytes(Path(args.plot), figure, claimed=True)
        print(f"plot: {safe_text(args.plot, PATH_LIMIT)}", file=out)
    if args.json:
        write_json(report, args.json, guard, claimed=True)
        if args.json != "-":
            print(f"json: {safe_text(args.json, PATH_LIMIT)}", file=out)
    return 0

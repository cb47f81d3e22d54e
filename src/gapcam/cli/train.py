"""``gapcam train`` and ``gapcam synth``: train a GAP head on the user's classes; make shapes."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from gapcam.cli import options
from gapcam.console import safe_text
from gapcam.types import DEFAULT_MODEL, FINETUNE_MODES, OPTIMIZERS

#: a report line is shown whole, escaped (the training library bounds the names it quotes)
REPORT_LIMIT = 100_000
#: a path is shown whole, escaped
PATH_LIMIT = 4096

SYNTH_EXAMPLES = """examples:
  gapcam synth shapes/ --classes 4 --per-class 60
  gapcam synth shapes-big/ --classes 6 --per-class 200 --size 320 --seed 7
  gapcam train shapes/ --out shapes-run/
"""

EXAMPLES = """examples:
  gapcam synth shapes/ --classes 4 --per-class 60
  gapcam train shapes/ --out shapes-run/
  gapcam localize shapes/val/star --checkpoint shapes-run/
  gapcam train photos/ --model resnet50 --out run/ --finetune last-stage --epochs 5
  gapcam train photos/ --out run/ --resume --epochs 200
"""


def add(commands: Any) -> None:
    p = commands.add_parser(
        "train",
        help="train a GAP classifier head on your own classes (then localize them)",
        description="Train a linear head on a pretrained backbone for the classes of an image "
        "folder (DATA/<class>/*.jpg, or DATA/train/<class>/ + DATA/val/<class>/). By default "
        "the backbone is frozen and its pooled features are computed once and cached, so "
        "training takes seconds once the features exist. The best epoch on the validation "
        "split is saved to --out (safetensors + JSON), with a training curve, a confusion "
        "matrix and CAM overlays of a few validation images. Exit code 1: some images were "
        "unreadable and skipped (listed); 130: interrupted, the run so far is saved.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLES,
    )
    p.add_argument("data", help="image folder, one subfolder per class")
    p.add_argument("--out", required=True, metavar="RUN", help="run folder to create")
    p.add_argument(
        "--model", metavar="M", help=f"backbone (default: {DEFAULT_MODEL}); see `gapcam models`"
    )
    p.add_argument(
        "--weights", metavar="FILE", help="backbone weights file instead of the pretrained ones"
    )
    p.add_argument(
        "--finetune",
        choices=FINETUNE_MODES,
        help="none: head only, frozen backbone (default); last-stage: then also train the "
        "backbone's last stage, with augmentation (slower: every epoch runs the network)",
    )
    p.add_argument(
        "--epochs",
        type=options.positive,
        metavar="N",
        help="max epochs (default: 100, finetune: 10)",
    )
    p.add_argument(
        "--patience",
        type=options.positive,
        default=10,
        metavar="N",
        help="early stopping (default: 10)",
    )
    p.add_argument("--optimizer", choices=OPTIMIZERS, help="default: adamw")
    p.add_argument("--lr", type=float, help="learning rate of the head (default: 1e-3)")
    p.add_argument("--weight-decay", type=float, metavar="WD", help="default: 0.01")
    p.add_argument("--batch-size", type=options.positive, metavar="N", help="default: 32")
    p.add_argument(
        "--val-fraction",
        type=float,
        metavar="F",
        help="val share per class without val/ (default: 0.2)",
    )
    p.add_argument(
        "--seed", type=int, metavar="N", help="split, shuffling and augmentation seed (default: 0)"
    )
    p.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="feature cache (default: $GAPCAM_CACHE_DIR or ~/.cache/gapcam)",
    )
    p.add_argument("--no-cache", dest="cache", action="store_false", help="do not cache features")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    p.add_argument(
        "--overlays", type=int, default=8, metavar="N", help="val overlays to write (default: 8)"
    )
    options.add_device(p)
    p.add_argument(
        "-q", "--quiet", action="store_true", help="print only warnings, errors and the summary"
    )
    p.set_defaults(handler=run_train)
    s = commands.add_parser(
        "synth",
        help="write a synthetic dataset of shapes on clutter, with their true boxes",
        description="Shapes (circle, square, triangle, star, stripes, cross) at random "
        "positions, sizes, rotations and colours on cluttered backgrounds: OUT/train/<class>/, "
        "OUT/val/<class>/ and a boxes.csv (path,label,x0,y0,x1,y1) in each split.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=SYNTH_EXAMPLES,
    )
    s.add_argument("out", help="folder to create")
    s.add_argument("--classes", type=options.positive, default=3, help="2 to 6 (default: 3)")
    s.add_argument(
        "--per-class",
        type=options.positive,
        default=40,
        help="train images per class (default: 40)",
    )
    s.add_argument("--val-per-class", type=options.positive, help="default: per-class / 4 (min 2)")
    s.add_argument(
        "--size",
        type=options.positive,
        default=160,
        help="image side in pixels, 32 to 2048 (default: 160)",
    )
    s.add_argument("--seed", type=options.seed, default=0, help="random seed (default: 0)")
    s.add_argument("--overwrite", action="store_true", help="replace a dataset made by synth")
    s.set_defaults(handler=run_synth)


def run_train(args: argparse.Namespace) -> int:
    """``gapcam train``: exit 0, or 1 when unreadable images were skipped (the run is complete
    without them), 130 when interrupted (the run so far is saved: continue with --resume)."""
    from gapcam.train.config import TrainConfig
    from gapcam.train.trainer import run_training

    model = options.model_options(args)
    del model["checkpoint"]  # a training run starts from a backbone, not from another run
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"data", "out", "cache_dir"}
    given = {name: getattr(args, name) for name in fields - set(model) if hasattr(args, name)}
    cache_dir = Path(args.cache_dir) if args.cache_dir else None
    config = TrainConfig(Path(args.data), Path(args.out), cache_dir=cache_dir, **model, **given)

    # -q: the progress and the report are dropped; what matters goes to stderr with the summary.
    # Lines quote class and file names: shown escaped (safe_text), a warning on one bounded line
    def echo(line: str) -> None:
        print(safe_text(options.flag_message(line, args.flags), REPORT_LIMIT))

    def warn(line: str) -> None:
        from gapcam.cli import LINE_LIMIT

        shown = options.error_text(line, args.flags, LINE_LIMIT)
        print(shown, file=sys.stderr if config.quiet else None)

    report = run_training(config, echo=echo, warn=warn)
    skipped = len(report.skipped)
    print(
        f"gapcam: trained {len(report.model.class_names)} classes, val accuracy "
        f"{report.metrics['val_accuracy']:.1%}, {skipped} image(s) skipped",
        file=sys.stderr,
    )
    if report.interrupted:
        return 130
    return 1 if skipped else 0


def run_synth(args: argparse.Namespace) -> int:
    """``gapcam synth OUT``: write the dataset and say how to use it."""
    from gapcam.train.synthetic import CSV_NAME, generate

    counts = generate(
        args.out,
        classes=args.classes,
        per_class=args.per_class,
        val_per_class=args.val_per_class,
        size=args.size,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    out = safe_text(Path(args.out), PATH_LIMIT)
    print(
        f"wrote {counts['train']} train and {counts['val']} val images ({args.size}x{args.size}) "
        f"to {out}/, true boxes in {out}/train/{CSV_NAME} and {out}/val/{CSV_NAME}"
    )
    print(f"train on it: gapcam train {out} --out {safe_text(Path(args.out).name)}-run")
    return 0

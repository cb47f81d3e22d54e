"""The ``gapcam`` command line: parse, call the library, print. No logic of its own.

Exit codes: 0 all inputs done; 1 some inputs failed (the rest were still processed);
2 bad arguments, or a model that cannot be built (unknown, unsupported, weights unavailable).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from gapcam import __version__
from gapcam.errors import GapcamError

EXIT_OK, EXIT_FAILED_INPUTS, EXIT_USAGE = 0, 1, 2

LOCALIZE_EXAMPLES = """examples:
  gapcam localize examples/cat.png
  gapcam localize photos/ --out cams/ --json results.json
  gapcam localize 'shots/*.jpg' --top-k 3 --cmap inferno --alpha 0.4
  gapcam localize examples/cat.png --class "tabby cat" --class 285 --save-cam
  gapcam localize dog.jpg --model resnet50 --weights resnet50.safetensors --json -
"""


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gapcam",
        description="Class activation maps and boxes for CNNs that end in global average pooling.",
        epilog="run `gapcam COMMAND --help` for a command's options and examples",
    )
    parser.add_argument("--version", action="version", version=f"gapcam {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_localize(commands)
    models = commands.add_parser(
        "models",
        help="list the models and whether each works offline",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  gapcam models\n  gapcam models --all\n",
    )
    models.add_argument("--all", action="store_true", help="also list the refused families and why")
    summary = commands.add_parser(
        "summary",
        help="layer table with parameter counts and the classifier head's share",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  gapcam summary resnet50\n  gapcam summary vgg16\n"
        "  gapcam summary timm:resnet18\n",
    )
    summary.add_argument("model", help="a model name (see `gapcam models`), or timm:NAME")
    classes = commands.add_parser(
        "classes",
        help="list a model's class indices and names",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  gapcam classes\n  gapcam classes resnet50 --grep cat\n",
    )
    classes.add_argument("model", nargs="?", default="efficientnet_lite0")
    classes.add_argument("--grep", help="only names containing this text (case-insensitive)")
    return parser


def _add_localize(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = commands.add_parser(
        "localize",
        help="predict classes, draw CAM overlays and boxes for images",
        description="Predict the top classes of each image, compute their class activation "
        "maps in the same forward pass, box the largest component above the threshold, and "
        "write an overlay per image.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=LOCALIZE_EXAMPLES,
    )
    p.add_argument(
        "inputs", nargs="+", metavar="PATH", help="image files, folders (recursive), globs"
    )
    p.add_argument(
        "--model", default="efficientnet_lite0", help="model name (default: %(default)s)"
    )
    p.add_argument("--weights", help="local state dict (.safetensors or .pth, weights only)")
    p.add_argument("--checkpoint", metavar="RUN", help="a run folder made by `gapcam train`")
    p.add_argument("--out", default="gapcam-out", help="output folder (default: ./%(default)s)")
    p.add_argument("--json", metavar="FILE", help="write results as JSON to FILE, or - for stdout")
    p.add_argument(
        "--save-cam", action="store_true", help="also write each raw low-res map as .npy"
    )
    p.add_argument("--no-overlay", action="store_true", help="do not write overlay images")
    p.add_argument("--top-k", type=_positive, default=1, help="CAM panels: the K best classes")
    p.add_argument(
        "--class",
        dest="classes",
        action="append",
        metavar="C",
        help="map this class (index or name) instead; repeatable",
    )
    p.add_argument(
        "--threshold",
        type=_fraction,
        default=0.2,
        help="box threshold on the normalised map (default: %(default)s, CAM paper)",
    )
    p.add_argument(
        "--min-area",
        type=_fraction,
        default=0.01,
        help="extra boxes for other components of at least this image fraction",
    )
    p.add_argument("--normalize", choices=("minmax", "max"), default="minmax")
    p.add_argument(
        "--resize",
        choices=("stretch", "letterbox"),
        default="stretch",
        help="stretch the whole image to the input (default) or keep aspect and pad",
    )
    p.add_argument("--alpha", type=_fraction, default=0.5, help="heatmap opacity (default: 0.5)")
    p.add_argument("--cmap", default="jet", help="any matplotlib colormap (default: jet)")
    p.add_argument("--format", choices=("png", "jpg"), default="png", help="overlay format")
    p.add_argument("--batch-size", type=_positive, default=8)
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: cpu)")
    p.add_argument(
        "--max-pixels",
        type=_positive,
        default=120_000_000,
        help="refuse images with more pixels (decompression-bomb guard)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace existing outputs (never inputs)"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="print only errors and the summary")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "localize":
            from gapcam.run import run_localize

            return run_localize(args)
        if args.command == "models":
            return _models(args.all)
        if args.command == "summary":
            from gapcam.summary import format_summary, summarize

            print(format_summary(summarize(args.model)))
            return EXIT_OK
        return _classes(args.model, args.grep)
    except GapcamError as exc:
        print(f"gapcam: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("gapcam: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `gapcam models | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def _models(show_refused: bool) -> int:
    from gapcam.models import specs
    from gapcam.models.tv import REFUSED

    rows = [(s.name, s.source, "yes" if s.offline() else "no", s.note) for s in specs()]
    width = max(len(r[0]) for r in rows)
    print(f"{'model':<{width}}  {'source':<11}  offline  note")
    for name, source, offline, note in rows:
        print(f"{name:<{width}}  {source:<11}  {offline:<7}  {note}")
    print("\nany timm model whose head is GAP + linear: --model timm:NAME (e.g. timm:resnet50)")
    if show_refused:
        print("\nrefused (no exact class activation map):")
        for prefix, reason in REFUSED.items():
            print(f"  {prefix}*: {reason}")
    return EXIT_OK


def _classes(model_name: str, grep: str | None) -> int:
    from gapcam.models import build_model

    model = build_model(model_name, "random" if model_name != "efficientnet_lite0" else None)
    for index, name in enumerate(model.class_names):
        if grep is None or grep.lower() in name.lower():
            print(f"{index:>5}  {name}")
    return EXIT_OK


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()

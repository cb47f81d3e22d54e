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
  gapcam localize --engine ray list.txt --out results/ --limit 100     # Parquet, gapcam[ray]
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
    _add_evaluate(commands)
    _add_serve(commands)
    _add_train(commands)
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
    p.add_argument("--model", help="model name (default: efficientnet_lite0)")
    p.add_argument("--weights", help="local state dict (.safetensors or .pth, weights only)")
    p.add_argument("--checkpoint", metavar="RUN", help="a run folder made by `gapcam train`")
    p.add_argument("--out", default="gapcam-out", help="output folder (default: ./%(default)s)")
    p.add_argument("--json", metavar="FILE", help="write results as JSON to FILE, or - for stdout")
    p.add_argument(
        "--save-cam",
        action="store_true",
        help="also write the raw (not normalised) maps at image size as .npy (k x H x W float32)",
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
    _add_view_options(p)
    p.add_argument(
        "--resize",
        choices=("stretch", "letterbox"),
        default="stretch",
        help="stretch the whole image to the input (default) or keep aspect and pad",
    )
    p.add_argument("--alpha", type=_fraction, default=0.5, help="heatmap opacity (default: 0.5)")
    p.add_argument("--cmap", default="jet", help="any matplotlib colormap (default: jet)")
    p.add_argument("--format", choices=("png", "jpg"), default="png", help="overlay format")
    _add_speed(p)
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


def _workers(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not 0 or a positive integer")
    return value


def _add_backend(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument(
        "--backend",
        choices=("auto", "eager", "onnx"),
        default=default,
        help="who runs the network: onnx (ONNX Runtime, needs gapcam[fast]), eager (PyTorch), "
        "auto: onnx when available on the CPU, else eager (default: %(default)s)",
    )


def _add_speed(p: argparse.ArgumentParser) -> None:
    _add_backend(p, "auto")
    p.add_argument(
        "--batch-size", type=_positive, help="images per forward pass (default: 8, 16 on 16+ cores)"
    )
    p.add_argument(
        "--workers",
        type=_workers,
        help="decoding and writing threads each (default: the core count, 2..16; 0: sequential)",
    )
    p.add_argument(
        "--streams",
        type=_positive,
        metavar="N",
        help="forward passes run at once with the onnx backend, each on its share of the cores "
        "(default: 2 on a multi-core machine; 1 with --workers 0)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: cpu)")
    _add_precision(p)
    p.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="ray: run on a Ray cluster (gapcam[ray]; $RAY_ADDRESS or a local one), write "
        "Parquet to --out",
    )
    p.add_argument("--limit", type=_positive, metavar="N", help="only the first N images")
    p.add_argument(
        "--ray-address", metavar="ADDR", help="with --engine ray: ray://HOST:10001, auto, ..."
    )


def _add_serve(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = commands.add_parser(
        "serve",
        help="a web page (and JSON API) to explore CAMs; needs gapcam[web]",
        description="Serve one page: upload an image, see the top-5 classes, switch between "
        "their CAMs, move the opacity and box-threshold sliders, download the overlay and JSON. "
        "The same features are a JSON API (POST /api/localize, schema at /openapi.json).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  gapcam serve\n  gapcam serve --port 8080 --model resnet50\n"
        "  gapcam serve --checkpoint shapes-run/ --preset fine\n"
        "  gapcam serve --host 0.0.0.0   # reachable from other machines: explicit only\n",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port, 0 = any free (default: 8000)")
    p.add_argument("--model", help="model name (default: efficientnet_lite0)")
    p.add_argument("--weights", help="local state dict (.safetensors or .pth, weights only)")
    p.add_argument("--checkpoint", metavar="RUN", help="a run folder made by `gapcam train`")
    _add_view_options(p)
    _add_backend(p, "eager")
    _add_precision(p)
    p.add_argument(
        "--max-upload-mb", type=float, default=20.0, help="upload size limit (default: 20)"
    )
    p.add_argument(
        "--max-pixels",
        type=_positive,
        default=25_000_000,
        help="refuse images with more pixels, before decoding (default: 25,000,000)",
    )


TRAIN_EXAMPLES = """examples:
  gapcam synth shapes/ --classes 4 --per-class 60
  gapcam train shapes/ --out shapes-run/
  gapcam localize shapes/val/star --checkpoint shapes-run/
  gapcam train photos/ --model resnet50 --out run/ --finetune last-stage --epochs 5
  gapcam train photos/ --out run/ --resume --epochs 200
"""


def _add_train(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
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
        epilog=TRAIN_EXAMPLES,
    )
    p.add_argument("data", help="image folder, one subfolder per class")
    p.add_argument("--out", required=True, metavar="RUN", help="run folder to create")
    p.add_argument(
        "--model", metavar="M", help="backbone (default: efficientnet_lite0); see `gapcam models`"
    )
    p.add_argument(
        "--weights", metavar="FILE", help="backbone weights file instead of the pretrained ones"
    )
    p.add_argument(
        "--finetune",
        choices=("none", "last-stage"),
        help="none: head only, frozen backbone (default); last-stage: then also train the "
        "backbone's last stage, with augmentation (slower: every epoch runs the network)",
    )
    p.add_argument(
        "--epochs", type=_positive, metavar="N", help="max epochs (default: 100, finetune: 10)"
    )
    p.add_argument(
        "--patience", type=_positive, default=10, metavar="N", help="early stopping (default: 10)"
    )
    p.add_argument("--optimizer", choices=("adamw", "sgd"), help="default: adamw")
    p.add_argument("--lr", type=float, help="learning rate of the head (default: 1e-3)")
    p.add_argument("--weight-decay", type=float, metavar="WD", help="default: 0.01")
    p.add_argument("--batch-size", type=_positive, metavar="N", help="default: 32")
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
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: cpu)")
    p.add_argument(
        "-q", "--quiet", action="store_true", help="print only warnings, errors and the summary"
    )
    s = commands.add_parser(
        "synth",
        help="write a synthetic dataset of shapes on clutter, with their true boxes",
        description="Shapes (circle, square, triangle, star, stripes, cross) at random "
        "positions, sizes, rotations and colours on cluttered backgrounds: OUT/train/<class>/, "
        "OUT/val/<class>/ and a boxes.csv (path,label,x0,y0,x1,y1) in each split.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=TRAIN_EXAMPLES,
    )
    s.add_argument("out", help="folder to create")
    s.add_argument("--classes", type=_positive, default=3, help="2 to 6 (default: 3)")
    s.add_argument("--per-class", type=_positive, default=40, help="train images per class")
    s.add_argument("--val-per-class", type=_positive, help="default: per-class / 4 (min 2)")
    s.add_argument("--size", type=_positive, default=160, help="image side in pixels")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--overwrite", action="store_true", help="replace a dataset made by synth")


EVALUATE_EXAMPLES = """examples:
  gapcam evaluate ../shared/data/ilsvrc-val-dev
  gapcam evaluate data/ --json eval.json --plot eval.png
  gapcam evaluate boxes.csv --model resnet50 --limit 100
  gapcam evaluate VOC2012/ --split val --preset best --skip-invalid
"""


def _add_evaluate(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
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
        epilog=EVALUATE_EXAMPLES,
    )
    p.add_argument("data", metavar="DATA", help="dataset folder or CSV file")
    p.add_argument("--layout", choices=("auto", "wsol", "voc", "csv"), default="auto")
    p.add_argument("--split", help="wsol split folder, VOC ImageSets/Main/SPLIT.txt, CLS-LOC/SPLIT")
    p.add_argument("--images", metavar="DIR", help="folder image paths are relative to")
    p.add_argument("--model", help="model name (default: efficientnet_lite0)")
    p.add_argument("--weights", help="local state dict (.safetensors or .pth, weights only)")
    p.add_argument("--checkpoint", metavar="RUN", help="a run folder made by `gapcam train`")
    p.add_argument(
        "--threshold",
        type=_fraction,
        default=0.2,
        help="box threshold for the fixed-threshold localization accuracies (default: %(default)s)",
    )
    _add_view_options(p)
    p.add_argument("--json", metavar="FILE", help="write the report as JSON to FILE, or -")
    p.add_argument("--plot", metavar="PNG", help="write box accuracy vs threshold as PNG")
    p.add_argument("--batch-size", type=_positive, default=16)
    p.add_argument("--limit", type=_positive, metavar="N", help="only the first N images")
    p.add_argument(
        "--skip-invalid",
        action="store_true",
        help="leave out images with bad annotations (listed in the output) instead of stopping",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: cpu)")
    _add_precision(p)
    p.add_argument("--overwrite", action="store_true", help="replace existing --json/--plot")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _add_precision(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--precision",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="forward-pass precision (eager backend): bfloat16 is ~1.7x faster than float32 on CPUs with "
        "AVX512-BF16/AMX, float16 is for GPUs; CAMs move by ~2%% (default: %(default)s)",
    )


def _add_view_options(p: argparse.ArgumentParser) -> None:
    """Gradient-free view options (measured in docs/evaluate.md), shared by several commands."""
    p.add_argument(
        "--preset",
        choices=("cam", "fine", "best"),
        help="measured view settings: cam (vanilla), fine (input 288), best (scales 1 and 1.5)",
    )
    p.add_argument(
        "--input-size", type=_positive, help="square network input side (multiple of 32)"
    )
    p.add_argument("--hflip", action="store_true", help="average with the mirrored image's CAM")
    p.add_argument(
        "--scales", type=float, nargs="+", metavar="S", help="average CAMs over input sizes"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "localize":
            if "torch" not in sys.modules:  # idle OpenMP threads sleep: the writers need cores
                os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
            if args.engine == "ray":
                from gapcam.ray_engine import run_ray

                return run_ray(args)
            from gapcam.run import run_localize

            return run_localize(args)
        if args.command == "serve":
            from gapcam.web.serve import run_serve

            return run_serve(args)
        if args.command in ("train", "synth"):
            from gapcam.synthetic import run_synth
            from gapcam.train import run_train

            return run_train(args) if args.command == "train" else run_synth(args)
        if args.command == "evaluate":
            from gapcam.evaluate_report import run_evaluate

            return run_evaluate(args)
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
    aliases = model.aliases or model.class_names
    for index, (name, alias) in enumerate(zip(model.class_names, aliases, strict=True)):
        if grep is None or grep.lower() in f"{name}, {alias}".lower():
            shown = f"{name}  ({alias})" if alias != name else name
            print(f"{index:>5}  {shown}")
    return EXIT_OK


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()

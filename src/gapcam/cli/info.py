"""``gapcam models``, ``gapcam summary`` and ``gapcam classes``: what gapcam can run."""

from __future__ import annotations

import argparse
from typing import Any

from gapcam.types import DEFAULT_MODEL


def add(commands: Any) -> None:
    models = commands.add_parser(
        "models",
        help="list the models and whether each works offline",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  gapcam models\n  gapcam models --all\n",
    )
    models.add_argument("--all", action="store_true", help="also list the refused families and why")
    models.set_defaults(handler=run_models)
    summary = commands.add_parser(
        "summary",
        help="layer table with parameter counts and the classifier head's share",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  gapcam summary resnet50\n  gapcam summary vgg16\n"
        "  gapcam summary timm:resnet18\n",
    )
    summary.add_argument("model", help="a model name (see `gapcam models`), or timm:NAME")
    summary.set_defaults(handler=run_summary)
    classes = commands.add_parser(
        "classes",
        help="list a model's class indices and names",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  gapcam classes\n  gapcam classes resnet50 --grep cat\n",
    )
    classes.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    classes.add_argument("--grep", help="only names containing this text (case-insensitive)")
    classes.set_defaults(handler=run_classes)


def run_models(args: argparse.Namespace) -> int:
    from gapcam.console import safe_text
    from gapcam.models import specs
    from gapcam.models.tv import REFUSED

    rows = [
        (safe_text(s.name), s.source, "yes" if s.offline() else "no", safe_text(s.note))
        for s in specs()
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'model':<{width}}  {'source':<11}  offline  note")
    for name, source, offline, note in rows:
        print(f"{name:<{width}}  {source:<11}  {offline:<7}  {note}")
    print("\nany timm model whose head is GAP + linear: --model timm:NAME (e.g. timm:resnet50)")
    if args.all:
        print("\nrefused (no exact class activation map):")
        for prefix, reason in REFUSED.items():
            print(f"  {prefix}*: {reason}")
    return 0


def run_summary(args: argparse.Namespace) -> int:
    from gapcam.summary import format_summary, summarize

    print(format_summary(summarize(args.model)))
    return 0


def run_classes(args: argparse.Namespace) -> int:
    from gapcam.console import safe_text
    from gapcam.models import build_model

    # the class names come with the model; other models' weights need not be downloaded
    model = build_model(args.model, None if args.model == DEFAULT_MODEL else "random")
    aliases = model.aliases or model.class_names
    for index, (name, alias) in enumerate(zip(model.class_names, aliases, strict=True)):
        if args.grep is None or args.grep.lower() in f"{name}, {alias}".lower():
            shown = f"{safe_text(name)}  ({safe_text(alias)})" if alias != name else safe_text(name)
            print(f"{index:>5}  {shown}")
    return 0

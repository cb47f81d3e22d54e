"""The ``gapcam evaluate`` job: read the dataset, evaluate, print the table, write JSON and plot."""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path
from typing import Any

from gapcam.errors import GapcamError
from gapcam.evaluate import check_class_table, evaluate, label_resolver
from gapcam.explain import Localizer, view_options_from_args
from gapcam.export import OutputGuard, write_json
from gapcam.models import model_or_checkpoint


def run_evaluate(args: argparse.Namespace) -> int:
    """Exit 0 with the table printed; problems raise (the CLI prints them, exit 2)."""
    guard = OutputGuard((), overwrite=args.overwrite)
    for target in (args.json, args.plot):
        if target and target != "-":
            guard.check(Path(target))  # before minutes of work, not after
    localizer = _localizer(args)
    from gapcam.datasets import load_dataset

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
    progress = _progress(len(dataset.samples), args.quiet)
    report = evaluate(
        dataset,
        localizer,
        batch_size=args.batch_size,
        on_batch=progress.update if progress else None,
    )
    if progress is not None:
        progress.close()
    report["settings"]["weights"] = args.weights
    out = sys.stderr if args.json == "-" else sys.stdout
    print(format_table(report), file=out)
    if args.plot:
        guard.write_bytes(Path(args.plot), plot_png(report))
        print(f"plot: {args.plot}", file=out)
    if args.json:
        write_json(report, args.json, guard)
        if args.json != "-":
            print(f"json: {args.json}", file=out)
    return 0


def _localizer(args: argparse.Namespace) -> Localizer:
    views = view_options_from_args(args)
    model = model_or_checkpoint(args.model, args.weights, getattr(args, "checkpoint", None))
    return Localizer(
        model,
        weights=args.weights,
        threshold=args.threshold,
        device=args.device,
        precision=args.precision,
        **views,
    )


def _progress(count: int, quiet: bool) -> Any:
    if quiet:
        return None
    from tqdm import tqdm

    return tqdm(total=count, unit="img", file=sys.stderr, leave=False, disable=None)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:6.2f}%"


def format_table(report: dict[str, Any]) -> str:
    """The human summary of a report: a few aligned lines."""
    data, settings, m = report["dataset"], report["settings"], report["metrics"]
    size = "x".join(str(s) for s in settings["input_size"])
    views = "".join(
        [
            " +hflip" if settings["hflip"] else "",
            f" scales {settings['scales']}" if settings["scales"] != [1.0] else "",
        ]
    )
    lines = [
        f"{data['source']} ({data['layout']}): {data['images']} images, {data['boxes']} boxes; "
        f"{settings['model']} at {size}{views}",
        f"  classification      top-1 {_pct(m['top1_cls'])}   top-5 {_pct(m['top5_cls'])}",
        f"  loc @{settings['threshold']:.2f}, IoU 0.5   GT-known {_pct(m['gt_known_loc'])}   "
        f"top-1 {_pct(m['top1_loc'])}   top-5 {_pct(m['top5_loc'])}",
    ]
    if "max_box_acc" in m:
        lines.append(
            f"  MaxBoxAcc           {_pct(m['max_box_acc'])}   (largest component, IoU 0.5, "
            f"best threshold {m['max_box_acc_threshold']:.2f})"
        )
    if "max_box_acc_v2" in m:
        parts = ", ".join(
            f"{iou}: {v['accuracy']:.2f}% @{v['threshold']:.2f}"
            for iou, v in m["max_box_acc_v2_per_iou"].items()
        )
        lines.append(
            f"  MaxBoxAccV2         {_pct(m['max_box_acc_v2'])}   (all components; {parts})"
        )
    lines.append(f"  PxAP                {_pct(m['pxap'])}")
    timing = report["timing"]
    lines.append(
        f"  time {timing['seconds']:.1f} s ({timing['per_image'] * 1000:.0f} ms/image, of which "
        f"scoring and threshold sweep {timing['scoring_seconds'] / data['images'] * 1000:.1f} ms)"
    )
    if data["skipped"]:
        lines.append(f"  LEFT OUT (--skip-invalid), {len(data['skipped'])} problem(s):")
        lines += [f"    {message}" for message in data["skipped"]]
    return "\n".join(lines)


def plot_png(report: dict[str, Any]) -> bytes:
    """Box accuracy against the map threshold: one curve per IoU (all components, as in
    MaxBoxAccV2) and the largest component at IoU 0.5 (MaxBoxAcc) dashed; maxima marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curves = report["curves"]
    if curves is None:
        raise GapcamError("--plot: the dataset has no boxes, so there is no box accuracy curve")
    figure = Figure(figsize=(7.0, 4.5))
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    thresholds = curves["thresholds"]
    for iou, row in zip(curves["iou_thresholds"], curves["all_components"], strict=True):
        (line,) = ax.plot(thresholds, row, label=f"IoU {iou:g} (all components)")
        best = max(range(len(row)), key=row.__getitem__)
        ax.plot(thresholds[best], row[best], "o", color=line.get_color())
    if 0.5 in curves["iou_thresholds"]:
        row = curves["largest_component"][curves["iou_thresholds"].index(0.5)]
        ax.plot(thresholds, row, "--", color="black", label="IoU 0.5, largest component")
    m = report["metrics"]
    ax.set_title(
        f"{report['settings']['model']}: MaxBoxAcc {m.get('max_box_acc', 0):.1f}%, "
        f"MaxBoxAccV2 {m.get('max_box_acc_v2', 0):.1f}% ({report['dataset']['images']} images)"
    )
    ax.set_xlabel("threshold on the min-max normalised CAM")
    ax.set_ylabel("box accuracy (%)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize="small")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()

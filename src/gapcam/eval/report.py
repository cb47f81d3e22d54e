"""The human summary of an evaluation report: a few aligned lines.

What came from files (the dataset path, the model's name, a checkpoint's backbone, the problems
met in annotation files, which quote their paths and labels) is shown through ``safe_text``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gapcam.console import safe_text

#: the longest line a left-out problem is shown on (after its indent); a path is never cut
PROBLEM_ROOM = 290
PATH_LIMIT = 4096


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:6.2f}%"


def format_table(report: dict[str, Any], speak: Callable[[str], str] = str) -> str:
    """The human summary of a report: a few aligned lines. ``speak`` words the problems left
    out (``--skip-invalid``) for the reader: the command line names its flags there."""
    data, settings, m = report["dataset"], report["settings"], report["metrics"]
    size = "x".join(str(s) for s in settings["input_size"])
    views = "".join(
        [
            " +hflip" if settings["hflip"] else "",
            f" scales {settings['scales']}" if settings["scales"] != [1.0] else "",
        ]
    )
    lines = [
        f"{safe_text(data['source'], PATH_LIMIT)} ({data['layout']}): {data['images']} images, "
        f"{data['boxes']} boxes; {safe_text(settings['model'])} at {size}{views}",
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
        lines += [f"    {_bounded(speak(message), PROBLEM_ROOM)}" for message in data["skipped"]]
    return "\n".join(lines)


def _bounded(text: str, room: int) -> str:
    """``safe_text`` of ``text`` in at most ``room`` characters, escapes included."""
    limit = room
    shown = safe_text(text, limit)
    while len(shown) > room and limit > 1:  # the escapes made it longer: cut more
        limit = max(1, limit - (len(shown) - room))
        shown = safe_text(text, limit)
    return shown

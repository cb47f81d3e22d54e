"""Figures as PNG bytes (matplotlib's Agg canvas; no pyplot, no global state): the training
curve and confusion matrix of ``gapcam train``, the box accuracy curve of ``gapcam evaluate``."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any


def _png(figure: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def training_curve(history: Sequence[dict[str, Any]], best: dict[str, int]) -> bytes:
    """Loss and accuracy per epoch (train and val), one column per phase, best epoch marked.

    ``best`` maps a phase name to its best epoch.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    phases = list(dict.fromkeys(row["phase"] for row in history)) or ["head"]
    figure = Figure(figsize=(5.0 * len(phases), 6.0))
    axes = figure.subplots(2, len(phases), squeeze=False, sharex="col")
    for column, phase in enumerate(phases):
        rows = [row for row in history if row["phase"] == phase]
        epochs = [row["epoch"] for row in rows]
        for line, metric in enumerate(("loss", "accuracy")):
            ax = axes[line][column]
            for split in ("train", "val"):
                values = [_finite(row[f"{split}_{metric}"]) for row in rows]
                ax.plot(epochs, values, label=split, marker="." if len(rows) < 30 else "")
            if phase in best:
                ax.axvline(best[phase], color="grey", linestyle=":", label=f"best ({best[phase]})")
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
            if line == 0:
                ax.set_title("head on frozen features" if phase == "head" else "last stage + head")
        axes[1][column].set_xlabel("epoch")
        axes[1][column].xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[1][column].set_ylim(-0.02, 1.02)
        axes[0][column].legend(loc="upper right")
    figure.tight_layout()
    return _png(figure)


def confusion_matrix(matrix: Sequence[Sequence[int]], class_names: Sequence[str]) -> bytes:
    """Rows: true class; columns: predicted class; counts in the cells."""
    from matplotlib.figure import Figure

    size = len(class_names)
    side = min(16.0, 2.5 + 0.55 * size)
    figure = Figure(figsize=(side, side))
    ax = figure.subplots()
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(size), class_names, rotation=45, ha="right")
    ax.set_yticks(range(size), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    total = sum(sum(row) for row in matrix)
    correct = sum(matrix[i][i] for i in range(size))
    ax.set_title(f"validation: {correct}/{total} correct")
    top = max((max(row) for row in matrix), default=0)
    if size <= 30:
        for i in range(size):
            for j in range(size):
                colour = "white" if matrix[i][j] > top / 2 else "black"
                ax.text(j, i, str(matrix[i][j]), ha="center", va="center", color=colour)
    figure.tight_layout()
    return _png(figure)


def _finite(value: Any) -> float:
    number = float(value) if value is not None else math.nan
    return number if math.isfinite(number) else math.nan


def box_accuracy_curve(report: dict[str, Any]) -> bytes:
    """Box accuracy against the map threshold: one curve per IoU (all components, as in
    MaxBoxAccV2) and the largest component at IoU 0.5 (MaxBoxAcc) dashed; maxima marked."""
    from matplotlib.figure import Figure

    curves = report["curves"]
    if curves is None:
        raise ValueError("the dataset has no boxes, so there is no box accuracy curve")
    figure = Figure(figsize=(7.0, 4.5))
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
    return _png(figure)

"""Weakly supervised localization of a dataset: one forward pass per batch -> metrics -> report.

For every image the Localizer maps the ground-truth class (``classes_per_image``) in the pass
that also gives its top-5 predictions. Top-k localization needs no other map: a top-k guess
can only be right with the ground-truth class, and its box is then the one from the
ground-truth class's map, so top-k loc = (label in top-k) and (GT-known box correct). The
metrics and their conventions are in ``gapcam.eval.metrics`` and docs/evaluate.md.
"""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from gapcam import images
from gapcam._version import __version__
from gapcam.console import safe_text
from gapcam.errors import ClassSelectionError, DatasetError, GapcamError
from gapcam.eval import metrics
from gapcam.eval.datasets import Dataset, Sample
from gapcam.localizer import Localizer
from gapcam.models import GapModel
from gapcam.result import Result

SCHEMA = "gapcam.evaluate/1"
WORDNET_ID = re.compile(r"n\d{8}")


def label_resolver(model: GapModel) -> Callable[[str], int]:
    """Labels as class indices, the model's class names (or synonyms), or, for an
    ImageNet-1k model, WordNet ids (``n01440764``)."""
    wordnet = imagenet_wordnet_ids(model)

    def resolve(label: str) -> int:
        if wordnet and WORDNET_ID.fullmatch(label):
            if label not in wordnet:
                raise ClassSelectionError(f"{label} is not one of ImageNet-1k's WordNet ids")
            return wordnet[label]
        return model.class_index(label)

    return resolve


def imagenet_wordnet_ids(model: GapModel) -> dict[str, int]:
    """WordNet id -> index for a model with the standard ImageNet-1k classes, else empty."""
    from gapcam.models.imagenet import imagenet_names

    if model.num_classes != 1000 or tuple(model.class_names) != imagenet_names():
        return {}
    from timm.data import ImageNetInfo

    return {wnid: i for i, wnid in enumerate(ImageNetInfo().label_names())}


def check_class_table(dataset: Dataset, model: GapModel) -> None:
    """A dataset's ``class_names.txt`` must number WordNet ids as the model does."""
    wordnet = imagenet_wordnet_ids(model)
    if not dataset.class_table or not wordnet:
        return
    wrong = [
        safe_text(
            f"{where}: class {index} is {wnid} here but {model.name}'s class {index} is "
            f"{next((w for w, i in wordnet.items() if i == index), 'absent')}",
            limit=300,
        )
        for index, wnid, where in dataset.class_table
        if wordnet.get(wnid) != index
    ]
    if wrong:
        raise DatasetError(
            f"{safe_text(dataset.source)}: its class numbering differs from the model's, so its "
            "labels would name other classes:\n  " + "\n  ".join(wrong[:10])
        )


def evaluate(
    dataset: Dataset,
    localizer: Localizer,
    *,
    batch_size: int = 16,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Evaluate ``localizer`` on ``dataset``; returns the report (docs/evaluate.md)."""
    boxes = metrics.BoxAccuracy()
    pixels = metrics.PixelPrecision()
    records: list[dict[str, Any]] = []
    started, sweep = time.perf_counter(), 0.0
    for batch in _batches(dataset.samples, batch_size):
        loaded = [_load(sample) for sample in batch]
        results = localizer.explain(
            loaded, classes_per_image=[[s.label] for s in batch], predictions=5
        )
        for sample, result in zip(batch, results, strict=True):
            tick = time.perf_counter()
            records.append(score(sample, result, boxes, pixels, localizer.threshold))
            sweep += time.perf_counter() - tick
        if on_batch is not None:
            on_batch(len(batch))
    elapsed = time.perf_counter() - started
    report = {
        "schema": SCHEMA,
        "gapcam_version": __version__,
        "dataset": _dataset_part(dataset),
        "settings": _settings_part(localizer),
        "metrics": summarize(records, boxes, pixels),
        "curves": _curves(boxes) if boxes.count else None,
        "timing": {
            "seconds": elapsed,
            "per_image": elapsed / len(records),
            "scoring_seconds": sweep,
        },
        "images": records,
    }
    return report


def _batches(samples: Sequence[Sample], size: int) -> Iterator[Sequence[Sample]]:
    for start in range(0, len(samples), size):
        yield samples[start : start + size]


def _load(sample: Sample) -> images.LoadedImage:
    try:
        loaded = images.load_image(sample.path, name=sample.name)
    except GapcamError as exc:
        raise DatasetError(
            f"{safe_text(exc, limit=240)} (checked when the annotations were read; changed since?)"
        ) from exc
    if loaded.size != sample.size:
        raise DatasetError(
            f"{safe_text(sample.path)}: now {loaded.size}, was {sample.size} when checked"
        )
    return loaded


def score(
    sample: Sample,
    result: Result,
    boxes: metrics.BoxAccuracy,
    pixels: metrics.PixelPrecision,
    threshold: float,
) -> dict[str, Any]:
    """One image's record; its threshold sweep and mask histograms go into the accumulators."""
    top5 = [p.index for p in result.predictions[:5]]
    record: dict[str, Any] = {
        "image": sample.name,
        "label": sample.label,
        "top5": top5,
        "top1_correct": top5[0] == sample.label,
        "top5_correct": sample.label in top5,
    }
    normalized = result.normalized[0]
    if sample.boxes:
        found = result.maps[0].boxes
        box = metrics.edges_to_inclusive(found[0].as_list())[0] if found else None
        iou = 0.0 if box is None else float(metrics.inclusive_iou(box, sample.boxes).max())
        record |= {
            "box": None if box is None else [int(v) for v in box],
            "iou": iou,
            "gt_known_correct": iou >= 0.5,
        }
        largest, best = metrics.sweep_ious(metrics.component_boxes(normalized), sample.boxes)
        boxes.add(largest, best)
    if sample.masks:
        mask, ignore = load_masks(sample)
        pixels.add(normalized, mask, ignore)
    return record


def load_masks(sample: Sample) -> tuple[np.ndarray, np.ndarray | None]:
    """The union of the foreground masks and the ignore mask (or None), at the image's size;
    masks of another size are resized (nearest neighbour), as wsolevaluation does. A mask
    whose header declares more than ``DEFAULT_MAX_PIXELS`` pixels is refused before decoding
    (the dataset's check found it already, unless the file changed since)."""
    from PIL import Image

    def read(path: Any) -> np.ndarray:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as image:
                    width, height = image.size
                    if width * height > images.DEFAULT_MAX_PIXELS:
                        raise Image.DecompressionBombError(f"{width}x{height} pixels")
                    grey = image.convert("L")
            if grey.size != sample.size:
                grey = grey.resize(sample.size, Image.Resampling.NEAREST)
            return np.asarray(grey) > 0
        except Image.DecompressionBombError as exc:
            raise DatasetError(
                f"{safe_text(path)}: the mask is over the limit of "
                f"{images.DEFAULT_MAX_PIXELS:,} pixels ({exc}); nothing of it was decoded"
            ) from exc
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            reason = safe_text(exc, limit=120)
            raise DatasetError(f"{safe_text(path)}: cannot read the mask ({reason})") from exc

    mask = np.logical_or.reduce([read(path) for path in sample.masks])
    ignore = None if sample.ignore is None else read(sample.ignore) & ~mask
    return mask, ignore


def summarize(
    records: Sequence[dict[str, Any]],
    boxes: metrics.BoxAccuracy,
    pixels: metrics.PixelPrecision,
) -> dict[str, Any]:
    """Percentages: classification over all images, localization over the boxed ones."""

    def percent(flags: Sequence[bool]) -> float | None:
        return float(np.mean(flags) * 100.0) if flags else None

    boxed = [r for r in records if "gt_known_correct" in r]
    found: dict[str, Any] = {
        "top1_cls": percent([r["top1_correct"] for r in records]),
        "top5_cls": percent([r["top5_correct"] for r in records]),
        "gt_known_loc": percent([r["gt_known_correct"] for r in boxed]),
        "top1_loc": percent([r["gt_known_correct"] and r["top1_correct"] for r in boxed]),
        "top5_loc": percent([r["gt_known_correct"] and r["top5_correct"] for r in boxed]),
    }
    if boxes.count:
        found |= boxes.summary()
    found["pxap"] = pixels.pxap()
    return found


def _curves(boxes: metrics.BoxAccuracy) -> dict[str, Any]:
    curves = boxes.curves()
    return {
        "thresholds": [float(t) for t in boxes.thresholds],
        "iou_thresholds": list(boxes.iou_thresholds),
        "largest_component": [np.round(row, 4).tolist() for row in curves["largest"]],
        "all_components": [np.round(row, 4).tolist() for row in curves["any"]],
    }


def _dataset_part(dataset: Dataset) -> dict[str, Any]:
    return {
        "source": str(dataset.source),
        "layout": dataset.layout,
        "images": len(dataset.samples),
        "boxes": dataset.box_count,
        "with_masks": sum(1 for s in dataset.samples if s.masks),
        "skipped": list(dataset.skipped),
    }


def _settings_part(localizer: Localizer) -> dict[str, Any]:
    settings = localizer.settings()
    return {
        "model": settings.model,
        "threshold": settings.threshold,
        "normalize": settings.normalize,
        "resize": settings.resize,
        "input_size": list(settings.input_size),
        "hflip": localizer.hflip,
        "scales": list(localizer.scales),
        "precision": localizer.precision,
        "output_stride": localizer.output_stride,
        "cam_thresholds": "0.00 to 0.99 step 0.01, pixels >= threshold",
        "iou": "inclusive pixels: area = (x1 - x0 + 1) * (y1 - y0 + 1)",
        "connectivity": 8,
    }

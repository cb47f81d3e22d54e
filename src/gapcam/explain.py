"""The one pipeline every front end calls: images -> predictions, CAMs and boxes.

>>> loc = Localizer()                       # the embedded efficientnet_lite0
>>> result = loc("examples/cat.png")        # one image -> one Result; a list -> a list
>>> result.predictions[0].name, result.maps[0].boxes[0]
>>> result.overlay().save("cat-cam.png")

Beyond one plain forward pass (gradient-free, measured in docs/evaluate.md): ``input_size``
runs the network at another resolution (finer maps), ``hflip`` averages the CAM of the mirrored
image (mirrored back), ``scales`` averages CAMs over input sizes; ``Localizer.from_preset`` picks
a measured combination from ``PRESETS``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from gapcam import cam, images, overlay
from gapcam.backends import check_device, make_backend
from gapcam.boxes import boxes_from_map
from gapcam.errors import ClassSelectionError, GapcamError
from gapcam.models import DEFAULT_MODEL, GapModel, build_model, inference_state
from gapcam.types import RESIZE_MODES, ClassMap, Prediction, Preprocess, Settings

#: Named view settings for ``Localizer.from_preset`` (and ``--preset``), measured on the
#: ILSVRC dev set in docs/evaluate.md: ``cam`` is the paper's single pass (the default).
PRESETS: dict[str, dict[str, Any]] = {
    "cam": {},
    "fine": {"input_size": 288},
    "best": {"scales": (1.0, 1.5)},
}


#: The output stride of the supported networks' last feature map. View sizes are rounded to a
#: multiple of it: otherwise the h x w grid spans more than the input (336 px gives an 11 x 11
#: grid that covers 352 px) and upsampling it over the input would misplace cells by up to half
#: a cell.
FEATURE_STRIDE = 32


def view_options(
    preset: str | None = None,
    input_size: int | None = None,
    hflip: bool = False,
    scales: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Localizer keyword arguments from a preset, overridden by explicit view options."""
    if preset is not None and preset not in PRESETS:
        raise GapcamError(f"--preset {preset}: use one of {', '.join(PRESETS)}")
    views: dict[str, Any] = dict(PRESETS[preset]) if preset else {}
    if input_size is not None:
        views["input_size"] = input_size
    if hflip:
        views["hflip"] = True
    if scales:
        views["scales"] = tuple(scales)
    return views


def view_options_from_args(args: Any) -> dict[str, Any]:
    """``view_options`` from a front end's parsed ``--preset/--input-size/--hflip/--scales``
    (any of them may be missing from ``args``)."""
    return view_options(
        getattr(args, "preset", None),
        getattr(args, "input_size", None),
        getattr(args, "hflip", False),
        getattr(args, "scales", None),
    )


#: Normalisations a Localizer accepts: boxes threshold a map scaled to [0, 1].
BOX_NORMALIZATIONS = ("minmax", "max")


def _stride_multiple(side: float) -> int:
    return max(FEATURE_STRIDE, int(side / FEATURE_STRIDE + 0.5) * FEATURE_STRIDE)


@dataclass(frozen=True)
class Result:
    """Everything gapcam knows about one image."""

    name: str
    image: Image.Image
    predictions: tuple[Prediction, ...]
    maps: tuple[ClassMap, ...]
    settings: Settings
    region: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)
    path: Path | None = None
    notes: tuple[str, ...] = ()
    kept_maps: tuple[np.ndarray, ...] | None = field(default=None, repr=False, compare=False)
    map_device: str = field(default="cpu", repr=False, compare=False)

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size

    @property
    def normalized(self) -> tuple[np.ndarray, ...]:
        """The normalised maps at the original image size (H x W float32), one per map.

        Kept from the forward pass for images up to ``KEEP_MAPS_PIXELS``; for larger ones they
        are made again from ``low_res`` on first use (the same computation on the same device,
        the same values), so a queue of results waiting to be written does not hold them.
        """
        if self.kept_maps is not None:
            return self.kept_maps
        low = torch.from_numpy(np.stack([m.low_res for m in self.maps]))[None]
        width, height = self.size
        maps = _normalized_maps(
            low.to(self.map_device), (height, width), self.region, self.settings
        )
        object.__setattr__(self, "kept_maps", maps)  # made once, then kept
        return maps

    @property
    def top(self) -> Prediction:
        return self.predictions[0]

    def cam(self, index: int = 0) -> np.ndarray:
        """The normalised map of ``maps[index]`` at the original image size (H x W float32)."""
        return self.normalized[index]

    def raw_cam(self, index: int = 0) -> np.ndarray:
        """The raw (not normalised) map of ``maps[index]`` upsampled to the image (H x W)."""
        low = torch.from_numpy(self.maps[index].low_res)[None, None]
        width, height = self.size
        return cam.upsample(low, (height, width), self.region)[0, 0].numpy()

    def overlay(
        self, index: int = 0, *, alpha: float = 0.5, cmap: str = "jet", boxes: bool = True
    ) -> Image.Image:
        """The CAM figure for ``maps[index]``: heatmap, box(es), caption."""
        class_map = self.maps[index]
        p = class_map.prediction
        caption = f"{p.name}  {p.probability:.1%}"
        return overlay.render(
            self.image,
            self.normalized[index],
            class_map.boxes if boxes else (),
            caption,
            alpha,
            cmap,
        )

    def figure(self, *, alpha: float = 0.5, cmap: str = "jet", boxes: bool = True) -> Image.Image:
        """One panel per mapped class (a single overlay when there is one class)."""
        panels = [
            self.overlay(i, alpha=alpha, cmap=cmap, boxes=boxes) for i in range(len(self.maps))
        ]
        return panels[0] if len(panels) == 1 else overlay.grid(panels)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (schema in docs/json.md)."""
        width, height = self.size
        return {
            "input": self.name,
            "width": width,
            "height": height,
            "predictions": [_prediction_dict(p) for p in self.predictions],
            "maps": [
                {
                    **_prediction_dict(m.prediction),
                    "boxes": [{"xyxy": b.as_list(), "area": b.area} for b in m.boxes],
                    "raw_min": m.raw_min,
                    "raw_max": m.raw_max,
                    "feature_size": list(m.low_res.shape),
                }
                for m in self.maps
            ],
            "notes": list(self.notes),
        }


#: Results keep their full-size normalised maps up to this many pixels (4 bytes per pixel per
#: map); larger images recompute them when drawn (see ``Result.normalized``).
KEEP_MAPS_PIXELS = 1 << 21


def _normalized_maps(
    low: torch.Tensor,
    size: tuple[int, int],
    region: tuple[float, float, float, float],
    settings: Settings,
) -> tuple[np.ndarray, ...]:
    """1 x k x h x w maps -> k normalised H x W float32 arrays in original image coordinates."""
    up = cam.normalize(cam.upsample(low, size, region), settings.normalize)[0]
    return tuple(np.ascontiguousarray(m) for m in up.cpu().numpy())


def _prediction_dict(p: Prediction) -> dict[str, Any]:
    return {"index": p.index, "name": p.name, "probability": p.probability, "logit": p.logit}


@dataclass
class Localizer:
    """A model plus localisation settings; call it on images.

    ``model``: a registered name (see ``gapcam models``) or a ``GapModel``; ``weights``: None
    (pretrained), "random", or a local file. ``threshold`` applies to the normalised map
    (CAM paper: 0.2); further components of at least ``min_area`` x image area are extra boxes.

    Keyword-only view options (the defaults give one plain forward pass): ``input_size``
    (an int or (height, width), rounded to a multiple of ``FEATURE_STRIDE``; the settings
    record the size used) replaces the model's input size; ``hflip`` adds the mirrored
    image; ``scales`` (factors of the input size) adds resized copies. With several views the
    logits are averaged, and so are the CAMs (each mirrored back and resampled bilinearly to
    the finest feature grid, which is what ``ClassMap.low_res`` then holds) before the
    normalisation. ``backend`` runs the feature extractor: ``eager`` (PyTorch, the default
    here), ``onnx`` (ONNX Runtime, ~3x faster on a CPU) or ``auto`` (see ``gapcam.backends``).

    ``precision``: ``float32`` (default), or ``bfloat16`` / ``float16`` for the feature
    extractor (eager backend, autocast; the logits and CAMs are still computed in float32 from
    the live weights). bfloat16 is ~1.7x faster on CPUs with AVX512-BF16 or AMX and float16 is
    for GPUs; both move normalised CAMs by about 2% of their range (docs/speed.md).

    ``streams``: how many threads will call ``explain`` at once (the ``gapcam localize``
    pipeline runs 2). With the ONNX backend each stream gets its share of torch's threads, so
    one stream's resizing and CAM post-processing overlaps the other's forward pass; see
    ``concurrency`` for what the backend allows (the eager backend: one call at a time).
    """

    model: GapModel | str = DEFAULT_MODEL
    weights: str | Path | None = None
    threshold: float = 0.2
    normalize: str = "minmax"
    min_area: float = 0.01
    resize: str = "stretch"
    device: str | torch.device | None = None
    max_pixels: int = images.DEFAULT_MAX_PIXELS
    _model: GapModel = field(init=False, repr=False)
    _: KW_ONLY
    input_size: int | tuple[int, int] | None = None
    hflip: bool = False
    scales: tuple[float, ...] = (1.0,)
    backend: str = "eager"
    streams: int = 1
    precision: str = "float32"
    _runner: Any = field(init=False, repr=False)

    @classmethod
    def from_preset(
        cls, preset: str, model: GapModel | str = DEFAULT_MODEL, **kwargs: Any
    ) -> Localizer:
        """A Localizer with the view settings of ``PRESETS[preset]``; ``kwargs`` override them."""
        if preset not in PRESETS:
            raise GapcamError(f"preset={preset!r}: use one of {', '.join(PRESETS)}")
        return cls(model, **{**PRESETS[preset], **kwargs})

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise GapcamError(f"threshold={self.threshold}: must be between 0 and 1")
        if not 0.0 <= self.min_area <= 1.0:
            raise GapcamError(f"min_area={self.min_area}: must be a fraction between 0 and 1")
        if self.normalize not in BOX_NORMALIZATIONS:
            raise GapcamError(
                f"normalize={self.normalize!r}: use one of {', '.join(BOX_NORMALIZATIONS)} "
                "(the box threshold is a fraction of the normalised map)"
            )
        if self.resize not in RESIZE_MODES:
            raise GapcamError(f"resize={self.resize!r}: use one of {RESIZE_MODES}")
        self._check_views()
        if not isinstance(self.streams, int) or self.streams < 1:
            raise GapcamError(f"streams={self.streams!r}: give a positive integer")
        device = None if self.device is None else check_device(self.device)
        if isinstance(self.model, GapModel):
            self._model = self.model
        else:
            self._model = build_model(self.model, self.weights)
        if device is not None and device != self._model.device:
            self._model.module.to(device)  # asked for explicitly: a given model moves too
        threads = max(1, torch.get_num_threads() // self.streams) if self.streams > 1 else 0
        self._runner = make_backend(
            self._model,
            self.backend,
            self.preprocess.size,
            threads=threads,
            precision=self.precision,
        )

    @property
    def gap_model(self) -> GapModel:
        return self._model

    @property
    def concurrency(self) -> int:
        """How many threads may call ``explain`` at once: ``streams`` with the ONNX backend;
        1 with eager (its calls switch the module to eval mode and back)."""
        return self.streams if self._runner.name == "onnx" else 1

    @property
    def backend_used(self) -> tuple[str, str]:
        """(backend name, why ``auto`` fell back to eager or "") of this localizer."""
        return self._runner.name, self._runner.note

    def _check_views(self) -> None:
        size = self.input_size
        sides = (size, size) if isinstance(size, int) else size
        if sides is not None and (
            len(sides) != 2 or not all(isinstance(s, int) and s >= 8 for s in sides)
        ):
            raise GapcamError(
                f"input_size={size!r}: give one side or (height, width) in pixels, at least 8"
            )
        self.scales = tuple(self.scales)
        if not self.scales or not all(0.1 <= float(s) <= 8.0 for s in self.scales):
            raise GapcamError(
                f"scales={self.scales!r}: give one or more factors of the input size, "
                "between 0.1 and 8, e.g. (1.0, 1.5)"
            )

    @property
    def preprocess(self) -> Any:
        preprocess = self._model.preprocess.replace(resize=self.resize)
        if self.input_size is None:
            return preprocess
        size = self.input_size
        sides = (size, size) if isinstance(size, int) else tuple(size)
        return preprocess.replace(size=tuple(_stride_multiple(side) for side in sides))

    def views(self) -> list[tuple[Preprocess, bool]]:
        """The (preprocessing, mirrored) pairs one call runs: one per scale, and mirrored too."""
        base = self.preprocess
        height, width = base.size
        sizes = [
            base.size if s == 1.0 else (_stride_multiple(height * s), _stride_multiple(width * s))
            for s in self.scales
        ]
        views = []
        for size in dict.fromkeys(sizes):
            preprocess = base if size == base.size else base.replace(size=size)
            views += [(preprocess, flip) for flip in ((False, True) if self.hflip else (False,))]
        return views

    def settings(self) -> Settings:
        return Settings(
            model=self._model.name,
            threshold=self.threshold,
            normalize=self.normalize,
            min_area=self.min_area,
            resize=self.resize,
            input_size=self.preprocess.size,
            extras={
                **(
                    {"hflip": self.hflip, "scales": list(self.scales)}
                    if self.hflip or self.scales != (1.0,)
                    else {}
                ),
                **({"precision": self.precision} if self.precision != "float32" else {}),
            },
        )

    def __call__(
        self,
        source: Any,
        *,
        classes: Sequence[int | str] | None = None,
        cam_top_k: int = 1,
        top_k: int = 5,
    ) -> Result | list[Result]:
        """Explain one image (path, bytes, PIL, array, tensor) or a list of them (batched).

        CAMs are made for ``classes`` (indices or names) when given, else for the ``cam_top_k``
        best-scoring classes of each image; ``top_k`` predictions are listed.
        """
        single = not isinstance(source, (list, tuple))
        sources = [source] if single else list(source)
        loaded = [images.load_image(s, max_pixels=self.max_pixels) for s in sources]
        results = self.explain(loaded, classes=classes, cam_top_k=cam_top_k, top_k=top_k)
        return results[0] if single else results

    def resolve_classes(self, classes: Sequence[int | str]) -> list[int]:
        if not classes:
            raise ClassSelectionError("classes: give at least one class index or name")
        return [self._model.class_index(c) for c in classes]

    def explain(
        self,
        loaded: Sequence[images.LoadedImage],
        *,
        classes: Sequence[int | str] | None = None,
        cam_top_k: int = 1,
        top_k: int = 5,
        classes_per_image: Sequence[Sequence[int | str]] | None = None,
    ) -> list[Result]:
        """One forward pass (per view) for a batch of loaded images.

        ``classes_per_image`` (one list per image, all of the same length) maps different
        classes for each image, e.g. each image's ground-truth class, in the same pass.
        """
        if not loaded:
            return []
        model = self._model
        chosen = self._chosen(classes, classes_per_image, len(loaded))
        views = self.views()
        # the ONNX runner never calls the module: no need to walk it for eval mode
        eager = self._runner.name == "eager"
        with inference_state(model.module) if eager else torch.inference_mode():
            features = self._features(loaded, views)
            logits = model.logits(features[0])
            if len(features) > 1:
                logits = torch.stack([logits, *map(model.logits, features[1:])]).mean(dim=0)
            probabilities = torch.softmax(logits.float(), dim=1)
            k = min(max(top_k, 1), model.num_classes)
            n_maps = min(max(cam_top_k, 1), model.num_classes)
            top_i = probabilities.topk(max(k, n_maps), dim=1).indices
            mapped = top_i[:, :n_maps] if chosen is None else chosen.to(logits.device)
            lows = [
                cam.class_maps(f, model.weight, mapped, model.bias, model.head).float()
                for f in features
            ]
        low = lows[0] if len(lows) == 1 else cam.merge_views(lows, [f for _, f in views])
        grid = max(range(len(views)), key=lambda v: lows[v].shape[-2] * lows[v].shape[-1])
        preprocess = views[grid][0]
        settings = self.settings()
        mapped_rows, logit_rows, probability_rows, top_rows = (
            t.cpu().tolist() for t in (mapped, logits, probabilities, top_i[:, :k])
        )
        return [
            self._result(
                item,
                low[i : i + 1],
                mapped_rows[i],
                logit_rows[i],
                probability_rows[i],
                top_rows[i],
                preprocess,
                settings,
            )
            for i, item in enumerate(loaded)
        ]

    def _chosen(
        self,
        classes: Sequence[int | str] | None,
        per_image: Sequence[Sequence[int | str]] | None,
        count: int,
    ) -> torch.Tensor | None:
        """The N x k class indices to map, or None for each image's best classes."""
        if classes is not None and per_image is not None:
            raise ClassSelectionError("give classes or classes_per_image, not both")
        if classes is not None:
            return torch.tensor(self.resolve_classes(classes)).expand(count, -1)
        if per_image is None:
            return None
        if len(per_image) != count or any(isinstance(row, (str, int)) for row in per_image):
            raise ClassSelectionError(
                f"classes_per_image: give one list of classes per image ({count} lists), "
                "e.g. [[281], [285]]"
            )
        rows = [self.resolve_classes(row) for row in per_image]
        if len({len(row) for row in rows}) > 1:
            raise ClassSelectionError(
                "classes_per_image: every image needs the same number of classes; got "
                f"{sorted({len(row) for row in rows})}"
            )
        return torch.tensor(rows)

    def _features(
        self, loaded: Sequence[images.LoadedImage], views: Sequence[tuple[Preprocess, bool]]
    ) -> list[torch.Tensor]:
        """Feature maps of every view; mirrored views reuse their size's input tensor."""
        model = self._model
        inputs: dict[tuple[int, int], torch.Tensor] = {}
        features = []
        for preprocess, flip in views:
            x = inputs.get(preprocess.size)
            if x is None:
                arrays = [images.resize_for_model(item.image, preprocess) for item in loaded]
                x = images.to_tensor(arrays, preprocess)
                x = inputs[preprocess.size] = x.to(device=model.device, dtype=model.weight.dtype)
            features.append(self._runner.features(x.flip(-1) if flip else x))
        return features

    def _result(
        self,
        item: images.LoadedImage,
        low: torch.Tensor,
        mapped: list[int],
        logits: list[float],
        probabilities: list[float],
        top: list[int],
        preprocess: Preprocess,
        settings: Settings,
    ) -> Result:
        names = self._model.class_names

        def prediction(index: int) -> Prediction:
            return Prediction(index, names[index], probabilities[index], logits[index])

        width, height = item.size
        _, region = images.fit_region(width, height, preprocess)
        normalized = _normalized_maps(low, (height, width), region, settings)
        low_np = low[0].cpu().numpy()
        maps = tuple(
            ClassMap(
                prediction=prediction(int(c)),
                low_res=low_np[j],
                boxes=boxes_from_map(normalized[j], self.threshold, self.min_area),
                raw_min=float(low_np[j].min()),
                raw_max=float(low_np[j].max()),
            )
            for j, c in enumerate(mapped)
        )
        return Result(
            name=item.name,
            image=item.image,
            predictions=tuple(prediction(i) for i in top),
            maps=maps,
            settings=settings,
            region=region,
            path=item.path,
            notes=item.notes,
            kept_maps=normalized if width * height <= KEEP_MAPS_PIXELS else None,
            map_device=str(low.device),
        )

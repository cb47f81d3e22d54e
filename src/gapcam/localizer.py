"""The one pipeline every front end calls: images -> predictions, CAMs and boxes.

>>> loc = Localizer()                       # the embedded efficientnet_lite0
>>> result = loc("examples/cat.png")        # one image -> one Result; a list -> a list
>>> result.predictions[0].name, result.maps[0].boxes[0]
>>> result.overlay().save("cat-cam.png")

Beyond one plain forward pass (gradient-free, measured in docs/evaluate.md): ``input_size``
runs the network at another resolution (finer maps), ``hflip`` averages the CAM of the mirrored
image (mirrored back), ``scales`` averages CAMs over input sizes; ``Localizer.from_preset`` picks
a measured combination for the model (``preset_views``: ``MODEL_PRESETS``, ``PRESETS``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import numpy as np
import torch

from gapcam import cam, images
from gapcam.backends import Backend, check_choices, check_device, make_backend
from gapcam.boxes import boxes_from_map
from gapcam.errors import ClassSelectionError, GapcamError
from gapcam.models import GapModel, build_model, inference_state, model_or_checkpoint
from gapcam.models.dense import dilate
from gapcam.result import KEEP_MAPS_PIXELS, Result, map_size, normalized_batch, scale_boxes
from gapcam.types import (
    BOX_NORMALIZATIONS,
    DEFAULT_MODEL,
    MODEL_PRESETS,
    OUTPUT_STRIDES,
    PRESETS,
    RESIZE_MODES,
    ClassMap,
    Placement,
    Prediction,
    Preprocess,
    Settings,
)

if TYPE_CHECKING:
    from gapcam.video import VideoFrames

#: The output stride of the supported networks' last feature map. View sizes are rounded to a
#: multiple of it: otherwise the h x w grid spans more than the input (336 px gives an 11 x 11
#: grid that covers 352 px) and upsampling it over the input would misplace cells by up to half
#: a cell.
FEATURE_STRIDE = 32

#: The largest side of the network's input, views (``scales``) included: the input and the
#: activations grow with its square (input_size=40000 would ask for 19 GB for the input alone).
MAX_INPUT_SIDE = 2048


def preset_views(preset: str, model: str | None = None) -> dict[str, Any]:
    """The view settings of ``preset`` for the model named ``model`` (``MODEL_PRESETS`` for the
    embedded models, ``PRESETS`` for any other; None: the default model)."""
    if preset not in PRESETS:
        raise GapcamError(f"preset={preset!r}: use one of {', '.join(PRESETS)}")
    table = MODEL_PRESETS.get(DEFAULT_MODEL if model is None else model, PRESETS)
    return dict(table[preset])


def view_options(
    preset: str | None = None,
    input_size: int | None = None,
    hflip: bool = False,
    scales: Sequence[float] | None = None,
    output_stride: int | None = None,
    model: str | None = None,
) -> dict[str, Any]:
    """Localizer keyword arguments from a preset (for the model named ``model``, None: the
    default model), overridden by explicit view options."""
    views = preset_views(preset, model) if preset is not None else {}
    if input_size is not None:
        views["input_size"] = input_size
    if hflip:
        views["hflip"] = True
    if scales:
        views["scales"] = tuple(scales)
    if output_stride is not None:
        views["output_stride"] = output_stride
    return views


@dataclass(frozen=True)
class Scores:
    """What one forward pass gives for a batch of N images, before per-image results:
    ``logits`` and ``probabilities`` (N x K), the ``top`` classes by probability (N x k, for
    the predictions), the ``mapped`` classes (N x m) and their raw maps ``low`` (N x m x h x w,
    on the model's device), and where the maps' grid lies (``preprocess``, ``placement``)."""

    logits: torch.Tensor
    probabilities: torch.Tensor
    top: torch.Tensor
    mapped: torch.Tensor
    low: torch.Tensor
    preprocess: Preprocess
    placement: Placement


def _stride_multiple(side: float) -> int:
    return max(FEATURE_STRIDE, int(side / FEATURE_STRIDE + 0.5) * FEATURE_STRIDE)


@dataclass(frozen=True)
class Localizer:
    """A model plus localisation settings; call it on images.

    ``model``: a registered name (see ``gapcam models``) or a ``GapModel``; ``weights``: None
    (pretrained), "random", or a local file. ``threshold`` applies to the normalised map
    (CAM paper: 0.2); further components of at least ``min_area`` x image area are extra boxes.

    Keyword-only view options (the defaults give one plain forward pass): ``input_size``
    (an int or (height, width), each a multiple of ``FEATURE_STRIDE``) replaces the model's
    input size; ``hflip`` adds the mirrored
    image; ``scales`` (factors of the input size) adds resized copies. With several views the
    logits are averaged, and so are the CAMs (each mirrored back and resampled bilinearly to
    the finest feature grid, which is what ``ClassMap.low_res`` then holds) before the
    normalisation. ``output_stride`` 16 or 8 runs the network's last stride-2 stage(s)
    dilated (``gapcam.models.dense``): 4x or 16x the map cells from the same weights, the same
    logits. ``backend`` runs the feature extractor: ``eager`` (PyTorch, the default
    here), ``onnx`` (ONNX Runtime) or ``auto`` (see ``gapcam.backends``; speed measured in
    docs/speed.md).

    ``precision``: ``float32`` (default), or ``bfloat16`` / ``float16`` for the feature
    extractor (eager backend, autocast; the logits and CAMs are still computed in float32 from
    the live weights); float16 needs a GPU. What each costs and how far it moves the maps is
    measured in docs/speed.md.

    ``streams``: how many threads will call ``explain`` at once (the ``gapcam localize``
    pipeline runs 2). With the ONNX backend each stream gets its share of torch's threads, so
    one stream's resizing and CAM post-processing overlaps the other's forward pass; see
    ``concurrency`` for what the backend allows (the eager backend: one call at a time).

    A Localizer is immutable: ``dataclasses.replace(loc, threshold=0.3)`` makes a variant
    (it shares the built model; the backend is made again for the new settings). Once built,
    ``model`` holds the GapModel and ``weights`` is None: a variant with other ``weights`` is
    refused (make a new Localizer from the name), and one with another ``device`` moves the
    model the two share (make a new Localizer to run on two devices).
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
    output_stride: int = 32
    backend: str = "eager"
    streams: int = 1
    precision: str = "float32"
    calibration: Sequence[Any] | None = field(default=None, repr=False)
    _runner: Backend = field(init=False, repr=False)

    @classmethod
    def from_preset(
        cls, preset: str, model: GapModel | str = DEFAULT_MODEL, **kwargs: Any
    ) -> Localizer:
        """A Localizer with the view settings of ``preset`` for ``model`` (``preset_views``);
        ``kwargs`` override them."""
        name = model if isinstance(model, str) else model.name
        return cls(model, **{**preset_views(preset, name), **kwargs})

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> Localizer:
        """A Localizer from plain, picklable settings, as a front end sends them to its workers:
        the keywords of ``Localizer``, with ``model`` a registered name (None: the default)
        and ``checkpoint`` a run folder made by ``gapcam train`` (instead of ``model``)."""
        settings = dict(options)
        model = model_or_checkpoint(
            settings.pop("model", None), settings.get("weights"), settings.pop("checkpoint", None)
        )
        return cls(model, **settings)

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        """Check the settings ``from_options`` would get, without building the model: what a
        front end does before it sends them to workers (the Ray actors) that build their own.
        ``GapcamError`` names the first bad one, as ``Localizer`` itself would."""
        settings = {k: v for k, v in options.items() if k not in ("model", "checkpoint")}
        probe = object.__new__(cls)
        defaults = {f.name: f.default for f in fields(cls) if f.init}
        for name, value in {**defaults, **settings}.items():
            object.__setattr__(probe, name, value)
        probe._check_settings()

    def __post_init__(self) -> None:
        # frozen: the fields are checked and completed here, once, then never change
        setattr_ = object.__setattr__
        self._check_settings()
        if isinstance(self.model, GapModel) and self.weights is not None:
            raise GapcamError(
                f"weights={str(self.weights)!r}: the model is already built (a GapModel); "
                "weights apply when model is a name: make a new Localizer(name, weights=...)"
            )
        device = None if self.device is None else check_device(self.device)
        model = (
            self.model
            if isinstance(self.model, GapModel)
            else build_model(self.model, self.weights)
        )
        setattr_(self, "model", model)  # a variant made with dataclasses.replace reuses it
        setattr_(self, "_model", model)
        setattr_(self, "weights", None)  # ... and its weights are in it
        self._check_view_sizes()
        if device is not None and device != model.device:
            model.module.to(device)  # asked for explicitly: a given model moves too
        # dilated after the move: the copy shares the moved parameters and buffers
        sizes = [view.size for view, _ in self.views()]
        setattr_(self, "_model", dilate(model, self.output_stride, sizes))
        threads = max(1, torch.get_num_threads() // self.streams) if self.streams > 1 else 0
        runner = make_backend(
            self._model,
            self.backend,
            self.preprocess.size,
            threads=threads,
            precision=self.precision,
            calibration=self._calibration(),
        )
        setattr_(self, "_runner", runner)

    def _calibration(self) -> Callable[[tuple[int, int]], torch.Tensor] | None:
        """The int8 calibration inputs at a size, from the ``calibration`` images, or None.
        The images are decoded (each within ``max_pixels``) when the inputs of a size are made,
        one at a time, and only their copies at that size kept: the images themselves are never
        held together, nor kept (32 photos of 12 megapixels would take 1.2 GB for the
        Localizer's life). The first size is made while the Localizer is built, so a bad image
        stops it there."""
        if self.calibration is None or self.precision != "int8":
            return None
        sources, base, max_pixels = self.calibration, self.preprocess, self.max_pixels

        def inputs(size: tuple[int, int]) -> torch.Tensor:
            preprocess = base.replace(size=size)
            arrays = []
            for source in sources:
                try:
                    item = images.load_image(source, max_pixels=max_pixels)
                except GapcamError as exc:  # say which argument the bad image came from
                    raise GapcamError(f"calibration= image {exc}") from exc
                arrays.append(images.resize_for_model(item.image, preprocess))
                del item  # before the next one is decoded
            return images.to_tensor(arrays, preprocess)

        return inputs

    def _check_settings(self) -> None:
        """The settings that need no model: ranges, choices, views."""
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
        if self.output_stride not in OUTPUT_STRIDES:
            raise GapcamError(
                f"output_stride={self.output_stride!r}: use one of "
                f"{', '.join(map(str, OUTPUT_STRIDES))} (16 and 8 run the last stage dilated)"
            )
        if not isinstance(self.streams, int) or self.streams < 1:
            raise GapcamError(f"streams={self.streams!r}: give a positive integer")
        self._check_calibration()
        check_choices(self.backend, self.precision)

    def _check_calibration(self) -> None:
        from gapcam.quantize import MAX_CALIBRATION_IMAGES

        given = self.calibration
        if given is None:
            return
        if self.precision != "int8":
            raise GapcamError("calibration= is for precision='int8' only; leave it out")
        if isinstance(given, (str, bytes, Path)) or not isinstance(given, Sequence):
            raise GapcamError(
                "calibration= takes a list of images (paths, bytes, PIL images, arrays)"
            )
        if not 1 <= len(given) <= MAX_CALIBRATION_IMAGES:
            raise GapcamError(
                f"calibration=: {len(given)} images; give 1 to {MAX_CALIBRATION_IMAGES} "
                "(a few dozen representative ones are enough)"
            )
        object.__setattr__(self, "calibration", tuple(given))

    def __repr__(self) -> str:
        """The model's name and the settings that differ from the defaults, on one line (the
        built GapModel is ``model``; the default dataclass repr printed its whole network)."""
        shown = [repr(self._model.name)]
        for item in fields(self):
            if not item.init or not item.repr or item.name in ("model", "weights"):
                continue
            value = getattr(self, item.name)
            if value != item.default:
                shown.append(f"{item.name}={value!r}")
        if self._model.device.type != "cpu":
            shown.append(f"on {self._model.device}")
        return f"Localizer({', '.join(shown)})"

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
        if sides is not None and max(sides) > MAX_INPUT_SIDE:
            raise GapcamError(
                f"input_size={size!r}: at most {MAX_INPUT_SIDE} pixels a side (the memory of a "
                "forward pass grows with its square)"
            )
        if sides is not None and any(side % FEATURE_STRIDE for side in sides):
            near = sorted({_stride_multiple(side) for side in sides})
            raise GapcamError(
                f"input_size={size!r}: must be a multiple of {FEATURE_STRIDE} (the feature "
                f"grid's stride), e.g. {', '.join(map(str, near))}"
            )
        object.__setattr__(self, "scales", tuple(self.scales))
        if not self.scales or not all(0.1 <= float(s) <= 8.0 for s in self.scales):
            raise GapcamError(
                f"scales={self.scales!r}: give one or more factors of the input size, "
                "each between 0.1 and 8, such as 1.0 and 1.5"
            )

    def _check_view_sizes(self) -> None:
        """Every view's input within ``MAX_INPUT_SIDE`` (scales multiply the input size)."""
        height, width = max((view.size for view, _ in self.views()), key=max)
        if max(height, width) > MAX_INPUT_SIDE and self.scales == (1.0,):
            raise GapcamError(
                f"the model's input is {height}x{width} pixels, over {MAX_INPUT_SIDE} a side; "
                "give a smaller input_size="
            )
        if max(height, width) > MAX_INPUT_SIDE:
            base = "x".join(map(str, self.preprocess.size))
            raise GapcamError(
                f"scales= up to {max(self.scales)}: the largest view would be {height}x{width} "
                f"pixels (input {base} times {max(self.scales)}), over {MAX_INPUT_SIDE} a side; "
                "lower the largest scale or input_size="
            )

    @functools.cached_property
    def preprocess(self) -> Preprocess:
        preprocess = self._model.preprocess.replace(resize=self.resize)
        if self.input_size is None:
            return preprocess
        size = self.input_size
        return preprocess.replace(size=(size, size) if isinstance(size, int) else tuple(size))

    def views(self) -> list[tuple[Preprocess, bool]]:
        """The (preprocessing, mirrored) pairs one call runs: one per scale, and mirrored too."""
        return list(self._views)

    @functools.cached_property
    def _views(self) -> tuple[tuple[Preprocess, bool], ...]:
        """``views`` made once (a Localizer never changes; a variant is a new one)."""
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
        return tuple(views)

    def settings(self) -> Settings:
        return self._settings

    @functools.cached_property
    def _settings(self) -> Settings:
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
                **({"output_stride": self.output_stride} if self.output_stride != 32 else {}),
            },
        )

    def __call__(
        self,
        source: Any,
        *,
        classes: Sequence[int | str] | None = None,
        top_k: int = 1,
        predictions: int = 5,
    ) -> Result | list[Result]:
        """Explain one image (path, bytes, PIL, array, tensor) or a list of them (batched).

        CAMs are made for ``classes`` (indices or names) when given, else for the ``top_k``
        best-scoring classes of each image (as ``gapcam localize --top-k``); the
        ``predictions`` best classes are listed.
        """
        single = not isinstance(source, (list, tuple))
        sources = [source] if single else list(source)
        loaded = [images.load_image(s, max_pixels=self.max_pixels) for s in sources]
        results = self.explain(loaded, classes=classes, top_k=top_k, predictions=predictions)
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
        top_k: int = 1,
        predictions: int = 5,
        classes_per_image: Sequence[Sequence[int | str]] | None = None,
    ) -> list[Result]:
        """One forward pass (per view) for a batch of loaded images.

        ``classes_per_image`` (one list per image, all of the same length) maps different
        classes for each image, e.g. each image's ground-truth class, in the same pass.
        """
        if not loaded:
            return []
        scores = self.scores(
            loaded,
            classes=classes,
            top_k=top_k,
            predictions=predictions,
            classes_per_image=classes_per_image,
        )
        settings = self.settings()
        mapped_rows, logit_rows, probability_rows, top_rows = (
            t.cpu().tolist()
            for t in (scores.mapped, scores.logits, scores.probabilities, scores.top)
        )
        placed = self._placed_maps(loaded, scores.low, scores.preprocess, scores.placement)
        low = scores.low.cpu().numpy()
        return [
            self._result(
                item,
                low[i],
                mapped_rows[i],
                logit_rows[i],
                probability_rows[i],
                top_rows[i],
                placed[i],
                settings,
            )
            for i, item in enumerate(loaded)
        ]

    def scores(
        self,
        loaded: Sequence[images.LoadedImage],
        *,
        classes: Sequence[int | str] | None = None,
        top_k: int = 1,
        predictions: int = 5,
        classes_per_image: Sequence[Sequence[int | str]] | None = None,
    ) -> Scores:
        """The forward pass of ``explain`` without the per-image results: logits and the raw
        low-resolution maps of the mapped classes for a batch (``gapcam.video`` smooths them
        over time before ``frame_result`` makes each frame's Result)."""
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
            k = min(max(predictions, 1), model.num_classes)
            n_maps = min(max(top_k, 1), model.num_classes)
            top_i = probabilities.topk(max(k, n_maps), dim=1).indices
            mapped = top_i[:, :n_maps] if chosen is None else chosen.to(logits.device)
            lows = [
                cam.class_maps(f, model.weight, mapped, model.bias, model.head).float()
                for f in features
            ]
        placements = []
        for f, (_, flip) in zip(features, views, strict=True):
            cells = (f.shape[-2], f.shape[-1])
            subgrid = model.subgrid(cells)
            placements.append((subgrid.mirrored(cells) if flip else subgrid).placement(cells))
        low, placement = lows[0], placements[0]
        if len(lows) > 1:
            low, placement = cam.merge_views(lows, [f for _, f in views], placements)
        grid = max(range(len(views)), key=lambda v: lows[v].shape[-2] * lows[v].shape[-1])
        return Scores(
            logits=logits,
            probabilities=probabilities,
            top=top_i[:, :k],
            mapped=mapped,
            low=low,
            preprocess=views[grid][0],
            placement=placement,
        )

    def frame_result(
        self,
        item: images.LoadedImage,
        logits: torch.Tensor,
        mapped: Sequence[int],
        low: torch.Tensor,
        preprocess: Preprocess,
        placement: Placement,
        *,
        predictions: int = 5,
    ) -> Result:
        """The Result of one image from logits (K) and raw maps (1 x k x h x w) of the
        ``mapped`` classes made elsewhere (``scores``, then smoothed over the frames of a
        video): predictions, normalised maps and boxes as ``explain`` makes them."""
        probabilities = torch.softmax(logits.float(), dim=0)
        k = min(max(predictions, 1), self._model.num_classes)
        top = probabilities.topk(k).indices
        return self._result(
            item,
            low[0].cpu().numpy(),
            [int(c) for c in mapped],
            logits.cpu().tolist(),
            probabilities.cpu().tolist(),
            top.cpu().tolist(),
            self._placed_maps([item], low, preprocess, placement)[0],
            self.settings(),
        )

    def video(self, source: Any, **options: Any) -> VideoFrames:
        """The frames of a video (a path or a seekable binary file) as ``FrameResult``s, made
        as they are asked for (``gapcam.video.VideoFrames``; keywords: ``classes``, ``top_k``,
        ``fps``, ``smooth``, ``sampled_only``, ``predictions``); it also holds the clip's
        ``classes`` and their ``mean_probability``. ``gapcam.video.write`` turns the frames into
        an annotated video. Needs PyAV (``pip install 'gapcam[video]'``)."""
        from gapcam import video

        return video.frames(self, source, **options)

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

    def _placed_maps(
        self,
        loaded: Sequence[images.LoadedImage],
        low: torch.Tensor,
        preprocess: Preprocess,
        placement: Placement,
    ) -> list[PlacedMaps]:
        """Each image's region and normalised maps (``PlacedMaps``) from the raw maps ``low``
        (N x k x h x w). Images of the same size share one upsampling and normalisation."""
        settings = self.settings()
        groups: dict[tuple[int, int, tuple[float, float, float, float]], list[int]] = {}
        for i, item in enumerate(loaded):
            width, height = item.size
            region = cam.placed(images.fit_region(width, height, preprocess)[1], placement)
            groups.setdefault((width, height, region), []).append(i)
        placed: list[PlacedMaps | None] = [None] * len(loaded)
        for (width, height, region), members in groups.items():
            rows = low[members]
            size, full = map_size(width, height), (height, width)
            box_maps = normalized_batch(rows, size, region, settings)
            kept: Sequence[tuple[np.ndarray, ...] | None] = [None] * len(members)
            if width * height <= KEEP_MAPS_PIXELS:
                kept = box_maps if size == full else normalized_batch(rows, full, region, settings)
            for j, i in enumerate(members):
                placed[i] = PlacedMaps(region, size, box_maps[j], kept[j], str(low.device))
        return cast("list[PlacedMaps]", placed)

    def _result(
        self,
        item: images.LoadedImage,
        low: np.ndarray,
        mapped: list[int],
        logits: list[float],
        probabilities: list[float],
        top: list[int],
        placed: PlacedMaps,
        settings: Settings,
    ) -> Result:
        """One image's Result from its raw maps ``low`` (k x h x w) and what ``scores`` and
        ``_placed_maps`` made for it."""
        names = self._model.class_names

        def prediction(index: int) -> Prediction:
            return Prediction(index, names[index], probabilities[index], logits[index])

        width, height = item.size
        full = (height, width)
        maps = tuple(
            ClassMap(
                prediction=prediction(int(c)),
                low_res=low[j],
                boxes=scale_boxes(
                    boxes_from_map(placed.box_maps[j], self.threshold, self.min_area),
                    placed.size,
                    full,
                ),
                raw_min=float(low[j].min()),
                raw_max=float(low[j].max()),
            )
            for j, c in enumerate(mapped)
        )
        return Result(
            name=item.name,
            image=item.image,
            predictions=tuple(prediction(i) for i in top),
            maps=maps,
            settings=settings,
            region=placed.region,
            path=item.path,
            notes=item.notes,
            source_format=item.format,
            kept_maps=placed.kept,
            box_maps=placed.box_maps,
            map_device=placed.device,
        )


class PlacedMaps(NamedTuple):
    """Where one image's maps lie (``region``, as ``cam.upsample`` takes it) and its
    normalised maps: at box resolution (``size``, ``result.map_size``) and, for images up to
    ``KEEP_MAPS_PIXELS``, at full size (``kept``; the same arrays when the sizes agree)."""

    region: tuple[float, float, float, float]
    size: tuple[int, int]
    box_maps: tuple[np.ndarray, ...]
    kept: tuple[np.ndarray, ...] | None
    #: where the maps were made (the model's device): ``Result.normalized`` makes them there
    device: str

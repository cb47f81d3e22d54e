"""The one pipeline every front end calls: images -> predictions, CAMs and boxes.

>>> loc = Localizer()                       # the embedded efficientnet_lite0
>>> result = loc("examples/cat.png")        # one image -> one Result; a list -> a list
>>> result.predictions[0].name, result.maps[0].boxes[0]
>>> result.overlay().save("cat-cam.png")
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from gapcam import cam, images, overlay
from gapcam.boxes import boxes_from_map
from gapcam.errors import ClassSelectionError, GapcamError
from gapcam.models import DEFAULT_MODEL, GapModel, build_model, inference_state
from gapcam.types import RESIZE_MODES, ClassMap, Prediction, Settings


@dataclass(frozen=True)
class Result:
    """Everything gapcam knows about one image."""

    name: str
    image: Image.Image
    predictions: tuple[Prediction, ...]
    maps: tuple[ClassMap, ...]
    normalized: tuple[np.ndarray, ...]
    settings: Settings
    region: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)
    path: Path | None = None
    notes: tuple[str, ...] = ()

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size

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


def _prediction_dict(p: Prediction) -> dict[str, Any]:
    return {"index": p.index, "name": p.name, "probability": p.probability, "logit": p.logit}


@dataclass
class Localizer:
    """A model plus localisation settings; call it on images.

    ``model``: a registered name (see ``gapcam models``) or a ``GapModel``; ``weights``: None
    (pretrained), "random", or a local file. ``threshold`` applies to the normalised map
    (CAM paper: 0.2); further components of at least ``min_area`` x image area are extra boxes.
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

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise GapcamError(f"threshold={self.threshold}: must be between 0 and 1")
        if not 0.0 <= self.min_area <= 1.0:
            raise GapcamError(f"min_area={self.min_area}: must be a fraction between 0 and 1")
        if self.normalize not in cam.NORMALIZATIONS:
            raise GapcamError(f"normalize={self.normalize!r}: use one of {cam.NORMALIZATIONS}")
        if self.resize not in RESIZE_MODES:
            raise GapcamError(f"resize={self.resize!r}: use one of {RESIZE_MODES}")
        if isinstance(self.model, GapModel):
            self._model = self.model
        else:
            self._model = build_model(self.model, self.weights)
            if self.device is not None:
                self._model.module.to(self.device)

    @property
    def gap_model(self) -> GapModel:
        return self._model

    @property
    def preprocess(self) -> Any:
        return self._model.preprocess.replace(resize=self.resize)

    def settings(self) -> Settings:
        return Settings(
            model=self._model.name,
            threshold=self.threshold,
            normalize=self.normalize,
            min_area=self.min_area,
            resize=self.resize,
            input_size=self._model.preprocess.size,
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
    ) -> list[Result]:
        """One forward pass for a batch of loaded images."""
        if not loaded:
            return []
        model, preprocess = self._model, self.preprocess
        chosen = self.resolve_classes(classes) if classes is not None else None
        arrays = [images.resize_for_model(item.image, preprocess) for item in loaded]
        x = images.to_tensor(arrays, preprocess).to(device=model.device, dtype=model.weight.dtype)
        with inference_state(model.module):
            features = model.features(x)
            logits = model.logits(features)
            probabilities = torch.softmax(logits.float(), dim=1)
            k = min(max(top_k, 1), model.num_classes)
            n_maps = min(max(cam_top_k, 1), model.num_classes)
            top_i = probabilities.topk(max(k, n_maps), dim=1).indices
            if chosen is None:
                mapped = top_i[:, :n_maps]
            else:
                mapped = torch.tensor(chosen, device=x.device).expand(len(loaded), -1)
            low = cam.class_maps(features, model.weight, mapped, model.bias, model.head).float()
        return [
            self._result(item, low[i : i + 1], mapped[i], logits[i], probabilities[i], top_i[i, :k])
            for i, item in enumerate(loaded)
        ]

    def _result(
        self,
        item: images.LoadedImage,
        low: torch.Tensor,
        mapped: torch.Tensor,
        logits: torch.Tensor,
        probabilities: torch.Tensor,
        top: torch.Tensor,
    ) -> Result:
        names = self._model.class_names

        def prediction(index: int) -> Prediction:
            return Prediction(
                index, names[index], float(probabilities[index]), float(logits[index])
            )

        width, height = item.size
        _, region = images.fit_region(width, height, self.preprocess)
        up = cam.normalize(cam.upsample(low, (height, width), region), self.normalize)[0]
        normalized = tuple(np.ascontiguousarray(m) for m in up.cpu().numpy())
        low_np = low[0].cpu().numpy()
        maps = tuple(
            ClassMap(
                prediction=prediction(int(c)),
                low_res=low_np[j],
                boxes=boxes_from_map(normalized[j], self.threshold, self.min_area),
                raw_min=float(low_np[j].min()),
                raw_max=float(low_np[j].max()),
            )
            for j, c in enumerate(mapped.tolist())
        )
        return Result(
            name=item.name,
            image=item.image,
            predictions=tuple(prediction(int(i)) for i in top.tolist()),
            maps=maps,
            normalized=normalized,
            settings=self.settings(),
            region=region,
            path=item.path,
            notes=item.notes,
        )

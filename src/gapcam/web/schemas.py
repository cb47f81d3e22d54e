"""Pydantic models of the JSON API; they exist to document it in the OpenAPI schema."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    """Every error answer: one human-readable line, never a traceback."""

    error: str = Field(description="what went wrong and how to fix it")


class BoxBody(BaseModel):
    xyxy: list[float] = Field(
        description="x0, y0, x1, y1 in original-image pixels, pixel-edge convention"
    )
    area: int = Field(description="pixels in the connected component the box encloses")


class PredictionBody(BaseModel):
    index: int
    name: str
    probability: float
    logit: float


class MapBody(PredictionBody):
    boxes: list[BoxBody] = Field(
        description="boxes at the requested threshold, largest component first"
    )
    raw_min: float
    raw_max: float
    feature_size: list[int] = Field(description="h, w of the raw map at feature resolution")
    map_png: str = Field(
        description="the normalised map as an 8-bit grayscale PNG data URL of "
        "map_width x map_height pixels (value / 255 = normalised activation)"
    )


class LocalizeBody(BaseModel):
    input: str = Field(description="the uploaded file's name, echoed (never used as a path)")
    width: int
    height: int
    model: str
    threshold: float
    min_area: float
    normalize: str
    predictions: list[PredictionBody]
    maps: list[MapBody] = Field(description="one CAM per predicted class, same order")
    map_width: int
    map_height: int
    preview: str | None = Field(
        None, description="the decoded image as a JPEG data URL, when `preview` > 0"
    )
    notes: list[str]
    elapsed_ms: float


class ExampleBody(BaseModel):
    name: str
    url: str


class InfoBody(BaseModel):
    version: str
    model: str
    num_classes: int
    input_size: list[int]
    threshold: float
    max_upload_bytes: int
    max_pixels: int
    examples: list[ExampleBody]


class ColormapBody(BaseModel):
    name: str
    lut: list[int] = Field(description="256 RGB triples, flattened: 768 values in 0..255")


class ColormapsBody(BaseModel):
    default: str
    colormaps: list[ColormapBody]

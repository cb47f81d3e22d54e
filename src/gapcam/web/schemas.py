"""Pydantic models of the JSON API; they exist to document it in the OpenAPI schema.

The answer of ``POST /api/localize`` is described by ``gapcam.schema``, the JSON Schema of
``gapcam localize --json``, extended with the web's own fields.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field, RootModel, WithJsonSchema

from gapcam.schema import BOX, MAP, RESULT_FIELDS, SETTINGS, array, extend, typed


class ErrorBody(BaseModel):
    """Every error answer: one human-readable line, never a traceback."""

    error: str = Field(description="what went wrong and how to fix it")


#: The answer of ``POST /api/localize``: one result entry as ``gapcam localize --json`` writes it
#: (``gapcam.schema``, without file paths), with boxes at the requested threshold, each map as a
#: PNG, and the settings the boxes were drawn with.
LOCALIZE_ANSWER = extend(
    RESULT_FIELDS,
    required={
        "input": typed("string", "the uploaded file's name, echoed (never used as a path)"),
        **{
            key: SETTINGS["properties"][key]
            for key in ("model", "threshold", "min_area", "normalize")
        },
        "maps": array(
            extend(
                MAP,
                required={
                    "boxes": array(BOX, "at the requested threshold, largest component first"),
                    "map_png": typed(
                        "string",
                        "the normalised map as an 8-bit grayscale PNG data URL of map_width x "
                        "map_height pixels (value / 255 = normalised activation)",
                    ),
                },
            ),
            "one CAM per predicted class, same order",
        ),
        "map_width": typed("integer", minimum=1),
        "map_height": typed("integer", minimum=1),
        "preview": typed(
            ["string", "null"], "the decoded image as a JPEG data URL, when `preview` > 0"
        ),
        "elapsed_ms": typed("number", "time to decode, explain and encode", minimum=0),
    },
    description="the top classes of one image, each one's CAM and boxes",
)


class LocalizeBody(RootModel[Annotated[dict[str, Any], WithJsonSchema(LOCALIZE_ANSWER)]]):
    """``LOCALIZE_ANSWER`` in the OpenAPI schema; the answer's dict is sent as it is."""


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

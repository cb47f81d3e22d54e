"""The JSON that gapcam writes, as JSON Schema (draft 2020-12), written once as Python data.

``localize_schema()`` is the ``gapcam localize --json`` document (``gapcam.localize/1``) and
``RESULT`` one image's entry of its ``results``: ``Result.to_dict`` plus the paths of the files
written for that image; ``VIDEO`` one video's, with its analysed ``FRAME``s. The web API answers ``RESULT_FIELDS`` extended with its own fields
(``gapcam.web.schemas``, served in ``/openapi.json``). docs/json.md shows ``text()``, which
``python -m gapcam.schema`` prints; a test keeps the two equal.

Every object is closed (``additionalProperties: false``): a key the code writes and this module
does not describe fails the tests that validate real output.
"""

from __future__ import annotations

import json
import re
from typing import Any

from gapcam.types import BACKENDS, BOX_NORMALIZATIONS, OUTPUT_STRIDES, PRECISIONS, RESIZE_MODES

DRAFT = "https://json-schema.org/draft/2020-12/schema"
#: the ``schema`` value of a ``--json`` document: bumped when a change would break a reader
LOCALIZE_FORMAT = "gapcam.localize/1"

Schema = dict[str, Any]


def typed(kind: str | list[str], description: str = "", **rules: Any) -> Schema:
    """``{"type": kind}`` with a description and further keywords (``minimum``, ``enum``...)."""
    return {"type": kind, **({"description": description} if description else {}), **rules}


def array(items: Schema, description: str = "", **rules: Any) -> Schema:
    return typed("array", description, items=items, **rules)


def closed(
    required: Schema, optional: Schema | None = None, description: str = "", **rules: Any
) -> Schema:
    """An object with the ``required`` properties, maybe the ``optional`` ones, and no other."""
    return {
        **typed("object", description),
        "properties": {**required, **(optional or {})},
        "required": list(required),
        "additionalProperties": False,
        **rules,
    }


def extend(
    base: Schema, required: Schema | None = None, optional: Schema | None = None, **rules: Any
) -> Schema:
    """``base`` (made by ``closed``) with more properties; one of the same name replaces the
    base's in place (and stays required if it was)."""
    required = required or {}
    return {
        **base,
        **rules,
        "properties": {**base["properties"], **required, **(optional or {})},
        "required": base["required"] + [name for name in required if name not in base["required"]],
    }


def pair(description: str) -> Schema:
    """Two whole numbers, e.g. (height, width)."""
    return array(typed("integer", minimum=1), description, minItems=2, maxItems=2)


PREDICTION_FIELDS: Schema = {
    "index": typed("integer", "class index in the model's output", minimum=0),
    "name": typed("string", "class name"),
    "probability": typed("number", "softmax probability", minimum=0, maximum=1),
    "logit": typed("number", "the class's score before the softmax"),
}

PREDICTION = closed(PREDICTION_FIELDS)

BOX = closed(
    {
        "xyxy": array(
            typed("integer"),
            "x0, y0, x1, y1 in original-image pixels, pixel-edge convention",
            minItems=4,
            maxItems=4,
        ),
        "area": typed("integer", "pixels in the connected component the box encloses", minimum=1),
    }
)

MAP = closed(
    {
        **PREDICTION_FIELDS,
        "boxes": array(BOX, "largest component first (the CAM paper's box); none for a flat map"),
        "raw_min": typed("number", "smallest value of the raw map (before normalisation)"),
        "raw_max": typed("number", "largest value of the raw map (before normalisation)"),
        "feature_size": pair("h, w of the raw map at feature resolution"),
    },
    description="the class activation map of one class and the boxes drawn from it",
)

#: one image as ``Result.to_dict`` writes it, the part the ``--json`` entries and the web
#: answers share
RESULT_FIELDS = closed(
    {
        "input": typed("string", "the input file as given"),
        "width": typed("integer", "as the user sees the image (EXIF rotation applied)", minimum=1),
        "height": typed("integer", minimum=1),
        "predictions": array(PREDICTION, "the best classes, best first", minItems=1),
        "maps": array(MAP, "one per mapped class: the top classes, or the classes asked for"),
        "notes": array(
            typed("string"), "e.g. 'multi-frame file (3 frames): using the first frame'"
        ),
    }
)

RESULT = extend(
    RESULT_FIELDS,
    optional={
        "overlay": typed("string", "the overlay image written (unless --no-overlay)"),
        "cam_npy": typed("string", "with --save-cam: the raw maps, k x H x W float32 .npy"),
    },
    description="one image of `gapcam localize --json`",
)

FRAME = closed(
    {
        "frame": typed("integer", "the frame's number in the source, from 0", minimum=0),
        "time": typed("number", "its presentation time in seconds"),
        "predictions": array(
            PREDICTION, "the best classes of the smoothed scores, best first", minItems=1
        ),
        "maps": array(
            closed(
                {
                    **PREDICTION_FIELDS,
                    "boxes": array(BOX, "largest component first, in upright frame pixels"),
                }
            ),
            "one per mapped class of the clip (the same in every frame)",
        ),
    },
    description="one analysed frame of a video",
)

VIDEO = closed(
    {
        "input": typed("string", "the input video as given"),
        "width": typed("integer", "of a frame as players show it (rotation applied)", minimum=1),
        "height": typed("integer", minimum=1),
        "frame_count": typed(
            "integer",
            "frames drawn: every source frame, or the analysed ones with --sampled-only",
            minimum=1,
        ),
        "analysed": typed("integer", "frames the network analysed (--fps samples)", minimum=1),
        "classes": array(
            closed(
                {
                    "index": PREDICTION_FIELDS["index"],
                    "name": PREDICTION_FIELDS["name"],
                    "mean_probability": typed(
                        "number",
                        "its probability averaged over the analysed frames",
                        minimum=0,
                        maximum=1,
                    ),
                }
            ),
            "the clip's mapped classes: --class, or the --top-k of highest mean probability",
            minItems=1,
        ),
        "notes": array(typed("string"), "e.g. that the audio could not be copied"),
        "frames": array(FRAME, "the analysed frames, in order"),
    },
    optional={
        "overlay": typed("string", "the overlay video written, H.264 MP4 (unless --no-overlay)"),
    },
    description="one video of `gapcam localize --json`",
)

#: an entry of ``results``: a video's when it has ``frames``, else an image's
ENTRY: Schema = {"if": {"required": ["frames"]}, "then": VIDEO, "else": RESULT}

ERROR = closed(
    {
        "input": typed("string", "the input that failed"),
        "error": typed("string", "one line: what is wrong with it"),
    }
)

SETTINGS = closed(
    {
        "model": typed("string", "model name"),
        "weights": typed(["string", "null"], "--weights file, or null: the model's own weights"),
        "threshold": typed("number", "box threshold on the normalised map", minimum=0, maximum=1),
        "normalize": typed("string", "how maps are normalised", enum=list(BOX_NORMALIZATIONS)),
        "min_area": typed(
            "number", "extra boxes: components of at least this image fraction", minimum=0
        ),
        "resize": typed("string", "how images fit the network input", enum=list(RESIZE_MODES)),
        "input_size": pair("network input, height and width"),
        "classes": typed(
            ["array", "null"],
            "--class values as class indices, or null: the top classes were mapped",
            items=typed("integer", minimum=0),
        ),
        "top_k": typed(["integer", "null"], "how many top classes got a map (null with --class)"),
        "backend": typed(
            "string", "who ran the network", enum=[b for b in BACKENDS if b != "auto"]
        ),
    },
    optional={
        "hflip": typed("boolean", "whether the mirrored image was averaged in"),
        "scales": array(typed("number"), "the input scales averaged", minItems=1),
        "precision": typed(
            "string",
            "precision of the forward pass, when not float32",
            enum=[p for p in PRECISIONS if p != "float32"],
        ),
        "backend_note": typed("string", "why --backend auto chose eager"),
        "output_stride": typed(
            "integer",
            "input pixels per map cell, when the last stage(s) ran dilated (--output-stride)",
            enum=[s for s in OUTPUT_STRIDES if s != 32],
        ),
    },
    description="the settings every result of the run was made with; hflip and scales come "
    "together, only when the views are not the plain single pass",
    dependentRequired={"hflip": ["scales"], "scales": ["hflip"]},
)


def localize_schema() -> Schema:
    """The JSON Schema of a whole ``gapcam localize --json`` document."""
    document = closed(
        {
            "schema": typed("string", "format and version of this document", const=LOCALIZE_FORMAT),
            "gapcam_version": typed("string", "the gapcam that wrote it"),
            "settings": SETTINGS,
            "results": array(ENTRY, "one per image or video done, in input order"),
            "errors": array(ERROR, "one per input that failed"),
        },
        description="what `gapcam localize --json FILE` writes (docs/json.md)",
    )
    return {"$schema": DRAFT, "title": LOCALIZE_FORMAT, **document}


def text() -> str:
    """``localize_schema()`` as docs/json.md shows it: indented, lists of plain values on one
    line."""
    indented = json.dumps(localize_schema(), indent=2, ensure_ascii=False)
    return FLAT_LIST.sub(lambda m: f"[{', '.join(v.strip() for v in m[1].split(','))}]", indented)


#: a list spread over lines by ``json.dumps(indent=...)`` that holds no list or object
FLAT_LIST = re.compile(r"\[\n *([^\[\]{}]*?)\n *\]")


if __name__ == "__main__":
    print(text())

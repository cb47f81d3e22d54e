"""Option groups shared by several commands, and the one translation of flags into keywords.

Every front end that builds a ``Localizer`` (localize, evaluate, serve, the Ray actors) takes its
keyword arguments from ``localizer_options``; ``train`` takes its backbone from
``model_options``. The library speaks keywords (``precision='float16'``); ``flag_message``
turns them back into the flags a user typed (``--precision float16``) in its error messages.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

from gapcam.console import safe_text
from gapcam.errors import GapcamError

# Light imports only: building the parser must not import torch (``gapcam --help`` stays fast).
from gapcam.types import (
    BACKENDS,
    BOX_NORMALIZATIONS,
    DEFAULT_MODEL,
    OUTPUT_STRIDES,
    PRECISIONS,
    PRESETS,
    RESIZE_MODES,
)

#: concurrent forward passes of ``gapcam localize`` with the ONNX backend (docs/speed.md)
DEFAULT_STREAMS = 2


def fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"{text}: use a whole number from 0 to {2**32 - 1}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{safe_text(text, 40)} is not a positive number")
    return value


def seconds(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{safe_text(text, 40)} is not 0 or more seconds")
    return value


def count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not 0 or a positive integer")
    return value


def add_model(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--weights``, ``--checkpoint``."""
    p.add_argument(
        "--model", metavar="M", help=f"model name (default: {DEFAULT_MODEL}); see `gapcam models`"
    )
    p.add_argument(
        "--weights", metavar="FILE", help="local state dict (.safetensors or .pth, weights only)"
    )
    p.add_argument("--checkpoint", metavar="RUN", help="a run folder made by `gapcam train`")


def add_views(p: argparse.ArgumentParser) -> None:
    """Gradient-free view options (measured in docs/evaluate.md)."""
    p.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        help="measured view settings for the model: cam (vanilla, one pass), fine, best "
        "(docs/evaluate.md: the quality ladder)",
    )
    p.add_argument(
        "--input-size",
        type=positive,
        metavar="N",
        help="square network input side (a multiple of 32)",
    )
    p.add_argument("--hflip", action="store_true", help="average with the mirrored image's CAM")
    p.add_argument(
        "--scales", type=float, nargs="+", metavar="S", help="average CAMs over input sizes"
    )
    p.add_argument(
        "--output-stride",
        type=int,
        choices=OUTPUT_STRIDES,
        help="input pixels per map cell: 16 or 8 run the last stage dilated for 4x or 16x the "
        "cells, same weights and predictions (EfficientNet-Lite, ResNets; default: 32)",
    )


def add_backend(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default=default,
        help="who runs the network: onnx (ONNX Runtime, needs gapcam[fast]), eager (PyTorch), "
        "auto: onnx when available on the CPU, else eager (default: %(default)s)",
    )


def add_precision(p: argparse.ArgumentParser, calibration_default: str = "") -> None:
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="float32",
        help="forward-pass precision: bfloat16 (eager) for CPUs with native bfloat16 and GPUs, "
        "float16 (eager) for GPUs, int8 (onnx, statically quantized) for CPUs with VNNI or "
        "Arm dotprod; what each costs and how far it moves the maps is measured in "
        "docs/speed.md (default: %(default)s)",
    )
    p.add_argument(
        "--calibration",
        nargs="+",
        metavar="PATH",
        help="images (files, folders, globs) that calibrate --precision int8 "
        f"(at most {MAX_CALIBRATION}; {calibration_default or 'required with int8'})",
    )


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        default=None,
        help="cpu, cuda, cuda:N, mps (default: where the model's weights are, the CPU for "
        "built-in models)",
    )


def add_box(p: argparse.ArgumentParser) -> None:
    """``--threshold``, ``--min-area``, ``--normalize``, ``--resize``."""
    p.add_argument(
        "--threshold",
        type=fraction,
        default=0.2,
        help="box threshold on the normalised map (default: %(default)s, CAM paper)",
    )
    p.add_argument(
        "--min-area",
        type=fraction,
        default=0.01,
        help="extra boxes for other components of at least this image fraction",
    )
    p.add_argument("--normalize", choices=BOX_NORMALIZATIONS, default="minmax")
    p.add_argument(
        "--resize",
        choices=RESIZE_MODES,
        default="stretch",
        help="stretch the whole image to the input (default) or keep aspect and pad",
    )


def model_options(args: argparse.Namespace) -> dict[str, Any]:
    """``model``, ``weights``, ``checkpoint`` and ``device`` as the command line gave them."""
    return {
        "model": getattr(args, "model", None),
        "weights": getattr(args, "weights", None),
        "checkpoint": getattr(args, "checkpoint", None),
        "device": getattr(args, "device", None),
    }


#: flags whose values pass to ``Localizer`` unchanged, when a command has them (the view
#: options go through ``view_options``, which applies ``--preset`` under them)
_LOCALIZER_FLAGS = (
    "threshold",
    "normalize",
    "min_area",
    "resize",
    "max_pixels",
    "backend",
    "precision",
)


def localizer_options(args: argparse.Namespace) -> dict[str, Any]:
    """The plain (picklable) settings a front end builds its Localizer from, with
    ``Localizer.from_options``: every Localizer flag the command has, and none it does not."""
    from gapcam.localizer import view_options

    options = model_options(args)
    options |= {name: getattr(args, name) for name in _LOCALIZER_FLAGS if hasattr(args, name)}
    options |= view_options(
        getattr(args, "preset", None),
        getattr(args, "input_size", None),
        getattr(args, "hflip", False),
        getattr(args, "scales", None),
        getattr(args, "output_stride", None),
        # a checkpoint's presets are the generic ones (its backbone was not measured)
        model="" if getattr(args, "checkpoint", None) else getattr(args, "model", None),
    )
    if hasattr(args, "streams"):
        options["streams"] = _streams(args)
    if getattr(args, "calibration", None):
        options["calibration"] = calibration_paths(args.calibration)
    return options


#: the most calibration images a command line takes (``gapcam.quantize``)
MAX_CALIBRATION = 512


def calibration_paths(arguments: Sequence[str]) -> list[str]:
    """The image files of ``--calibration``'s files, folders and globs (the first
    ``MAX_CALIBRATION``); one that matches nothing stops the command."""
    from gapcam.images import expand_inputs

    found, problems = expand_inputs(arguments)
    if problems:
        raise GapcamError(f"--calibration: {problems[0]}")
    return [str(path) for path, _ in found[:MAX_CALIBRATION]]


def first_readable(paths: Iterable[str], count: int, max_pixels: int) -> list[str]:
    """The first ``count`` of ``paths`` that load as images within ``max_pixels``: the
    calibration of ``--precision int8`` without ``--calibration``, taken from the command's own
    images. A file that cannot be read (missing, corrupt, not an image) is passed over here and
    reported when the command reaches it, as without int8; each is decoded and let go at once."""
    from gapcam.images import load_image

    chosen: list[str] = []
    for path in paths:
        if len(chosen) == count:
            break
        try:
            load_image(path, max_pixels=max_pixels)
        except GapcamError:
            continue
        chosen.append(path)
    return chosen


#: what ``--precision int8`` says when none of the command's images can calibrate it
NO_CALIBRATION = (
    "--precision int8 calibrates on the first images of the run, and none of them can be read "
    "as an image; give --calibration IMAGES"
)


def own_calibration(paths: Iterable[str], max_pixels: int) -> list[str]:
    """The calibration of ``--precision int8`` without ``--calibration``: the first
    ``gapcam.quantize.CALIBRATION_IMAGES`` of the command's own images that can be read
    (``first_readable``); ``GapcamError`` (``NO_CALIBRATION``) when none can."""
    from gapcam.quantize import CALIBRATION_IMAGES

    chosen = first_readable(paths, CALIBRATION_IMAGES, max_pixels)
    if not chosen:
        raise GapcamError(NO_CALIBRATION)
    return chosen


def _streams(args: argparse.Namespace) -> int:
    """``--streams``, else 2 on a multi-core machine for the pipeline (1 with ``--workers 0``,
    the plain sequential loop)."""
    if args.workers == 0:
        return 1  # the sequential loop runs one stream, with all the cores
    if args.streams:
        return int(args.streams)
    return 1 if (os.cpu_count() or 1) < 2 else DEFAULT_STREAMS


#: a keyword as the library names it in a message: ``precision='float16'``, ``top_k=3``,
#: ``overwrite=True``, ``scales=(1.0, 1.5)``, ``weights=FILE`` (a placeholder in capitals), or
#: ``checkpoint=`` alone. Values are repr()s, so
#: a file name (``out=old.png``, ``/tmp/out=3.png``) is never taken for one.
_KEYWORD = re.compile(
    r"(?<![\w.\-\\~=])(?<![^=]/)([a-z][a-z0-9_]*)="  # a '/' only between keywords (model=/weights=)
    r"(?:'([^'\n]*)'|\"([^\"\n]*)\"|(True|False|None|[A-Z][A-Z_]*)(?![\w.])"
    r"|(-?\d+(?:\.\d+)?(?:e[-+]?\d+)?|-?inf|nan)(?![\w.])|[(\[]([^()\[\]\n]*)[)\]]|(?=[\s,;:/)]|$)())"
)


def flag_message(message: str, flags: Collection[str] | Mapping[str, str]) -> str:
    """``message`` with each ``keyword=value`` of a flag in ``flags`` written as the user typed
    it: ``--keyword-name value``, ``name=True`` as the switch ``--name``, a tuple as its items.
    ``flags``: the command's options, as dest names or as ``{dest: option string}`` (then
    ``classes`` is written ``--class``, as the parser spells it).

    The library's convention, which this relies on: a message names an argument as
    ``keyword=repr(value)`` (``precision='float16'``, ``top_k=3``, ``overwrite=True``), or as
    ``keyword=`` alone when no value is meant (``checkpoint= and model=``)."""

    def flag(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in flags:
            return match.group(0)
        option = flags[name] if isinstance(flags, Mapping) else f"--{name.replace('_', '-')}"
        value = next(g for g in match.groups()[1:] if g is not None)
        if value in ("True", "False"):
            value = ""  # overwrite=True: the switch --overwrite
        elif match.group(6) is not None:  # a tuple or list: its items, as typed
            value = " ".join(item.strip(" '\"") for item in value.split(",") if item.strip())
        return f"{option} {value}".rstrip()

    return _KEYWORD.sub(flag, message)


def error_text(message: str, flags: Collection[str], room: int) -> str:
    """``message`` as a one-line report of at most ``room`` characters shows it: flags as the
    user typed them (``flag_message``), control characters escaped (``safe_text``). A longer
    one keeps its start (what failed) and its end (what to do), and says how much of the middle
    it leaves out; of a huge one (a 50 MB name quoted in a message) only the ends are read."""
    if len(message) > 4 * room:
        start = flag_message(message[: 2 * room], flags)
        end = flag_message(message[-2 * room :], flags)
        hidden = len(message) - 4 * room
    else:
        start = end = flag_message(message, flags)
        hidden = 0
        shown = safe_text(start, limit=6 * len(start))  # escaped, never cut here
        if len(shown) <= room:
            return shown
    widest = f" ... ({len(message) + 4 * room} characters left out) ... "
    head = _escaped(start, (room - len(widest)) * 2 // 3)
    tail = _escaped(end[::-1], room - len(widest) - len("".join(head)))[::-1]
    if hidden:
        left_out = len(start) - len(head) + hidden + len(end) - len(tail)
    else:
        left_out = len(start) - len(head) - len(tail)
    return f"{''.join(head)} ... ({left_out} characters left out) ... {''.join(tail)}"


def _escaped(text: Iterable[str], budget: int) -> list[str]:
    """The escaped characters (``safe_text``) of the longest start of ``text`` that fits in
    ``budget`` characters, one string per character of ``text``."""
    pieces: list[str] = []
    used = 0
    for char in text:
        piece = safe_text(char)
        if used + len(piece) > budget:
            break
        pieces.append(piece)
        used += len(piece)
    return pieces

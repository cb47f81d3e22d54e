"""Read and validate images, and turn them into model input tensors. Knows no models.

``load_image`` accepts a path, bytes, a PIL image, a numpy array or a torch tensor and returns a
``LoadedImage``: an RGB PIL image as the user sees it (EXIF orientation applied, alpha composited
on white, 16-bit and float data scaled to 8 bits, first frame of multi-frame files) plus notes
about anything it had to decide. Every failure is an ``ImageError`` naming the file.
"""

from __future__ import annotations

import io
import os
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from gapcam.errors import ImageError
from gapcam.types import Preprocess

if TYPE_CHECKING:
    import torch

#: Default limit on decoded pixels (width * height), checked from the header before decoding.
DEFAULT_MAX_PIXELS = 120_000_000

#: File name suffixes that folder and glob expansion treat as images.
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)

_INTERPOLATION = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class LoadedImage:
    """An RGB image ready for a model, with where it came from."""

    image: Image.Image
    name: str
    path: Path | None = None
    notes: tuple[str, ...] = ()

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the image as the user sees it."""
        return self.image.size


def load_image(
    source: Any, *, name: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> LoadedImage:
    """Load ``source`` (path, bytes, PIL image, numpy array or tensor) as an RGB image."""
    if isinstance(source, LoadedImage):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        return _load_file(path, name or str(path), max_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        label = name or "<bytes>"
        if len(source) == 0:
            raise ImageError(f"{label}: empty data (0 bytes); send an image file's contents")
        return _decode(io.BytesIO(bytes(source)), label, None, max_pixels)
    if isinstance(source, Image.Image):
        label = name or "<PIL image>"
        try:
            source.load()  # a lazily opened file may be truncated: fail here, as for a path
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageError(f"{label}: corrupt or truncated image ({exc})") from exc
        rgb, notes = _to_rgb(source, label)
        return LoadedImage(rgb, label, None, notes)
    if isinstance(source, np.ndarray) or type(source).__module__.startswith("torch"):
        label = name or f"<{type(source).__name__}>"
        return LoadedImage(_array_to_pil(source, label), label)
    raise ImageError(
        f"{name or 'image'}: cannot read an object of type {type(source).__name__}; pass a path, "
        "bytes, a PIL image, a numpy array (HxW or HxWxC) or a tensor (CxHxW)"
    )


def _load_file(path: Path, label: str, max_pixels: int) -> LoadedImage:
    if not path.exists():
        raise ImageError(f"{label}: no such file; check the path")
    if path.is_dir():
        raise ImageError(f"{label}: is a folder, not an image file")
    try:
        size = path.stat().st_size
        if size == 0:
            raise ImageError(f"{label}: file is empty (0 bytes); it is not an image")
        with path.open("rb") as handle:
            data = handle.read()
    except PermissionError as exc:
        raise ImageError(
            f"{label}: cannot read the file ({exc.strerror}); check its permissions"
        ) from exc
    except OSError as exc:
        raise ImageError(f"{label}: cannot read the file ({exc})") from exc
    return _decode(io.BytesIO(data), label, path, max_pixels)


_PIL_LIMIT_LOCK = threading.Lock()


def _open_unlimited(stream: io.BytesIO) -> Image.Image:
    """``Image.open`` without Pillow's own pixel cap (it reads only the header): gapcam checks
    ``max_pixels`` itself right after, so ``--max-pixels`` can go above Pillow's built-in limit."""
    with _PIL_LIMIT_LOCK:
        previous = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(stream)
        finally:
            Image.MAX_IMAGE_PIXELS = previous


def _decode(stream: io.BytesIO, label: str, path: Path | None, max_pixels: int) -> LoadedImage:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = _open_unlimited(stream)
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(
                    f"{label}: {width}x{height} pixels is over the limit of {max_pixels:,} pixels "
                    "(decompression-bomb guard); shrink the image or raise max_pixels="
                )
            notes: list[str] = []
            frames = getattr(image, "n_frames", 1)
            if frames > 1:
                notes.append(f"multi-frame file ({frames} frames): using the first frame")
            image.load()
            rgb, more = _to_rgb(image, label)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(
            f"{label}: too many pixels to decode safely ({exc}); shrink the image"
        ) from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"{label}: not an image file, or a format Pillow cannot read") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"{label}: corrupt or truncated image ({exc})") from exc
    return LoadedImage(rgb, label, path, tuple(notes) + more)


def _to_rgb(image: Image.Image, label: str) -> tuple[Image.Image, tuple[str, ...]]:
    """Apply EXIF orientation and convert any mode to 8-bit RGB."""
    notes: list[str] = []
    try:
        oriented = ImageOps.exif_transpose(image)
    except Exception as exc:  # a broken EXIF block should not lose the picture
        oriented = image
        notes.append(f"EXIF orientation ignored ({exc})")
    if oriented is None:  # older Pillow returns None when in_place is set; be safe
        oriented = image
    mode = oriented.mode
    if mode == "RGB":
        return oriented, tuple(notes)
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return _scale_to_8bit(oriented), tuple(notes)
    if mode == "P" and "transparency" in oriented.info:
        oriented = oriented.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = oriented.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB"), tuple(notes)
    try:
        return oriented.convert("RGB"), tuple(notes)
    except (ValueError, OSError) as exc:
        raise ImageError(f"{label}: cannot convert image mode {mode!r} to RGB ({exc})") from exc


def _scale_to_8bit(image: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer and float grayscale to 8-bit RGB, keeping the full range."""
    array = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        top = 1.0 if array.size and np.nanmax(array) <= 1.0 else 255.0
    elif image.mode.startswith("I;16") or (array.size and array.max() > 255):
        top = 65535.0
    else:
        top = 255.0
    scaled = np.clip(np.nan_to_num(array) * (255.0 / top), 0, 255).round().astype(np.uint8)
    return Image.fromarray(scaled).convert("RGB")


def _array_to_pil(array: Any, label: str) -> Image.Image:
    if not isinstance(array, np.ndarray):  # a torch tensor, CxHxW or HxW
        tensor = array.detach().cpu()
        array = tensor.numpy()
        if array.ndim == 3 and array.shape[0] in (1, 3, 4):
            array = np.moveaxis(array, 0, -1)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ImageError(
            f"{label}: array of shape {tuple(array.shape)} is not an image; expected HxW, HxWx3 "
            "or HxWx4 (numpy) or CxHxW (tensor)"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageError(f"{label}: array of shape {tuple(array.shape)} has no pixels")
    if array.dtype == np.uint8:
        data = array
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageError(f"{label}: array contains NaN or infinite values")
        data = (np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    elif array.dtype == np.uint16:
        data = (array.astype(np.float64) / 257.0).round().astype(np.uint8)
    elif array.dtype == np.bool_:
        data = array.astype(np.uint8) * 255
    else:
        raise ImageError(
            f"{label}: array dtype {array.dtype} is not supported; use uint8 (0-255), "
            "uint16 or float in [0, 1]"
        )
    rgb, _ = _to_rgb(Image.fromarray(np.ascontiguousarray(data)), label)
    return rgb


def fit_region(
    width: int, height: int, preprocess: Preprocess
) -> tuple[tuple[int, int, int, int], tuple[float, float, float, float]]:
    """Where the image lands in the model input.

    Returns the pixel rectangle ``(left, top, new_width, new_height)`` inside the input and
    the same rectangle normalised to [0, 1] as ``(u0, v0, u1, v1)``.
    """
    in_h, in_w = preprocess.size
    if preprocess.resize == "stretch":
        return (0, 0, in_w, in_h), (0.0, 0.0, 1.0, 1.0)
    if preprocess.resize != "letterbox":
        raise ValueError(f"resize mode {preprocess.resize!r}: use 'stretch' or 'letterbox'")
    scale = min(in_w / width, in_h / height)
    new_w = max(1, min(in_w, round(width * scale)))
    new_h = max(1, min(in_h, round(height * scale)))
    left, top = (in_w - new_w) // 2, (in_h - new_h) // 2
    return (left, top, new_w, new_h), (
        left / in_w,
        top / in_h,
        (left + new_w) / in_w,
        (top + new_h) / in_h,
    )


def resize_for_model(image: Image.Image, preprocess: Preprocess) -> np.ndarray:
    """Resize (and pad) one RGB image to the model input; returns HxWx3 uint8."""
    in_h, in_w = preprocess.size
    method = _INTERPOLATION[preprocess.interpolation]
    (left, top, new_w, new_h), _ = fit_region(image.width, image.height, preprocess)
    resized = image if image.size == (new_w, new_h) else image.resize((new_w, new_h), method)
    if (new_w, new_h) == (in_w, in_h):
        return np.asarray(resized)
    fill = tuple(round(m * 255) for m in preprocess.mean)
    canvas = Image.new("RGB", (in_w, in_h), fill)
    canvas.paste(resized, (left, top))
    return np.asarray(canvas)


def to_tensor(arrays: Sequence[np.ndarray], preprocess: Preprocess) -> torch.Tensor:
    """Stack HxWx3 uint8 arrays into a normalised N x 3 x H x W float32 tensor."""
    import torch

    stacked = torch.from_numpy(np.stack(arrays))  # N x H x W x 3 uint8
    n, height, width, _ = stacked.shape
    batch = torch.empty((n, 3, height, width), dtype=torch.float32)
    batch.copy_(stacked.permute(0, 3, 1, 2))  # convert and transpose in one pass
    # per-channel, on contiguous planes (4x faster than broadcasting over an inner axis of 3)
    mean = (torch.tensor(preprocess.mean) * 255.0)[:, None, None]
    std = (torch.tensor(preprocess.std) * 255.0)[:, None, None]
    return batch.sub_(mean).div_(std)


def expand_inputs(
    arguments: Sequence[str], exclude: Sequence[Path] = ()
) -> tuple[list[tuple[Path, Path]], list[str]]:
    """Expand files, folders (recursively) and globs into image paths.

    Returns ``(found, problems)`` where ``found`` holds ``(path, relative_name)`` pairs in a
    stable order (the relative name mirrors the folder structure under a folder argument) and
    ``problems`` holds one message per argument that matched nothing. Folder and glob
    expansion skips anything under an ``exclude`` folder (the run's own output folder, so a
    second run over ``.`` does not read the first run's overlays).
    """
    import glob

    found: list[tuple[Path, Path]] = []
    problems: list[str] = []
    seen: set[Path] = set()
    excluded = [folder.resolve() for folder in exclude]

    def outside(path: Path, base: Path) -> bool:
        """Not under an excluded folder that lies strictly inside the argument's base folder
        (``--out`` equal to the input folder, or above it, excludes nothing)."""
        resolved, root = path.resolve(), base.resolve()
        return not any(
            resolved.is_relative_to(folder) and folder != root and folder.is_relative_to(root)
            for folder in excluded
        )

    def add(path: Path, relative: Path) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            found.append((path, relative))

    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            members = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and outside(p, path)
            )
            if not members:
                problems.append(f"{argument}: folder holds no image files ({_suffix_list()})")
            for member in members:
                add(member, member.relative_to(path))
        elif path.exists() or not glob.has_magic(argument):
            add(path, Path(path.name))  # a missing file is reported when it is read
        else:
            matches = sorted(Path(m) for m in glob.glob(argument, recursive=True))
            files = [m for m in matches if m.is_file() and outside(m, _glob_base(argument))]
            if not files:
                problems.append(f"{argument}: pattern matched no files")
            for match in files:
                add(match, Path(match.name))
    return found, problems


def _glob_base(pattern: str) -> Path:
    """The folder a glob pattern starts from: its leading parts without wildcards."""
    import glob

    parts = []
    for part in Path(pattern).parts:
        if glob.has_magic(part):
            break
        parts.append(part)
    return Path(*parts) if parts else Path(".")


def _suffix_list() -> str:
    return ", ".join(sorted(IMAGE_SUFFIXES))

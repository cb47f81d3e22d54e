"""Read and validate images, and turn them into model input tensors. Knows no models.

``load_image`` accepts a path, bytes, a PIL image, a numpy array or a torch tensor and returns a
``LoadedImage``: an RGB PIL image as the user sees it (EXIF orientation applied, alpha composited
on white, 16-bit and float data scaled to 8 bits, first frame of multi-frame files) plus notes
about anything it had to decide. Every failure is an ``ImageError`` naming the file.

What a file claims is checked before it costs memory: its size on disk first (``os.fstat``,
against ``max_file_bytes(max_pixels)``), then its header (``read_header``: width, height and
how its pixels are stored, against ``max_pixels``), and only then its pixels, streamed from the
open file. Warnings raised while one file is decoded (Pillow's "Possibly corrupt EXIF data",
"Tag data larger than file", ...) become that file's notes (``_warnings_caught``).
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import stat
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from gapcam.errors import ImageError
from gapcam.types import Preprocess

if TYPE_CHECKING:
    import torch

#: Default limit on decoded pixels (width * height), checked from the header before decoding.
DEFAULT_MAX_PIXELS = 120_000_000

#: A file may hold at most this many bytes per pixel it is allowed (16-bit RGBA stored without
#: compression takes 8), plus ``FILE_SLACK_BYTES`` for metadata (EXIF, ICC profiles, thumbnails).
#: A larger file cannot be an image within ``max_pixels``: it is refused from its size alone,
#: before a byte of it is read (``max_file_bytes``).
FILE_BYTES_PER_PIXEL = 8
FILE_SLACK_BYTES = 64 << 20

#: File name suffixes that folder and glob expansion treat as images.
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)

#: warnings kept as notes per file (a broken TIFF directory can raise one per tag), and the
#: characters kept of each
WARNING_NOTES, WARNING_CHARACTERS = 5, 300

#: rows of a 16-bit or float image converted to 8 bits at a time (float64 work: 8 bytes a value)
_SCALE_BLOCK_VALUES = 1 << 20

_INTERPOLATION = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}

#: modes converted through a float scaling (``_scale_to_8bit``), and modes with an alpha band
_WIDE_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})


def max_file_bytes(max_pixels: int) -> int:
    """The largest file that can hold an image of at most ``max_pixels`` pixels."""
    return max_pixels * FILE_BYTES_PER_PIXEL + FILE_SLACK_BYTES


@dataclass(frozen=True)
class ImageInfo:
    """What an image file's header says, read before any pixel is decoded."""

    width: int
    height: int
    mode: str

    @property
    def pixels(self) -> int:
        return self.width * self.height

    def decode_bytes(self) -> int:
        """Memory that decoding the file takes at its peak, an estimate from the header alone:
        the pixels as Pillow holds them (1, 2 or 4 bytes each), the RGB image (4: Pillow pads
        RGB to 32 bits), and what the conversion needs on the way (alpha compositing 12 more,
        16-bit and float scaling the 8-bit copy; 4 for any other conversion or a rotation)."""
        stored = 1 if self.mode in ("1", "L", "P") else 2 if self.mode.startswith("I;16") else 4
        if self.mode in _ALPHA_MODES or self.mode == "P":  # a palette may hold transparency
            work = 12
        elif self.mode in _WIDE_MODES:
            work = 2
        else:
            work = 4
        return self.pixels * (stored + 4 + work)


@dataclass(frozen=True)
class LoadedImage:
    """An RGB image ready for a model, with where it came from."""

    image: Image.Image
    name: str
    path: Path | None = None
    notes: tuple[str, ...] = ()
    #: the decoded file's format as Pillow names it ("JPEG", "PNG", ...); None for arrays
    format: str | None = None

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
        label = name or str(path)
        with _open_file(path, label, max_pixels) as handle:
            return _decode(handle, label, path, max_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        label = name or "<bytes>"
        if len(source) == 0:
            raise ImageError(f"{label}: empty data (0 bytes); send an image file's contents")
        _check_file_size(len(source), label, max_pixels, "of data")
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


def read_header(
    path: str | os.PathLike[str], *, name: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> ImageInfo:
    """Size and storage of an image file from its header, without decoding a pixel; a file
    that ``load_image`` would refuse before decoding (missing, too large on disk, not an
    image, over ``max_pixels``) raises the same ``ImageError`` here."""
    label = name or str(path)
    with _open_file(Path(path), label, max_pixels) as handle, _decoding(label, []):
        image = _open_image(handle, label, max_pixels)
        return ImageInfo(image.width, image.height, image.mode)


@contextmanager
def _open_file(path: Path, label: str, max_pixels: int) -> Iterator[IO[bytes]]:
    """The file, open for reading, once its size says it can be an image within the limit.
    It is checked through the open descriptor (no race with a rename), and opened without
    blocking: a named pipe given as an image is refused instead of waiting for a writer."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        descriptor = os.open(path, flags)
    except (OSError, ValueError) as exc:
        raise _open_error(exc, label) from exc
    try:
        info = os.fstat(descriptor)
        if stat.S_ISDIR(info.st_mode):
            raise ImageError(f"{label}: is a folder, not an image file")
        if not stat.S_ISREG(info.st_mode):
            raise ImageError(
                f"{label}: not a regular file (a device, pipe or socket); give an image file"
            )
        if info.st_size == 0:
            raise ImageError(f"{label}: file is empty (0 bytes); it is not an image")
        _check_file_size(info.st_size, label, max_pixels)
        handle = os.fdopen(descriptor, "rb")
    except BaseException:
        # a signal (SIGTERM -> Terminated) inside fdopen may come after the file object took
        # the descriptor: closing it twice must not replace the exception on its way out
        with contextlib.suppress(OSError):
            os.close(descriptor)
        raise
    with handle:
        yield handle


def _open_error(exc: BaseException, label: str) -> ImageError:
    """The one-line reason a path cannot be opened."""
    if isinstance(exc, ValueError):  # os.open refuses a name holding a NUL character
        return ImageError(f"{label}: not a file name (it holds a NUL character)")
    assert isinstance(exc, OSError)
    if isinstance(exc, (FileNotFoundError, NotADirectoryError)):
        return ImageError(f"{label}: no such file; check the path")
    if isinstance(exc, IsADirectoryError):
        return ImageError(f"{label}: is a folder, not an image file")
    if isinstance(exc, PermissionError):
        return ImageError(f"{label}: cannot read the file ({exc.strerror}); check its permissions")
    return ImageError(f"{label}: cannot read the file ({_path_reason(exc)})")


def _path_reason(exc: OSError) -> str:
    """Why the system refused a path, in words (a symbolic link loop, a name too long, ...)."""
    if exc.errno == errno.ELOOP:
        return "a symbolic link that points to itself, or a loop of links"
    if exc.errno == errno.ENAMETOOLONG:
        return "the path is longer than the system allows"
    return exc.strerror or type(exc).__name__


def _check_file_size(size: int, label: str, max_pixels: int, where: str = "on disk") -> None:
    limit = max_file_bytes(max_pixels)
    if size > limit:
        raise ImageError(
            f"{label}: {_bytes_text(size)} {where} is more than an image of at most "
            f"{max_pixels:,} pixels can take ({_bytes_text(limit)}); it is not an image within "
            "the limit (raise max_pixels= if it is one)"
        )


def _bytes_text(size: int) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9)):
        if size >= scale:
            return f"{size / scale:,.1f} {unit}"
    return f"{size / 1e6:,.1f} MB"


_PIL_LIMIT_LOCK = threading.Lock()


def _open_unlimited(stream: IO[bytes]) -> Image.Image:
    """``Image.open`` without Pillow's own pixel cap (it reads only the header): gapcam checks
    ``max_pixels`` itself right after, so ``--max-pixels`` can go above Pillow's built-in limit."""
    with _PIL_LIMIT_LOCK:
        previous = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(stream)
        finally:
            Image.MAX_IMAGE_PIXELS = previous


def _open_image(stream: IO[bytes], label: str, max_pixels: int) -> Image.Image:
    """The image opened from its header, refused when it declares more than ``max_pixels``."""
    image = _open_unlimited(stream)
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(
            f"{label}: {width}x{height} pixels is over the limit of {max_pixels:,} "
            "pixels (decompression-bomb guard); shrink the image or raise max_pixels="
        )
    return image


def _decode(stream: IO[bytes], label: str, path: Path | None, max_pixels: int) -> LoadedImage:
    caught: list[Warning] = []
    with _decoding(label, caught):
        image = _open_image(stream, label, max_pixels)
        notes: list[str] = []
        frames = getattr(image, "n_frames", 1)
        if frames > 1:
            notes.append(f"multi-frame file ({frames} frames): using the first frame")
        image.load()
        rgb, more = _to_rgb(image, label)
    notes_all = tuple(notes) + more + _warning_notes(caught)
    return LoadedImage(rgb, label, path, notes_all, image.format)


@contextmanager
def _decoding(label: str, caught: list[Warning]) -> Iterator[None]:
    """Reading one file: warnings shown inside go to ``caught`` (``_warnings_caught``), and what
    Pillow raises becomes the file's ``ImageError`` (``_decode_error``)."""
    try:
        with _warnings_caught(caught):
            yield
    except ImageError:
        raise
    except Exception as exc:
        error = _decode_error(exc, label)
        if error is None:
            raise
        raise error from exc


def _decode_error(exc: Exception, label: str) -> ImageError | None:
    """The ``ImageError`` for what Pillow raised while it read a file; None for anything else
    (a bug, to be raised as it is)."""
    if isinstance(exc, Image.DecompressionBombError):
        return ImageError(f"{label}: too many pixels to decode safely ({exc}); shrink the image")
    if isinstance(exc, UnidentifiedImageError):
        return ImageError(f"{label}: not an image file, or a format Pillow cannot read")
    if isinstance(exc, MemoryError):
        return ImageError(f"{label}: not enough memory to decode it; lower max_pixels=")
    if isinstance(exc, Warning):  # the warnings filters turn this warning into an error
        return ImageError(f"{label}: cannot decode the image ({_warning_text(exc)})")
    if isinstance(exc, (OSError, SyntaxError, ValueError, EOFError)):
        return ImageError(f"{label}: corrupt or truncated image ({exc})")
    return None


# -- warnings raised while a file is decoded become its notes -------------------------------------
#
# ``warnings.catch_warnings`` swaps module-wide state (the filters and ``showwarning``), so two
# threads decoding at once would lose or swap each other's warnings. Instead one hook is put in
# ``warnings.showwarning`` (once; again if something replaced it) and routes by thread: a
# warning shown on a thread that is decoding a file goes to that file's list, any other goes to
# the hook that was there before. The filters are left as the user set them: "error" still makes
# a warning an error (the file's ``ImageError``), "ignore" drops it, and Python's default shows
# a given message from a given line once per process. ``gapcam localize`` asks for every one
# (``warnings.filterwarnings("always", module="PIL")``), so that each file gets its notes.

_CAUGHT = threading.local()
_HOOK_LOCK = threading.Lock()


def _make_router(previous: Callable[..., Any]) -> Callable[..., Any]:
    def route(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: Any = None,
        line: str | None = None,
    ) -> None:
        caught = getattr(_CAUGHT, "warnings", None)
        if caught is None:
            previous(message, category, filename, lineno, file, line)
        else:
            caught.append(message if isinstance(message, Warning) else category(message))

    route.gapcam_router = True  # type: ignore[attr-defined]
    return route


@contextmanager
def _warnings_caught(caught: list[Warning]) -> Iterator[None]:
    """Warnings shown on this thread inside the block go to ``caught``, not to standard error."""
    if not getattr(warnings.showwarning, "gapcam_router", False):
        with _HOOK_LOCK:
            if not getattr(warnings.showwarning, "gapcam_router", False):
                warnings.showwarning = _make_router(warnings.showwarning)
    outer = getattr(_CAUGHT, "warnings", None)
    _CAUGHT.warnings = caught
    try:
        yield
    finally:
        _CAUGHT.warnings = outer


def _warning_text(warning: Warning) -> str:
    return f"{type(warning).__name__}: {str(warning)[:WARNING_CHARACTERS]}"


def _warning_notes(caught: Sequence[Warning]) -> tuple[str, ...]:
    """One note per distinct warning, the first ``WARNING_NOTES`` of them and how many more.
    Pillow's DecompressionBombWarning is dropped: gapcam's own ``max_pixels`` has decided."""
    texts = list(
        dict.fromkeys(
            _warning_text(w) for w in caught if not isinstance(w, Image.DecompressionBombWarning)
        )
    )
    notes = [f"decoder warning: {text}" for text in texts[:WARNING_NOTES]]
    if len(texts) > WARNING_NOTES:
        notes.append(f"{len(texts) - WARNING_NOTES} more decoder warnings not shown")
    return tuple(notes)


#: the EXIF tag of the orientation (what ``ImageOps.exif_transpose`` reads)
EXIF_ORIENTATION = 0x0112


def _to_rgb(image: Image.Image, label: str) -> tuple[Image.Image, tuple[str, ...]]:
    """Apply EXIF orientation and convert any mode to 8-bit RGB."""
    notes: list[str] = []
    try:
        # exif_transpose copies even an upright image: only turn the ones that say so
        turned = image.getexif().get(EXIF_ORIENTATION, 1) not in (1, None)
        oriented = ImageOps.exif_transpose(image) if turned else image
    except Exception as exc:  # a broken EXIF block should not lose the picture
        oriented = image
        notes.append(f"EXIF orientation ignored ({exc})")
    if oriented is None:  # older Pillow returns None when in_place is set; be safe
        oriented = image
    mode = oriented.mode
    if mode == "RGB":
        return oriented, tuple(notes)
    if mode in _WIDE_MODES:
        scaled, more = _scale_to_8bit(oriented)
        return scaled, tuple(notes) + more
    if mode == "P" and "transparency" in oriented.info:
        oriented = oriented.convert("RGBA")
        mode = "RGBA"
    if mode in _ALPHA_MODES:
        rgba = oriented.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB"), tuple(notes)
    try:
        return oriented.convert("RGB"), tuple(notes)
    except (ValueError, OSError) as exc:
        raise ImageError(f"{label}: cannot convert image mode {mode!r} to RGB ({exc})") from exc


def _scale_to_8bit(image: Image.Image) -> tuple[Image.Image, tuple[str, ...]]:
    """16-bit / 32-bit integer and float grayscale to 8-bit RGB, keeping the full range.

    Float maps 0..1 (or 0..255 when any value is above 1) and integers 0..255 (0..65535 when
    any value is above 255, and always for 16-bit modes) to 0..255; NaN becomes 0, infinities
    the ends of the range. Done a block of rows at a time, so the float64 work stays small
    whatever the image's size."""
    width, height = image.size
    rows = max(1, _SCALE_BLOCK_VALUES // max(1, width))
    blocks = [(top, min(height, top + rows)) for top in range(0, height, rows)]

    def block(top: int, bottom: int, dtype: Any = None) -> np.ndarray:
        return np.asarray(image.crop((0, top, width, bottom)), dtype=dtype)

    notes: tuple[str, ...] = ()
    if image.mode == "F":
        peak, odd = -np.inf, 0
        for top, bottom in blocks:
            values = block(top, bottom)
            finite = np.isfinite(values)
            odd += values.size - int(np.count_nonzero(finite))
            if values.size:
                peak = max(peak, float(np.fmax.reduce(values, axis=None)))  # NaN left out
        scale = 1.0 if width * height and peak <= 1.0 else 255.0
        if odd:
            notes = (f"{odd:,} NaN or infinite pixel values, shown as 0 or clipped",)
    elif image.mode.startswith("I;16"):
        scale = 65535.0
    else:
        peak_int = max((int(block(t, b).max()) for t, b in blocks if b > t), default=0)
        scale = 65535.0 if peak_int > 255 else 255.0
    out = np.empty((height, width), dtype=np.uint8)
    with np.errstate(over="ignore", invalid="ignore"):  # infinities scale to +-inf, then clip
        for top, bottom in blocks:
            values = np.nan_to_num(block(top, bottom, np.float64), copy=False)
            values *= 255.0 / scale
            np.clip(values, 0, 255, out=values)
            out[top:bottom] = np.round(values, out=values)
    return Image.fromarray(out).convert("RGB"), notes


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


class InputProblem(str):
    """What ``expand_inputs`` says about one path it could not use: the message itself (the
    path, then the reason), with ``path`` the path as given or found."""

    path: str

    def __new__(cls, path: str, reason: str) -> InputProblem:
        problem = super().__new__(cls, f"{path}: {reason}")
        problem.path = path
        return problem


def expand_inputs(
    arguments: Sequence[str],
    exclude: Sequence[Path] = (),
    suffixes: frozenset[str] = IMAGE_SUFFIXES,
) -> tuple[list[tuple[Path, Path]], list[InputProblem]]:
    """Expand files, folders (recursively) and globs into image paths (folders: the files
    whose name ends in one of ``suffixes``; ``gapcam localize`` adds the video suffixes).

    Returns ``(found, problems)`` where ``found`` holds ``(path, relative_name)`` pairs in a
    stable order (the relative name mirrors the folder structure under a folder argument) and
    ``problems`` holds one message per argument that matched nothing, and per path that could
    not be examined (a symbolic link loop, no permission, a path longer than the system
    allows, a subfolder that cannot be listed): each names its path, and the rest goes on.
    Folder and glob expansion skips anything under an ``exclude`` folder (the run's own output
    folder, so a second run over ``.`` does not read the first run's overlays).
    """
    import glob

    found: list[tuple[Path, Path]] = []
    problems: list[InputProblem] = []
    seen: set[Path] = set()
    reported: set[Path] = set()
    excluded = [_real(folder) for folder in exclude]

    def outside(resolved: Path, root: Path) -> bool:
        """Not under an excluded folder that lies strictly inside the argument's base folder
        (``--out`` equal to the input folder, or above it, excludes nothing); both resolved
        (``_real``: each path is resolved once, the argument's folder once for all of it)."""
        return not any(
            resolved.is_relative_to(folder) and folder != root and folder.is_relative_to(root)
            for folder in excluded
        )

    def add(path: Path, relative: Path, key: Path) -> None:
        if key not in seen:  # ``key``: the path resolved
            seen.add(key)
            found.append((path, relative))

    for argument in arguments:
        path = Path(argument)
        try:
            folder: bool | None = stat.S_ISDIR(os.stat(path).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            folder = None  # nothing there: a glob, or a missing file reported when it is read
        except (OSError, ValueError) as exc:
            problems.append(InputProblem(argument, _cannot_read(exc)))
            continue
        if folder:
            root = _real(path)
            resolved, trouble = _walk(path, suffixes)
            members = sorted(m for m, real in resolved.items() if outside(real, root))
            # what lies inside the output folder is skipped, its problems as its images
            trouble = sorted(
                (t for t in trouble if outside(_real(Path(t.path)), root)), key=lambda t: t.path
            )
            for problem in trouble:
                if _real(Path(problem.path)) not in reported:  # two arguments reach one folder
                    reported.add(_real(Path(problem.path)))
                    problems.append(problem)
            if not members and not trouble:
                problems.append(
                    InputProblem(
                        argument, f"folder holds no image files ({_suffix_list(suffixes)})"
                    )
                )
            for member in members:
                add(member, member.relative_to(path), resolved[member])
        elif folder is not None or not glob.has_magic(argument):
            add(path, Path(path.name), _real(path))  # a missing file is reported when read
        else:
            try:
                matches = sorted(Path(m) for m in glob.glob(argument, recursive=True))
            except RecursionError:
                problems.append(
                    InputProblem(argument, "pattern reaches folders nested too deep to search")
                )
                continue
            files, root = [], _real(_glob_base(argument))
            for match in matches:
                try:
                    regular = stat.S_ISREG(os.stat(match).st_mode)
                except (FileNotFoundError, NotADirectoryError):
                    continue  # a dangling link, or gone since it was listed
                except OSError as exc:
                    problems.append(InputProblem(str(match), _cannot_read(exc)))
                    continue
                if regular and outside(real := _real(match), root):
                    files.append((match, real))
            if not files:
                problems.append(InputProblem(argument, "pattern matched no files"))
            for match, real in files:
                add(match, Path(match.name), real)
    return found, problems


def _walk(folder: Path, suffixes: frozenset[str]) -> tuple[dict[Path, Path], list[InputProblem]]:
    """The image files under ``folder``, each with its path resolved (``_real``; links to
    folders are not followed, as in ``Path.rglob``), and a problem for each folder that
    cannot be listed and each image file that cannot be examined. Iterative: any depth, no
    recursion limit. A folder is resolved once for all its files: a file that is not a link
    resolves to its name in the resolved folder, as ``realpath`` would find it."""
    files: dict[Path, Path] = {}
    problems: list[InputProblem] = []
    pending = [folder]
    while pending:
        current = pending.pop()
        try:
            with os.scandir(current) as listing:
                entries = list(listing)
        except OSError as exc:
            reason = f"cannot list this folder ({_path_reason(exc)}); its images are left out"
            problems.append(InputProblem(str(current), reason))
            continue
        real: Path | None = None
        for entry in entries:
            path = current / entry.name
            try:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(path)
                elif path.suffix.lower() in suffixes and entry.is_file():
                    if entry.is_symlink():
                        files[path] = _real(path)
                    else:
                        if real is None:
                            real = _real(current)
                        files[path] = real / entry.name
            except OSError as exc:
                problems.append(InputProblem(str(path), _cannot_read(exc)))
    return files, problems


def _cannot_read(exc: BaseException) -> str:
    if isinstance(exc, ValueError):
        return "not a file name (it holds a NUL character)"
    assert isinstance(exc, OSError)
    hint = "; check its permissions" if isinstance(exc, PermissionError) else ""
    return f"cannot read this path ({_path_reason(exc)}){hint}"


def _real(path: Path) -> Path:
    """The path with every link resolved, as far as it resolves (a loop is left as it is)."""
    return Path(os.path.realpath(path))


def _glob_base(pattern: str) -> Path:
    """The folder a glob pattern starts from: its leading parts without wildcards."""
    import glob

    parts = []
    for part in Path(pattern).parts:
        if glob.has_magic(part):
            break
        parts.append(part)
    return Path(*parts) if parts else Path(".")


def _suffix_list(suffixes: frozenset[str] = IMAGE_SUFFIXES) -> str:
    return ", ".join(sorted(suffixes))

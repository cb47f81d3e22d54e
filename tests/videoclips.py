"""Video clips made for the tests and benchmarks with PyAV: nothing large is committed.

``moving_cat`` moves examples/cat.png across a grey background along a known path and returns
the cat's box in every frame; the other makers give the bad inputs of issue 13 (rotation
metadata, odd sizes, 10-bit, variable frame rate, no frames, audio only, truncated).
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
from PIL import Image

CAT = Path(__file__).resolve().parents[1] / "examples" / "cat.png"

#: (x0, y0, x1, y1) of the cat in one frame, pixel-edge convention
Box = tuple[int, int, int, int]


def _cat(scale: float) -> np.ndarray:
    cat = Image.open(CAT).convert("RGB")
    size = (round(cat.width * scale), round(cat.height * scale))
    return np.asarray(cat.resize(size, Image.Resampling.BILINEAR))


def write_clip(
    path: Path,
    frames: list[np.ndarray],
    *,
    rate: int = 12,
    pts: list[int] | None = None,
    time_base: Fraction | None = None,
    pix_fmt: str = "yuv420p",
    rotation: int | None = None,
    audio: bool = False,
    container: str | None = None,
) -> Path:
    """``frames`` (H x W x 3 uint8) as H.264 at ``rate`` (or at ``pts`` in ``time_base``),
    with a 440 Hz AAC tone as long as the clip when ``audio``."""
    height, width = frames[0].shape[:2] if frames else (64, 64)
    with av.open(str(path), "w", format=container) as out:
        stream = out.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if time_base is not None:
            stream.time_base = stream.codec_context.time_base = time_base
        if rotation is not None:
            stream.set_display_rotation(rotation)
        if not frames:
            out.start_encoding()  # the header and an empty track: a stream without frames
        sound = out.add_stream("aac", rate=16000) if audio else None
        if sound is not None:
            sound.layout = "mono"
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i if pts is None else pts[i]
            if time_base is not None:
                frame.time_base = time_base
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
        if sound is not None:
            count = int(16000 * len(frames) / rate)
            tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(count) / 16000)).astype(np.float32)
            _mux_sound(out, sound, tone)
    return path


def _mux_sound(out: Any, sound: Any, samples: np.ndarray) -> None:
    """``samples`` (mono float32 at 16 kHz) encoded on ``sound`` and muxed into ``out``."""
    for start in range(0, len(samples), 1024):
        chunk = av.AudioFrame.from_ndarray(
            samples[None, start : start + 1024], format="fltp", layout="mono"
        )
        chunk.sample_rate, chunk.pts = 16000, start
        for packet in sound.encode(chunk):
            out.mux(packet)
    for packet in sound.encode():
        out.mux(packet)


def moving_cat(
    path: Path,
    *,
    frames: int = 24,
    size: tuple[int, int] = (640, 360),
    scale: float = 0.5,
    audio: bool = True,
    rate: int = 12,
    noise: float = 0.0,
    still: bool = False,
    seed: int = 0,
    **options: object,
) -> list[Box]:
    """The cat moving left to right across the middle of a grey ``size`` background (or
    standing in the middle when ``still``), plus Gaussian noise of ``noise`` grey levels;
    the cat's box in each frame."""
    cat = _cat(scale)
    ch, cw = cat.shape[:2]
    width, height = size
    rng = np.random.default_rng(seed)
    images, boxes = [], []
    for i in range(frames):
        x = (width - cw) // 2 if still else round((width - cw) * i / max(1, frames - 1))
        y = (height - ch) // 2
        image = np.full((height, width, 3), 128, np.uint8)
        image[y : y + ch, x : x + cw] = cat
        if noise:
            noisy = image + rng.normal(0, noise, image.shape)
            image = np.clip(noisy, 0, 255).astype(np.uint8)
        images.append(image)
        boxes.append((x, y, x + cw, y + ch))
    write_clip(path, images, audio=audio, rate=rate, **options)  # type: ignore[arg-type]
    return boxes


def cat_frames(size: tuple[int, int], count: int, scale: float = 0.5) -> list[np.ndarray]:
    """``count`` still frames of the cat in the middle of a grey ``size`` background."""
    cat = _cat(scale)
    ch, cw = cat.shape[:2]
    width, height = size
    image = np.full((height, width, 3), 128, np.uint8)
    y, x = (height - ch) // 2, (width - cw) // 2
    image[y : y + ch, x : x + cw] = cat[: height - y, : width - x]
    return [image] * count


def audio_only(path: Path) -> Path:
    with av.open(str(path), "w", format="mp4") as out:
        sound = out.add_stream("aac", rate=16000)
        sound.layout = "mono"
        _mux_sound(out, sound, np.zeros(16 * 1024, np.float32))  # about a second of silence
    return path


def no_frames(path: Path, container: str = "avi") -> Path:
    """A video stream that holds no frame (an AVI keeps the stream's header; an MP4 drops an
    empty track and holds no stream at all)."""
    return write_clip(path, [], container=container)


def without_moov(path: Path) -> Path:
    """An MP4 cut before its ``moov`` box (where a crashed recorder leaves it)."""
    write_clip(path, cat_frames((320, 240), 6))
    data = path.read_bytes()
    path.write_bytes(data[: data.rindex(b"moov") - 4])
    return path


#: every maker of a bad input: name -> (file name, maker)
Maker = Callable[[Path], object]

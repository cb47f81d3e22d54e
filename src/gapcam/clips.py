"""Read and write video clips with PyAV (``pip install 'gapcam[video]'``). Knows no models.

``decode`` yields a clip's frames as upright RGB arrays, with their timestamps, from a thread
that stays at most ``queue_size`` frames ahead of the caller; ``ClipWriter`` encodes frames as
H.264 (yuv420p, libx264 ``ENCODER_PRESET``) at the timestamps given, copies the source's audio
stream beside them, and is used inside ``OutputGuard.file``, so an interrupted run leaves no
partial video. Every failure is a ``VideoError`` naming the file, on one line.

What a file claims is checked before it costs memory: the stream's frame size against
``max_pixels`` before the first frame is decoded, and each decoded frame's size again (a
stream may change size mid-way). Nothing depends on the clip's length: frames are decoded,
handed over and dropped one at a time.

Rotation: phones store a portrait clip as landscape frames plus a display matrix; FFmpeg and
every player turn it upright. ``decode`` does the same (``VideoFrame.rotation``, a multiple of
90 degrees counter-clockwise), so maps, boxes and the written video are upright; flips in the
matrix are not applied (no phone writes them).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from gapcam.errors import VideoError

#: libx264's speed/size trade-off for the written video. ``veryfast`` encodes 1080p several
#: times faster than ``medium`` for a slightly larger file; an overlay video is a preview, not
#: an archive (cost measured in benchmarks/bench_video.py, README "Video").
ENCODER_PRESET = "veryfast"
#: libx264's constant quality (lower is better; 23 is its default): 20 keeps the colour map's
#: edges and the caption's text clean at the preset's speed
ENCODER_CRF = 20

INSTALL_HINT = "reading videos needs PyAV: pip install 'gapcam[video]'"


def require_av(label: str) -> Any:
    """The ``av`` module, or ``VideoError`` (one line naming ``label`` and the extra)."""
    try:
        import av
    except ImportError as exc:
        raise VideoError(f"{label}: {INSTALL_HINT}") from exc
    return av


@dataclass(frozen=True)
class Frame:
    """One decoded frame: ``index`` in decoding order, ``pts`` in the stream's ``time_base``,
    ``time`` in seconds, ``image`` H x W x 3 uint8, upright."""

    index: int
    pts: int
    time: float
    time_base: Fraction
    image: np.ndarray


@dataclass(frozen=True)
class ClipInfo:
    """What a clip's headers say, before its frames are decoded."""

    width: int
    height: int
    #: frames the container announces (0: it does not say)
    frames: int
    time_base: Fraction
    #: average frames per second, or None
    rate: float | None
    duration: float | None
    audio: str | None


def _error(label: str, exc: BaseException) -> VideoError:
    text = str(exc).strip() or type(exc).__name__
    return VideoError(f"{label}: cannot read the video ({text})")


@contextmanager
def _opened(source: Any, label: str) -> Iterator[Any]:
    av = require_av(label)
    if (
        isinstance(source, (str, Path))
        and Path(source).is_file()
        and not Path(source).stat().st_size
    ):
        raise VideoError(f"{label}: file is empty (0 bytes); it is not a video")
    try:
        target = str(source) if isinstance(source, Path) else source
        container = av.open(target, "r")
    except (av.FFmpegError, OSError, ValueError, UnicodeError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise VideoError(f"{label}: no such file; check the path") from exc
        raise VideoError(
            f"{label}: not a video FFmpeg can read, or truncated ({_reason(exc)})"
        ) from exc
    try:
        yield container
    finally:
        container.close()


def _reason(exc: BaseException) -> str:
    return (getattr(exc, "strerror", None) or str(exc).strip() or type(exc).__name__)[:120]


def _video_stream(container: Any, label: str, max_pixels: int) -> Any:
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["no streams"]
        raise VideoError(f"{label}: no video stream (it holds {', '.join(kinds)}); give a video")
    stream = container.streams.video[0]
    width, height = stream.codec_context.width, stream.codec_context.height
    _check_pixels(label, width, height, max_pixels)
    return stream


def _check_pixels(label: str, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise VideoError(
            f"{label}: frames of {width}x{height} pixels are over the limit of {max_pixels:,} "
            "pixels; raise max_pixels= to read them"
        )


def probe(source: Any, *, name: str | None = None, max_pixels: int) -> ClipInfo:
    """The clip's headers (``VideoError`` for a file that is no video within the limit)."""
    label = name or str(source)
    with _opened(source, label) as container:
        stream = _video_stream(container, label, max_pixels)
        rate = float(stream.average_rate) if stream.average_rate else None
        duration = (
            float(stream.duration * stream.time_base)
            if stream.duration and stream.time_base
            else (container.duration / 1e6 if container.duration else None)
        )
        audio = container.streams.audio[0].codec_context.name if container.streams.audio else None
        return ClipInfo(
            stream.codec_context.width,
            stream.codec_context.height,
            int(stream.frames or 0),
            Fraction(stream.time_base or Fraction(1, 90000)),
            rate,
            duration,
            audio,
        )


def upright(image: np.ndarray, rotation: int) -> np.ndarray:
    """``image`` turned as a player shows it: ``rotation`` degrees counter-clockwise (the
    display matrix, ``VideoFrame.rotation``), to the nearest quarter turn."""
    turns = round(rotation / 90) % 4
    return np.ascontiguousarray(np.rot90(image, turns)) if turns else image


def decode(
    source: Any, *, name: str | None = None, max_pixels: int, queue_size: int = 8
) -> Iterator[Frame]:
    """The frames of ``source`` in presentation order, decoded on a thread at most
    ``queue_size`` frames ahead. ``VideoError`` for a file without frames, a corrupt one (as
    soon as the decoder gives up), or frames over ``max_pixels``."""
    label = name or str(source)
    items: queue.Queue[Any] = queue.Queue(maxsize=max(1, queue_size))
    stop = threading.Event()
    end = object()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for frame in _frames(source, label, max_pixels):
                if not put(frame):
                    return
            put(end)
        except BaseException as exc:
            put(exc)

    thread = threading.Thread(target=produce, name="gapcam-decode", daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is end:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        # A generator left unfinished may be closed by the garbage collector on any thread,
        # this one's decoder included, which must not wait for itself; told to stop, it ends
        # at its next frame.
        if thread is not threading.current_thread():
            thread.join()


def _frames(source: Any, label: str, max_pixels: int) -> Iterator[Frame]:
    av = require_av(label)
    with _opened(source, label) as container:
        stream = _video_stream(container, label, max_pixels)
        stream.thread_type = "AUTO"
        time_base = Fraction(stream.time_base or Fraction(1, 90000))
        rate = stream.average_rate or stream.guessed_rate or 25
        index, last_pts = 0, None
        claimed = stream.codec_context.width * stream.codec_context.height
        try:
            for frame in container.decode(stream):
                _check_pixels(label, frame.width, frame.height, max_pixels)
                if frame.width * frame.height > claimed:  # memory was planned from the header
                    raise VideoError(
                        f"{label}: frame {index} is {frame.width}x{frame.height} pixels, more "
                        "than the stream's header says; refusing it"
                    )
                pts = frame.pts
                if pts is None:  # no timestamps (raw streams, some AVI): from the frame rate
                    pts = round(index / float(rate) / time_base)
                if last_pts is not None and pts <= last_pts:
                    pts = last_pts + 1  # a repeated timestamp: the encoder needs them rising
                last_pts = pts
                image = upright(frame.to_ndarray(format="rgb24"), frame.rotation or 0)
                yield Frame(index, pts, float(pts * time_base), time_base, image)
                index += 1
        except av.FFmpegError as exc:
            raise VideoError(
                f"{label}: corrupt or truncated video at frame {index} ({_reason(exc)})"
            ) from exc
        if index == 0:
            raise VideoError(f"{label}: the video stream holds no frames")


class ClipWriter:
    """Encodes frames into ``path`` (an MP4: H.264 yuv420p, libx264 ``ENCODER_PRESET``) at the
    timestamps given in ``time_base``, with the audio stream of ``audio_from`` copied packet by
    packet (no re-encoding), interleaved with the video as it goes. Frames of odd width or
    height (H.264 4:2:0 needs even sides) get one more row or column, a copy of the last.
    ``notes`` says what could not be kept (an audio codec MP4 cannot hold)."""

    def __init__(
        self, path: Path, time_base: Fraction, *, audio_from: Any = None, label: str = ""
    ) -> None:
        self.label = label or str(path)
        self.av = require_av(self.label)
        self.path = path
        self.time_base = time_base
        self.notes: list[str] = []
        self.container = self.av.open(str(path), "w", format="mp4")
        self.stream: Any = None
        self.size: tuple[int, int] | None = None
        self.frames = 0
        self._audio_in: Any = None
        self._audio_out: Any = None
        self._audio_packets: Iterator[Any] | None = None
        self._pending: Any = None
        self._audio_from = audio_from

    def _open_audio(self, source: Any) -> None:
        try:
            container = self.av.open(str(source) if isinstance(source, Path) else source, "r")
        except (self.av.FFmpegError, OSError, ValueError):
            return
        if not container.streams.audio:
            container.close()
            return
        audio = container.streams.audio[0]
        codec = audio.codec_context.name
        if codec not in self.container.supported_codecs:
            self.notes.append(f"audio ({codec}) not copied: an MP4 cannot hold it")
            container.close()
            return
        self._audio_in = container
        self._audio_out = self.container.add_stream_from_template(audio)
        self._audio_packets = (p for p in container.demux(audio) if p.dts is not None)

    def _open_video(self, width: int, height: int) -> None:
        stream = self.container.add_stream("libx264", options={"preset": ENCODER_PRESET})
        stream.width, stream.height = width + width % 2, height + height % 2
        stream.pix_fmt = "yuv420p"
        stream.time_base = self.time_base
        stream.codec_context.time_base = self.time_base
        stream.options = {"preset": ENCODER_PRESET, "crf": str(ENCODER_CRF)}
        self.stream = stream
        self.size = (width, height)

    def write(self, image: np.ndarray, pts: int) -> None:
        """One frame (H x W x 3 uint8, the same size every time) at ``pts``."""
        height, width = image.shape[:2]
        if self.stream is None:
            self._open_video(width, height)
            if self._audio_from is not None:  # after the video: it is the file's first stream
                self._open_audio(self._audio_from)
        elif self.size is not None and (width, height) != self.size:
            raise VideoError(
                f"{self.label}: frame size changed from {self.size[0]}x{self.size[1]} to "
                f"{width}x{height} mid-clip; gapcam writes one size"
            )
        if width % 2 or height % 2:
            image = np.pad(image, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")
        frame = self.av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        frame.pts = pts
        frame.time_base = self.time_base
        self._audio_until(float(pts * self.time_base))
        for packet in self.stream.encode(frame):
            self.container.mux(packet)
        self.frames += 1

    def _audio_until(self, time: float | None) -> None:
        """Copy the source's audio packets up to ``time`` seconds (None: all the rest)."""
        if self._audio_packets is None:
            return
        while True:
            packet = self._pending or next(self._audio_packets, None)
            self._pending = None
            if packet is None:
                self._audio_packets = None
                return
            if time is not None and float(packet.dts * packet.time_base) > time:
                self._pending = packet
                return
            packet.stream = self._audio_out
            self.container.mux(packet)

    def close(self) -> None:
        """Flush the encoder and the rest of the audio; finish the file."""
        try:
            if self.stream is not None:
                for packet in self.stream.encode():
                    self.container.mux(packet)
            self._audio_until(None)
        finally:
            self._close_inputs()
            self.container.close()

    def abort(self) -> None:
        self._close_inputs()
        with contextlib.suppress(self.av.FFmpegError, OSError, ValueError):
            self.container.close()  # the file itself is removed by OutputGuard.file

    def _close_inputs(self) -> None:
        if self._audio_in is not None:
            self._audio_in.close()
            self._audio_in = None

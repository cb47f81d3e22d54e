"""Class activation maps through a video: one class for the clip, maps smoothed over time.

>>> clip = Localizer().video("clip.mp4")          # lazily, frame by frame (gapcam[video])
>>> for frame in clip:
...     frame.time, frame.result.maps[0].boxes
>>> gapcam.video.write(Localizer().video("clip.mp4"), "clip.cam.mp4", audio_from="clip.mp4")

The frames are decoded on a thread (``gapcam.clips``), run through the network in batches,
and each frame's Result is made from the *smoothed* logits and raw maps: an exponential
moving average over time with a half-life of ``smooth`` seconds (``DEFAULT_SMOOTH``, chosen
by measuring flicker and lag, docs in README "Video"; 0 turns it off). ``fps`` analyses at
most that many frames a second; the frames in between carry the latest map (or are left out
with ``sampled_only``).

Which class: the ``classes`` given, else the ``top_k`` classes of highest mean probability
over the clip. That needs the whole clip's logits before the first frame is drawn, and
neither the clip nor its feature maps can be held in memory (a 10-minute clip has 18,000
frames; its features take 125 KB a frame). So a first pass runs the network once over the
clip and spills to a temporary file, per analysed frame, the logits and the raw
low-resolution maps of that frame's ``CANDIDATES`` best classes (about 6 KB a frame with
EfficientNet-Lite0); the second pass decodes the clip again (decoding is cheap next to the
network), reads them back and draws. A class that is not among a frame's candidates has a
probability under 1/(CANDIDATES + 1) there; for those frames alone the network runs again.
Memory stays the same whatever the clip's length; the temporary file grows with it.
"""

from __future__ import annotations

import itertools
import json
import math
import tempfile
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import IO, Any, Protocol

import numpy as np
import torch
from PIL import Image

from gapcam import clips
from gapcam.errors import GapcamError, VideoError
from gapcam.images import LoadedImage
from gapcam.outputs import OutputGuard, encode_image
from gapcam.overlay import display_scale
from gapcam.pipeline import DEFAULT_MEMORY_BUDGET, executor, ordered_map
from gapcam.result import MAP_PIXELS, Result, box_dict, prediction_dict
from gapcam.types import Placement, Preprocess

#: half-life in seconds of the moving average over the frames' logits and maps (``smooth=``,
#: ``--smooth``), chosen on generated clips (README "Video"): it cuts the frame-to-frame change
#: of a still, noisy clip's map to a quarter, and the box of a moving object trails the
#: unsmoothed one by 1.8 frames on average at 25 frames a second (``SMOOTH_LAG_FRAMES``: 2)
DEFAULT_SMOOTH = 0.08
#: the most frames, on average, the box of a moving object trails the unsmoothed one with
#: ``DEFAULT_SMOOTH`` at 25 frames a second (tests/test_video.py measures it)
SMOOTH_LAG_FRAMES = 2
#: the classes whose raw maps the first pass keeps per frame (see the module doc)
CANDIDATES = 10


class _Localizer(Protocol):
    """What this module needs of a ``gapcam.Localizer`` (which imports this module)."""

    @property
    def max_pixels(self) -> int: ...

    @property
    def gap_model(self) -> Any: ...

    @property
    def concurrency(self) -> int: ...

    def resolve_classes(self, classes: Sequence[int | str]) -> list[int]: ...

    def scores(
        self,
        loaded: Sequence[LoadedImage],
        *,
        classes: Sequence[int | str] | None = None,
        top_k: int = 1,
        predictions: int = 5,
    ) -> Any: ...

    def frame_result(
        self,
        item: LoadedImage,
        logits: torch.Tensor,
        mapped: Sequence[int],
        low: torch.Tensor,
        preprocess: Preprocess,
        placement: Placement,
        *,
        predictions: int = 5,
    ) -> Result: ...


@dataclass(frozen=True)
class FrameResult:
    """One frame of a video: its ``index`` in the source, ``time`` in seconds (``pts`` in
    ``time_base``), whether the network ``analysed`` it (else it carries the latest map), and
    its ``result`` (the frame, smoothed predictions, maps and boxes)."""

    index: int
    time: float
    pts: int
    time_base: Fraction
    analysed: bool
    result: Result

    def to_dict(self) -> dict[str, Any]:
        """The frame's entry in ``--json`` (``gapcam.schema.FRAME``)."""
        return {
            "frame": self.index,
            "time": round(self.time, 6),
            "predictions": [prediction_dict(p) for p in self.result.predictions],
            "maps": [
                {**prediction_dict(m.prediction), "boxes": [box_dict(b) for b in m.boxes]}
                for m in self.result.maps
            ],
        }

    def _repr_png_(self) -> bytes:
        """In a notebook, the frame shows as its overlay."""
        return encode_image(self.result.figure(), "png")


def check_options(fps: float | None, smooth: float) -> None:
    if fps is not None and not (math.isfinite(fps) and fps > 0):
        raise GapcamError(f"fps={fps!r}: give a positive number of frames a second")
    if not (math.isfinite(smooth) and smooth >= 0):
        raise GapcamError(f"smooth={smooth!r}: give a half-life in seconds, 0 or more")


class VideoFrames(Iterator[FrameResult]):
    """The frames of one video as ``FrameResult``s, made as they are asked for
    (``Localizer.video``; keywords ``classes``, ``top_k``, ``fps``, ``smooth``,
    ``sampled_only``, ``predictions``, ``batch_size``, ``memory_budget``, ``name``,
    ``on_frames``). ``classes`` holds the clip's mapped classes once known (at the first
    frame), ``mean_probability`` each one's mean probability over the analysed frames once the
    last frame is out, ``analysed`` how many frames the network saw.

    The work and its state are a ``_Clip`` that never refers back to this object: dropping an
    unfinished ``VideoFrames`` closes its frames at once (the decoding thread, the first
    pass's file, the thread pools), not at the garbage collector's next pass, which may run on
    any thread."""

    def __init__(self, localizer: _Localizer, source: Any, **options: Any) -> None:
        self._clip = _Clip(localizer, source, **options)
        self._frames = self._clip.run()

    @property
    def localizer(self) -> _Localizer:
        return self._clip.localizer

    @property
    def source(self) -> Any:
        return self._clip.source

    @property
    def label(self) -> str:
        return self._clip.label

    @property
    def info(self) -> clips.ClipInfo:
        return self._clip.info

    @property
    def batch_size(self) -> int:
        return self._clip.batch_size

    @property
    def classes(self) -> list[int] | None:
        return self._clip.classes

    @property
    def mean_probability(self) -> dict[int, float]:
        return self._clip.mean_probability

    @property
    def analysed(self) -> int:
        return self._clip.analysed

    def __next__(self) -> FrameResult:
        return next(self._frames)

    def __repr__(self) -> str:
        info = self.info
        rate = f", {info.rate:.3g} fps" if info.rate else ""
        count = f", {info.frames} frames" if info.frames else ""
        return f"VideoFrames({self.label!r}, {info.width}x{info.height}{count}{rate})"

    def _repr_png_(self) -> bytes | None:
        """In a notebook, a clip shows itself as a strip of five frames (``strip``) from a run
        of its own over the same file with the same settings, so this iterator is left as it
        was. A clip given as a file object shows as text (it cannot be read twice safely)."""
        if not isinstance(self.source, (str, Path)):
            return None
        again = VideoFrames(self.localizer, self.source, **self._clip.options)
        try:
            return encode_image(strip(again), "png")
        finally:
            again.close()

    def close(self) -> None:
        self._frames.close()


class _Clip:
    """One ``VideoFrames``'s settings, state and work: ``run`` makes its frames."""

    def __init__(
        self,
        localizer: _Localizer,
        source: Any,
        *,
        classes: Sequence[int | str] | None = None,
        top_k: int = 1,
        fps: float | None = None,
        smooth: float = DEFAULT_SMOOTH,
        sampled_only: bool = False,
        predictions: int = 5,
        batch_size: int = 8,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        name: str | None = None,
        on_frames: Callable[[str, int, int], None] | None = None,
    ) -> None:
        check_options(fps, smooth)
        self.options: dict[str, Any] = {
            "classes": classes, "top_k": top_k, "fps": fps, "smooth": smooth,
            "sampled_only": sampled_only, "predictions": predictions, "batch_size": batch_size,
            "memory_budget": memory_budget, "name": name,
        }  # fmt: skip
        self.localizer = localizer
        self.source = source
        self.label = name or (str(source) if isinstance(source, (str, Path)) else "<video>")
        self.wanted = None if classes is None else localizer.resolve_classes(classes)
        self.top_k = min(max(1, top_k), localizer.gap_model.num_classes)
        self.fps, self.smooth, self.sampled_only = fps, smooth, sampled_only
        self.predictions = predictions
        #: told (stage "scan" or "write", frames just done, frames the container announces)
        self.on_frames = on_frames or (lambda stage, count, total: None)
        self.info = clips.probe(source, name=self.label, max_pixels=localizer.max_pixels)
        self.batch_size, self.queue_size = _flight(self.info, batch_size, memory_budget)
        self.classes: list[int] | None = self.wanted
        self.mean_probability: dict[int, float] = {}
        self.analysed = 0

    def _decode(self) -> Iterator[list[clips.Frame]]:
        if hasattr(self.source, "seek"):
            self.source.seek(0)
        frames = clips.decode(
            self.source,
            name=self.label,
            max_pixels=self.localizer.max_pixels,
            queue_size=self.queue_size,
        )
        chunk: list[clips.Frame] = []
        for frame in frames:
            chunk.append(frame)
            if len(chunk) >= self.batch_size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    @property
    def _path(self) -> Path | None:
        return Path(self.source) if isinstance(self.source, (str, Path)) else None

    def _loaded(self, frame: clips.Frame, image: Image.Image | None = None) -> LoadedImage:
        return LoadedImage(image or Image.fromarray(frame.image), self.label, self._path)

    def _batches(self) -> Iterator[_Batch]:
        """The decoded frames in batches, each with its pictures and the analysed ones."""
        sampler = _Sampler(self.fps)
        for chunk in self._decode():
            pictures = [Image.fromarray(f.image) for f in chunk]
            taken = [sampler.take(f.time) for f in chunk]
            loaded = [
                self._loaded(f, image)
                for f, image, take in zip(chunk, pictures, taken, strict=True)
                if take
            ]
            yield _Batch(chunk, pictures, taken, loaded)

    def run(self) -> Generator[FrameResult, None, None]:
        if self.wanted is not None:
            yield from self._draw(_NetworkScores(self.localizer, self.wanted))
            return
        if not isinstance(self.source, (str, Path)) and not hasattr(self.source, "seek"):
            raise VideoError(
                f"{self.label}: choosing the clip's class reads it twice: give a path or a "
                "seekable file, or classes="
            )
        with tempfile.TemporaryFile(prefix="gapcam-video-") as spill:
            chosen, layout = self._scan(spill)
            self.classes = chosen
            spill.seek(0)
            yield from self._draw(_SpilledScores(self.localizer, chosen, spill, layout))

    def _scan(self, spill: IO[bytes]) -> tuple[list[int], _Layout]:
        """The first pass: the network over the analysed frames (``Localizer.concurrency``
        batches at once, as ``gapcam.batch`` runs them); their logits and candidate maps into
        ``spill``; the clip's classes by mean probability."""
        model = self.localizer.gap_model
        candidates = min(max(CANDIDATES, self.top_k), model.num_classes)
        total = np.zeros(model.num_classes, dtype=np.float64)
        layout: _Layout | None = None

        def score(batch: _Batch) -> Any:
            if not batch.loaded:
                return None
            return self.localizer.scores(batch.loaded, top_k=candidates, predictions=1)

        streams = self.localizer.concurrency
        with ExitStack() as stack:
            pool = executor(streams if streams > 1 else 0, stack, "infer")
            for batch, scores in ordered_map(score, self._batches(), pool, window=streams):
                self.on_frames("scan", len(batch.frames), self.info.frames)
                if isinstance(scores, GapcamError):
                    raise scores
                if scores is None:
                    continue
                total += scores.probabilities.double().sum(dim=0).cpu().numpy()
                layout = _Layout(
                    model.num_classes, candidates, tuple(scores.low.shape[-2:]),
                    scores.preprocess, scores.placement,
                )  # fmt: skip
                logits = scores.logits.float().cpu().numpy()
                mapped = scores.mapped.cpu().numpy().astype(np.int32)
                low = scores.low.float().cpu().numpy()
                for i in range(len(batch.loaded)):
                    spill.write(logits[i].tobytes() + mapped[i].tobytes() + low[i].tobytes())
                self.analysed += len(batch.loaded)
        assert layout is not None  # decode raises for a clip without frames
        mean = total / max(1, self.analysed)
        chosen = [int(i) for i in np.argsort(-mean, kind="stable")[: self.top_k]]
        self.mean_probability = {c: float(mean[c]) for c in chosen}
        self.analysed = 0
        return chosen, layout

    def _draw(self, scores: _Scores) -> Iterator[FrameResult]:
        """The frames with their results: analysed ones from ``scores`` smoothed over time,
        the others carrying the latest result. ``scores.prepare`` runs here, in order (it
        reads the first pass's file); ``scores.compute`` (the network, when it runs) on
        ``Localizer.concurrency`` threads."""
        ema = _Average(self.smooth)
        totals: torch.Tensor | None = None
        last: Result | None = None

        def compute(item: tuple[_Batch, Any]) -> list[Raw]:
            return scores.compute(item[1]) if item[0].loaded else []

        prepared = ((batch, scores.prepare(batch.loaded)) for batch in self._batches())
        streams = self.localizer.concurrency
        with ExitStack() as stack:
            pool = executor(streams if streams > 1 else 0, stack, "infer")
            # each frame's Result (upsampled, normalised maps, boxes) is made on as many
            # threads as there are inference streams, as gapcam.batch makes them on its
            # streams (with the eager backend: here, one at a time)
            makers = executor(streams if streams > 1 else 0, stack, "result")
            for (batch, _), outcome in ordered_map(compute, prepared, pool, window=streams):
                if isinstance(outcome, GapcamError):
                    raise outcome
                raw = iter(outcome)
                made: list[Future[Result] | None] = []
                for frame, image, taken in zip(
                    batch.frames, batch.pictures, batch.taken, strict=True
                ):
                    if not taken:
                        made.append(None)
                        continue
                    logits, low, preprocess, placement = next(raw)
                    probabilities = torch.softmax(logits.double(), dim=0)[scores.chosen]
                    totals = probabilities if totals is None else totals + probabilities
                    logits, low = ema.update(frame.time, logits, low)  # new tensors each time
                    made.append(
                        makers.submit(
                            self.localizer.frame_result,
                            LoadedImage(image, self.label, self._path),
                            logits,
                            scores.chosen,
                            low[None],
                            preprocess,
                            placement,
                            predictions=self.predictions,
                        )
                    )
                    self.analysed += 1
                for frame, image, future in zip(batch.frames, batch.pictures, made, strict=True):
                    if future is not None:
                        last = future.result()
                    elif self.sampled_only or last is None:
                        continue
                    else:
                        last = replace(last, image=image)
                    yield FrameResult(
                        frame.index, frame.time, frame.pts, frame.time_base, future is not None,
                        last,
                    )  # fmt: skip
                self.on_frames("write", len(batch.frames), self.info.frames)
        scores.finish()
        if totals is not None and self.wanted is not None:
            mean = (totals / max(1, self.analysed)).tolist()
            self.mean_probability = dict(zip(scores.chosen, mean, strict=True))


@dataclass(frozen=True)
class _Batch:
    """Decoded frames, their pictures, which ones the network sees (``taken``) and those
    as the localizer takes them (``loaded``)."""

    frames: list[clips.Frame]
    pictures: list[Image.Image]
    taken: list[bool]
    loaded: list[LoadedImage]


@dataclass(frozen=True)
class _Layout:
    """How one analysed frame is laid out in the spill file."""

    classes: int
    candidates: int
    grid: tuple[int, int]
    preprocess: Preprocess
    placement: Placement

    @property
    def record(self) -> int:
        rows, columns = self.grid
        return 4 * (self.classes + self.candidates + self.candidates * rows * columns)


#: (logits K, raw maps k x h x w of the chosen classes, preprocess, placement) of one frame
Raw = tuple[torch.Tensor, torch.Tensor, Preprocess, Placement]


class _Scores(Protocol):
    chosen: list[int]

    def prepare(self, loaded: list[LoadedImage]) -> Any: ...

    def compute(self, prepared: Any) -> list[Raw]: ...

    def finish(self) -> None: ...


class _NetworkScores:
    """The chosen classes' raw logits and maps from the network (one pass)."""

    def __init__(self, localizer: _Localizer, chosen: list[int]) -> None:
        self.localizer, self.chosen = localizer, chosen

    def prepare(self, loaded: list[LoadedImage]) -> list[LoadedImage]:
        return loaded

    def compute(self, loaded: list[LoadedImage]) -> list[Raw]:
        scores = self.localizer.scores(loaded, classes=self.chosen, predictions=1)
        return [
            (scores.logits[i].float().cpu(), scores.low[i], scores.preprocess, scores.placement)
            for i in range(len(loaded))
        ]

    def finish(self) -> None:
        pass


class _SpilledScores:
    """The chosen classes' raw logits and maps read back from the first pass's file; the
    network runs again only for a frame where a chosen class was not a candidate."""

    def __init__(
        self, localizer: _Localizer, chosen: list[int], spill: IO[bytes], layout: _Layout
    ) -> None:
        self.localizer, self.chosen, self.spill, self.layout = localizer, chosen, spill, layout
        self.recomputed = 0

    def prepare(self, loaded: list[LoadedImage]) -> tuple[list[Raw], list[LoadedImage]]:
        """The batch's records, read in order; the frames whose maps must be made again."""
        layout = self.layout
        k, m = layout.classes, layout.candidates
        rows, columns = layout.grid
        out: list[Raw] = []
        missing: list[LoadedImage] = []
        for item in loaded:
            data = self.spill.read(layout.record)
            if len(data) != layout.record:
                raise VideoError(
                    f"{item.name}: the video changed while it was read (more frames the "
                    "second time)"
                )
            values = np.frombuffer(data, dtype=np.float32)
            logits = torch.from_numpy(values[:k].copy())
            mapped = np.frombuffer(data[4 * k : 4 * (k + m)], dtype=np.int32).tolist()
            maps = values[k + m :].reshape(m, rows, columns)
            if all(c in mapped for c in self.chosen):
                low = torch.from_numpy(np.stack([maps[mapped.index(c)] for c in self.chosen]))
            else:
                low = torch.empty(0)
                missing.append(item)
            out.append((logits, low, layout.preprocess, layout.placement))
        self.recomputed += len(missing)
        return out, missing

    def compute(self, prepared: tuple[list[Raw], list[LoadedImage]]) -> list[Raw]:
        out, missing = prepared
        if not missing:
            return out
        scores = self.localizer.scores(missing, classes=self.chosen, predictions=1)
        remade = iter(range(len(missing)))
        result = []
        for logits, low, preprocess, placement in out:
            if low.numel():
                result.append((logits, low, preprocess, placement))
            else:  # the first pass's logits: the same forward pass
                j = next(remade)
                result.append(
                    (logits, scores.low[j].float().cpu(), scores.preprocess, scores.placement)
                )
        return result

    def finish(self) -> None:
        if self.spill.read(1):
            raise VideoError("the video changed while it was read (fewer frames the second time)")


class _Sampler:
    """Which frames the network sees: all, or at most ``fps`` a second (the first frame of
    each 1/fps-second slot of the clip's timeline)."""

    def __init__(self, fps: float | None) -> None:
        self.fps = fps
        self.slot: int | None = None

    def take(self, time: float) -> bool:
        if self.fps is None:
            return True
        slot = math.floor(time * self.fps + 1e-9)
        if self.slot is not None and slot <= self.slot:
            return False
        self.slot = slot
        return True


class _Average:
    """The exponential moving average of logits and maps over the frames' timeline: a weight
    of 1/2 after ``half_life`` seconds, whatever the frame rate or the sampling."""

    def __init__(self, half_life: float) -> None:
        self.half_life = half_life
        self.time: float | None = None
        self.logits: torch.Tensor | None = None
        self.maps: torch.Tensor | None = None

    def update(self, time: float, logits: torch.Tensor, maps: torch.Tensor) -> tuple[Any, Any]:
        logits, maps = logits.float(), maps.float()
        if self.logits is None or self.maps is None or self.time is None or self.half_life == 0:
            self.logits, self.maps = logits, maps
        else:
            step = max(time - self.time, 1e-3)
            keep = 0.5 ** (step / self.half_life)
            self.logits = keep * self.logits + (1 - keep) * logits
            self.maps = keep * self.maps + (1 - keep) * maps.to(self.maps.device)
        self.time = time
        return self.logits, self.maps


def _flight(info: clips.ClipInfo, batch_size: int, memory_budget: int) -> tuple[int, int]:
    """(frames per forward pass, frames decoded ahead) that keep the frames in flight within
    ``memory_budget``: each costs its RGB array (3 bytes a pixel) and image (4), its maps at box
    resolution and its drawn figure (about 16 bytes a pixel of the display size); about four
    batches are in flight (decoded ahead, analysed, drawn, encoded)."""
    pixels = info.width * info.height
    scale = display_scale((info.width, info.height))
    cost = pixels * 7 + min(pixels, MAP_PIXELS) * 8 + int(pixels * scale * scale) * 16
    frames = max(4, min(64, memory_budget // max(1, cost)))
    batch = max(1, min(batch_size, frames // 4))
    return batch, batch


def frames(localizer: _Localizer, source: Any, **options: Any) -> VideoFrames:
    """``VideoFrames`` of ``source`` (a path or a binary file object), as ``Localizer.video``."""
    return VideoFrames(localizer, source, **options)


@dataclass
class Written:
    """What ``write_frames`` wrote: the path, frames, and what it could not keep."""

    path: Path
    frames: int = 0
    notes: list[str] = field(default_factory=list)


def write(
    frames: Iterable[FrameResult],
    target: str | Path,
    *,
    audio_from: str | Path | None = None,
    alpha: float = 0.5,
    cmap: str = "jet",
    overwrite: bool = False,
    workers: int = 2,
) -> Path:
    """Draw ``frames`` (as ``Result.figure`` draws an image) into an H.264 MP4 at ``target``,
    at the frames' timestamps, with the audio of the file ``audio_from`` copied; written
    atomically, never over the frames' source (``Result.path``) or ``audio_from``, nor over an
    existing file unless ``overwrite``."""
    guard = OutputGuard([Path(audio_from)] if audio_from is not None else [])
    guard.overwrite = overwrite
    return write_frames(
        frames, Path(target), guard, audio_from=audio_from, alpha=alpha, cmap=cmap,
        workers=workers,
    ).path  # fmt: skip


def write_frames(
    frames: Iterable[FrameResult],
    target: Path,
    guard: OutputGuard,
    *,
    audio_from: str | Path | None = None,
    alpha: float = 0.5,
    cmap: str = "jet",
    workers: int = 2,
    window: int = 4,
) -> Written:
    """``write`` with the run's ``OutputGuard``: figures drawn on ``workers`` threads and
    encoded on one more, each at most ``window`` frames ahead of the next stage, so that the
    network (on the calling thread, which makes ``frames``), drawing and encoding overlap."""
    written = Written(target)

    def draw(frame: FrameResult) -> np.ndarray:
        return np.asarray(frame.result.figure(alpha=alpha, cmap=cmap))

    window = max(1, window)
    encoding: deque[Future[None]] = deque()
    frames = iter(frames)
    first = next(frames, None)  # (a clip's first pass runs here)
    if first is None:
        raise VideoError(f"{target}: no frames to write")
    if first.result.path is not None:
        guard.protect(first.result.path)  # never written over its own source
    frames = itertools.chain([first], frames)
    with (
        guard.file(target) as temp,
        ThreadPoolExecutor(max(1, workers), thread_name_prefix="gapcam-draw") as pool,
        ThreadPoolExecutor(1, thread_name_prefix="gapcam-encode") as encoder,
    ):
        writer: clips.ClipWriter | None = None
        try:
            for frame, image in ordered_map(draw, frames, pool, window=window):
                if isinstance(image, GapcamError):
                    raise image
                if writer is None:
                    writer = clips.ClipWriter(
                        temp, frame.time_base, audio_from=audio_from, label=str(target)
                    )
                encoding.append(encoder.submit(writer.write, image, frame.pts))
                while len(encoding) > window:
                    encoding.popleft().result()
            while encoding:
                encoding.popleft().result()
            if writer is None:
                raise VideoError(f"{target}: no frames to write")
            writer.close()
        except BaseException:
            for future in encoding:  # the encoder thread is done with the writer first
                future.cancel() or future.exception()
            if writer is not None:
                writer.abort()
            raise
        written.frames, written.notes = writer.frames, writer.notes
    return written


def strip(frames: Iterable[FrameResult], count: int = 5, *, width: int = 1200) -> Image.Image:
    """``count`` frames evenly spread over ``frames`` (any iterable, a long clip's lazy
    ``VideoFrames`` included: at most ``2 * count`` frames are held at once), side by side, each
    with its overlay and time: the picture of a clip in a notebook or a README."""
    from gapcam.overlay import add_caption, grid

    count = max(1, count)
    kept: list[FrameResult] = []
    step = 1
    for seen, frame in enumerate(frames):
        if seen % step == 0:
            kept.append(frame)
            if len(kept) == 2 * count:  # keep every other one, and take every 2 * step-th
                kept, step = kept[::2], step * 2
    if not kept:
        raise VideoError("strip: no frames")
    shown, last = min(count, len(kept)), len(kept) - 1  # the first, the last, evenly between
    picked = [kept[round(i * last / max(1, shown - 1))] for i in range(shown)]
    panels = [add_caption(f.result.figure(), f"t = {f.time:.2f} s") for f in picked]
    figure = grid(panels, columns=len(panels))
    if figure.width > width:
        height = round(figure.height * width / figure.width)
        figure = figure.resize((width, height), Image.Resampling.LANCZOS)
    return figure


def frame_lines(frames: Iterable[FrameResult], spill: IO[bytes]) -> Iterator[FrameResult]:
    """``frames`` passed on, the analysed ones' JSON entries written to ``spill``, a line each
    (read back by ``spilled_entries``)."""
    for frame in frames:
        if frame.analysed:
            spill.write(json.dumps(frame.to_dict(), ensure_ascii=False).encode() + b"\n")
        yield frame


def spilled_entries(spill: IO[bytes]) -> Iterator[dict[str, Any]]:
    spill.seek(0)
    for line in spill:
        yield json.loads(line)


def localize_video(
    localizer: _Localizer,
    path: Path,
    target: Path | None,
    guard: OutputGuard,
    spill: IO[bytes],
    *,
    alpha: float = 0.5,
    cmap: str = "jet",
    workers: int = 2,
    **options: Any,
) -> tuple[VideoFrames, dict[str, Any]]:
    """``gapcam localize`` on one video: its overlay video written to ``target`` (None: none),
    the analysed frames' JSON entries to ``spill`` (a line each, ``spilled_entries``); the
    frames' summary and the video's ``--json`` entry (``gapcam.schema.VIDEO``), whose last
    key, ``frames``, is left empty for ``JsonStream.add(entry, items=...)``. ``options``:
    ``VideoFrames``'s keywords."""
    clip = VideoFrames(localizer, path, name=str(path), **options)
    passed = frame_lines(clip, spill)
    first: FrameResult | None = None
    count = 0
    notes: list[str] = []

    def counted(frames: Iterable[FrameResult]) -> Iterator[FrameResult]:
        nonlocal first, count
        for frame in frames:
            first = first or frame
            count += 1
            yield frame

    if target is not None:
        window = 2 * clip.batch_size
        written = write_frames(
            counted(passed), target, guard, audio_from=path, alpha=alpha, cmap=cmap,
            workers=workers, window=window,
        )  # fmt: skip
        notes += written.notes
    else:
        for _ in counted(passed):
            pass
    assert first is not None  # decode raises for a clip without frames
    names = localizer.gap_model.class_names
    width, height = first.result.size
    document: dict[str, Any] = {
        "input": str(path),
        "width": width,
        "height": height,
        "frame_count": count,
        "analysed": clip.analysed,
        "classes": [
            {"index": c, "name": names[c], "mean_probability": clip.mean_probability.get(c, 0.0)}
            for c in clip.classes or []
        ],
        "notes": notes,
        **({"overlay": str(target)} if target is not None else {}),
        "frames": [],
    }
    return clip, document

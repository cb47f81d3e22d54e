"""Video against images, H.264 encoding, and memory against clip length, in one run.

    python benchmarks/bench_video.py                    # the figures of README "Video"
    python benchmarks/bench_video.py --frames 600 --backend onnx

1. **Throughput.** A generated clip (the cat crossing a 640 x 360 background, tests/videoclips)
   and the same frames saved as JPEG files (quality 95): ``gapcam localize clip.mp4`` against
   ``gapcam localize frames/``, same model, backend and threads, each a fresh process (its
   start and model build timed separately and subtracted; the fastest of ``REPEATS`` runs).
   Analysed frames a second of each, and their ratio (target: at least 0.9).
2. **Encoding.** ``gapcam.clips.ClipWriter`` alone on the overlay figures of that clip
   (pre-drawn), with the preset gapcam uses and two others: milliseconds a frame.
3. **Memory.** Peak RSS of ``gapcam localize`` on a generated 1-minute and 10-minute clip
   (small frames, ``--fps 2``, to keep the run short; every source frame is still decoded,
   drawn and encoded): they must be within 10% of each other.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import videoclips  # tests/videoclips.py

PYTHON = sys.executable
#: runs of each throughput measurement; the fastest counts
REPEATS = 3


def cli(*args: str) -> tuple[float, int, str]:
    """(seconds, peak RSS in MB, stderr) of one ``gapcam`` process."""
    code = (
        "import resource, subprocess, sys, time;"
        "t = time.perf_counter();"
        "p = subprocess.run(sys.argv[1:], capture_output=True, text=True);"
        "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss);"
        "sys.stderr.write(p.stderr); sys.exit(p.returncode)"
    )
    done = subprocess.run(
        [PYTHON, "-c", code, PYTHON, "-m", "gapcam", *args], capture_output=True, text=True
    )
    if done.returncode:
        raise SystemExit(f"gapcam {' '.join(args)} failed:\n{done.stderr}")
    seconds, rss = done.stdout.split()
    return float(seconds), int(rss) // 1024, done.stderr


def throughput(folder: Path, frames: int, common: list[str]) -> None:
    clip = folder / "clip.mp4"
    videoclips.moving_cat(clip, frames=frames, rate=25, size=(640, 360), scale=0.6, audio=True)
    stills = folder / "frames"
    stills.mkdir()
    import av
    from PIL import Image

    with av.open(str(clip)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            frame.to_image().save(stills / f"{i:05d}.jpg", quality=95)
    one = folder / "one"
    one.mkdir()
    Image.open(stills / "00000.jpg").save(one / "one.jpg", quality=95)

    def best(*args: str) -> float:
        """The fastest of ``REPEATS`` runs (the machine may be shared)."""
        return min(cli("localize", *args, *common)[0] for _ in range(REPEATS))

    start = best(str(one), "--out", str(folder / "o0"), "--overwrite")
    images = best(str(stills), "--out", str(folder / "o1"), "--overwrite")
    video = best(str(clip), "--out", str(folder / "o2"), "--overwrite")
    bare = best(str(clip), "--out", str(folder / "o3"), "--no-overlay")
    rate_images = frames / (images - start)
    rate_video = frames / (video - start)
    print(f"throughput, {frames} frames of 640x360 ({' '.join(common)}):")
    print(f"  start + model build + one image: {start:.2f} s (subtracted below)")
    print(f"  gapcam localize frames/ (JPEG):  {rate_images:7.1f} frames/s")
    print(f"  gapcam localize clip.mp4:        {rate_video:7.1f} frames/s")
    print(f"  clip.mp4 --no-overlay:           {frames / (bare - start):7.1f} frames/s")
    print(f"  ratio video / images:            {rate_video / rate_images:7.2f}  (target >= 0.9)")


def encoding(folder: Path) -> None:
    from fractions import Fraction

    from gapcam import clips
    from gapcam.localizer import Localizer

    clip = folder / "clip.mp4"
    figures = [
        np.asarray(f.result.figure()) for f in Localizer().video(clip, classes=[285], fps=5)
    ][:40]
    height, width = figures[0].shape[:2]
    print(f"H.264 encoding of {len(figures)} overlay frames of {width}x{height} (libx264):")
    for preset in ("ultrafast", "veryfast", "medium"):
        old = clips.ENCODER_PRESET
        clips.ENCODER_PRESET = preset
        target = folder / f"enc-{preset}.mp4"
        writer = clips.ClipWriter(target, Fraction(1, 25))
        start = time.perf_counter()
        for i, image in enumerate(figures):
            writer.write(image, i)
        writer.close()
        seconds = time.perf_counter() - start
        clips.ENCODER_PRESET = old
        used = " (gapcam)" if preset == old else ""
        size = target.stat().st_size / len(figures) / 1024
        print(
            f"  {preset:10s} {1000 * seconds / len(figures):6.1f} ms/frame, {size:5.1f} KB/frame{used}"
        )


def memory(
    folder: Path,
    common: list[str],
    size: tuple[int, int] = (320, 240),
    lengths: tuple[float, float] = (1, 10),
) -> None:
    rss = {}
    width, height = size
    for minutes in lengths:
        clip = folder / f"long-{minutes}.mp4"
        frames = videoclips.cat_frames(size, 1, scale=0.35 * height / 240)
        count = round(minutes * 60 * 10)  # 10 frames a second
        noise = np.random.default_rng(0)
        images = [
            np.clip(frames[0] + noise.normal(0, 4, frames[0].shape), 0, 255).astype(np.uint8)
            for _ in range(50)
        ]
        videoclips.write_clip(clip, [images[i % 50] for i in range(count)], rate=10, audio=True)
        seconds, rss[minutes], _ = cli(
            "localize", str(clip), "--out", str(folder / f"m{minutes}"), "--fps", "2", *common
        )
        print(f"  {minutes:g}-minute clip ({count} frames of {width}x{height}, --fps 2): peak "
              f"RSS {rss[minutes]} MB, {seconds:.1f} s")  # fmt: skip
    short, long = lengths
    change = rss[long] / rss[short] - 1
    print(f"  {long:g} minutes against {short:g}: {change:+.1%} (must be within 10%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--backend", default="eager")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-only", action="store_true", help="only the memory figures")
    parser.add_argument(
        "--memory-size", default="320x240", help="frame size of the memory clips (WxH)"
    )
    parser.add_argument(
        "--memory-minutes", type=float, nargs=2, default=(1, 10), metavar=("SHORT", "LONG")
    )
    args = parser.parse_args()
    size = tuple(int(n) for n in args.memory_size.lower().split("x"))
    common = ["--backend", args.backend, "-q"]
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}")  # fmt: skip
    with tempfile.TemporaryDirectory() as temp:
        folder = Path(temp)
        if not args.memory_only:
            throughput(folder, args.frames, common)
            encoding(folder)
        if not args.skip_memory:
            print("peak memory:")
            memory(folder, common, (size[0], size[1]), tuple(args.memory_minutes))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Make docs/video-strip.jpg, README's picture of a video: the cat crossing a generated clip
(tests/videoclips.py), five frames of ``gapcam.video.strip`` with the default settings.

    python scripts/video_strip.py [--out docs/video-strip.jpg]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    import videoclips  # tests/videoclips.py

    from gapcam import video
    from gapcam.localizer import Localizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "video-strip.jpg")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temp:
        clip = Path(temp) / "cat.mp4"
        videoclips.moving_cat(clip, frames=25, rate=12, size=(800, 360), scale=0.8, audio=False)
        frames = list(Localizer().video(clip))
        video.strip(frames, 5, width=1500).save(args.out, quality=88)
    print(args.out)


if __name__ == "__main__":
    main()

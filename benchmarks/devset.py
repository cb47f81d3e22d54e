"""The ILSVRC dev set for the benchmarks: ``--data DIR``, by default $GAPCAM_ILSVRC_DEV.

docs/evaluate.md says what the set is and how to build it (scripts/make_ilsvrc_dev.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def add_data_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        type=Path,
        default=os.environ.get("GAPCAM_ILSVRC_DEV") or None,
        help="the ILSVRC dev set folder (default: $GAPCAM_ILSVRC_DEV)",
    )


def dev_set(data: Path | None) -> Path:
    """``--data``, else $GAPCAM_ILSVRC_DEV (the default); neither: exit with what to pass."""
    if data is None:
        raise SystemExit(
            f"{Path(sys.argv[0]).name}: no ILSVRC dev set: set GAPCAM_ILSVRC_DEV to its folder or "
            "pass --data DIR (docs/evaluate.md says how to build the set)"
        )
    if not (data / "image_ids.txt").is_file():
        raise SystemExit(
            f"{data}: no image_ids.txt: --data (or GAPCAM_ILSVRC_DEV) must be the ILSVRC dev set "
            "folder (docs/evaluate.md says how to build it)"
        )
    return data

"""Peak memory of `gapcam localize` under one memory budget, whatever the files claim.

    python benchmarks/bench_memory.py                    # every case, --memory-budget 2G
    python benchmarks/bench_memory.py --budget 1G --case claims --case photos

Cases (docs/speed.md, "Memory"):
- ``claims``: 24 PNGs of 116,625 bytes that each declare 10950 x 10950 pixels (120 MP, under the
  default ``--max-pixels``): valid, all black, 8-bit gray, compressed row block by row block.
- ``photos``: the 300 photos of the ILSVRC dev set (``--data``, by default $GAPCAM_ILSVRC_DEV).
- ``sparse``: a 4 GB and a 1 TB sparse file named ``.png`` next to one photo (one line each).

Each case runs ``python -m gapcam localize FOLDER --out ... --json ... -q --memory-budget B`` in
a fresh measuring process, which reads the peak RSS of its one child with
``getrusage(RUSAGE_CHILDREN)`` (Linux: kilobytes). Prints one row per case.
"""

from __future__ import annotations

import argparse
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from devset import add_data_option, dev_set

CLAIMED_SIDE = 10950
CASES = ("claims", "photos", "sparse")
MEASURE = (
    "import resource, subprocess, sys; "
    "done = subprocess.run([sys.executable, '-m', 'gapcam', *sys.argv[1:]], "
    "stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, done.returncode); "
    "sys.stderr.write(done.stderr[-2000:])"
)


def claiming_png(path: Path, side: int = CLAIMED_SIDE) -> None:
    """A valid all-black 8-bit gray PNG of ``side`` x ``side`` in about 117 KB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    packer = zlib.compressobj(9)
    row = b"\x00" + bytes(side)
    idat = b"".join(packer.compress(row * 500) for _ in range(side // 500))
    idat += packer.compress(row * (side % 500)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat)
    path.write_bytes(png + chunk(b"IEND", b""))


def make_case(case: str, root: Path, data: Path | None) -> Path:
    folder = root / case
    folder.mkdir()
    if case == "claims":
        claiming_png(folder / "claim-00.png")
        for i in range(1, 24):
            shutil.copy(folder / "claim-00.png", folder / f"claim-{i:02d}.png")
    elif case == "photos":
        return dev_set(data) / "images"
    else:
        for name, size in (("four-gb.png", 4 << 30), ("one-tb.png", 1 << 40)):
            with (folder / name).open("wb") as handle:
                handle.truncate(size)
        photo = Path(__file__).resolve().parents[1] / "src" / "gapcam" / "web" / "examples"
        shutil.copy(photo / "cat.png", folder / "cat.png")
    return folder


def measure(folder: Path, out: Path, budget: str, extra: list[str]) -> tuple[int, int, float, str]:
    """(peak RSS in KB, exit code, seconds, the summary line) of one localize run."""
    argv = ["localize", str(folder), "--out", str(out), "--json", str(out.with_suffix(".json"))]
    argv += ["-q", "--memory-budget", budget, *extra]
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, *argv], capture_output=True, text=True, check=False
    )
    seconds = time.perf_counter() - started
    peak, code = done.stdout.split()
    lines = done.stderr.strip().splitlines()
    return int(peak), int(code), seconds, lines[-1] if lines else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="2G", help="--memory-budget of every run (2G)")
    parser.add_argument("--case", action="append", choices=CASES, help="default: all")
    parser.add_argument("--backend", default="auto", help="--backend of every run (auto)")
    add_data_option(parser)
    args = parser.parse_args()
    print(f"gapcam localize --memory-budget {args.budget} --backend {args.backend}, peak RSS")
    print(f"{'case':8} {'seconds':>8} {'peak RSS MB':>12}  exit  summary")
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as temporary:
        root = Path(temporary)
        for case in args.case or CASES:
            folder = make_case(case, root, args.data)
            extra = ["--backend", args.backend]
            peak, code, seconds, summary = measure(folder, root / f"{case}-out", args.budget, extra)
            print(f"{case:8} {seconds:8.1f} {peak / 1024:12,.0f}  {code:4}  {summary}")


if __name__ == "__main__":
    main()

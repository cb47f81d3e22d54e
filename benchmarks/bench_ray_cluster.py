"""Wall time of `gapcam localize` on the ILSVRC dev images: the local engine against the Ray
engine on a two-node cluster started on this machine (scripts/ray_two_nodes.py: one CPU per
node, the driver on the head through ``ray://``), and the same cluster run with its worker node
killed part-way (what happens to that node's rows). One run each; same model, backend, batch
size and outputs (JSON vs Parquet, no overlays except in the kill run, where the overlays show
progress).

    python benchmarks/bench_ray_cluster.py [--data DIR] [--images 300] [--backend onnx]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
from bench_speed import subset
from devset import add_data_option, dev_set

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("ray_two_nodes", ROOT / "scripts/ray_two_nodes.py")
assert spec is not None
assert spec.loader is not None
two_nodes = importlib.util.module_from_spec(spec)
sys.modules["ray_two_nodes"] = two_nodes
spec.loader.exec_module(two_nodes)


def localize(args: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "gapcam", "localize", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"gapcam localize {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return seconds, done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_option(parser)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--backend", default="onnx")
    options = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    images = subset(dev_set(options.data), options.images, tmp / "images")
    common = [str(tmp / "images"), "--backend", options.backend, "--batch-size", "8", "-q"]

    local_time, _ = localize(
        [*common, "--no-overlay", "--json", str(tmp / "local.json"), "--out", str(tmp / "o")]
    )
    local = json.loads((tmp / "local.json").read_text())["results"]
    print(f"local engine, 2 cores:             {local_time:6.1f} s  ({len(local)} images)")

    cluster = two_nodes.start_cluster()
    try:
        address = ["--ray-address", cluster.address, "--engine", "ray"]
        cluster_time, summary = localize(
            [*common, *address, "--no-overlay", "--out", str(tmp / "ray")], env=cluster.env
        )
        rows = pq.read_table(tmp / "ray" / "parquet").to_pylist()
        same = sum(
            row["classes"] == [p["index"] for p in result["predictions"]]
            and row["boxes"] == [[b["xyxy"] for b in m["boxes"]] for m in result["maps"]]
            for row, result in zip(rows, local, strict=True)
        )
        print(
            f"Ray, two nodes x 1 CPU (ray://):   {cluster_time:6.1f} s  "
            f"({cluster_time / local_time:.2f}x the local time; {same} of {len(rows)} rows "
            "equal to the local engine's)"
        )
        print(*summary.strip().splitlines()[1:], sep="\n")

        run = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gapcam",
                "localize",
                *common,
                *address,
                "--out",
                str(tmp / "killed"),
            ],
            env=cluster.env,
            stderr=subprocess.PIPE,
            text=True,
        )
        started = time.monotonic()
        while len(list(tmp.glob(".killed.*/overlays/*"))) < len(images) // 3:
            if run.poll() is not None:
                raise SystemExit(f"the run ended before a third was done: {run.stderr}")
            time.sleep(0.1)
        killed_at = time.monotonic() - started
        cluster.kill("worker")
        _, stderr = run.communicate(timeout=3600)
        killed_time = time.monotonic() - started
        rows = pq.read_table(tmp / "killed" / "parquet").to_pylist()
        print(
            f"worker node killed at {killed_at:.1f} s: {killed_time:6.1f} s in all, "
            f"{len(rows)} rows of {len(images)}, {sum(r['error'] is None for r in rows)} without "
            "an error"
        )
        print(*stderr.strip().splitlines()[1:], sep="\n")
    finally:
        two_nodes.stop(cluster)


if __name__ == "__main__":
    main()

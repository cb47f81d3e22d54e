"""`gapcam localize --engine ray --ray-address ray://HEAD:PORT` on a real two-node Ray cluster
started here (`ray start --head`, `ray start --address`, one CPU each, their own temp folders,
token authentication, loopback addresses), as README's cluster section tells a user to: rows
equal the local engine's, both nodes work, a killed worker node costs no rows, and a cluster
that goes away fails in one line and leaves nothing behind.

The cluster comes from scripts/ray_two_nodes.py (token authentication, loopback addresses,
processes stopped by PID).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import EXAMPLES
from PIL import Image

pytest.importorskip("ray")
pq = pytest.importorskip("pyarrow.parquet")
pytest.importorskip("grpc", reason="ray:// needs ray[client] (part of gapcam[ray])")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ray_two_nodes.py"
spec = importlib.util.spec_from_file_location("ray_two_nodes", SCRIPT)
assert spec is not None
assert spec.loader is not None
two_nodes = importlib.util.module_from_spec(spec)
sys.modules["ray_two_nodes"] = two_nodes  # dataclasses look their module up
spec.loader.exec_module(two_nodes)
Cluster, start_cluster, stop = two_nodes.Cluster, two_nodes.start_cluster, two_nodes.stop


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    started = start_cluster()
    yield started
    stop(started)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 small different photos: crops of the two examples."""
    folder = tmp_path_factory.mktemp("photos")
    for n, name in enumerate(["cat.png", "coffee.jpg"] * 24):
        with Image.open(EXAMPLES / name) as image:
            width, height = image.size
            box = (n, n // 2, width - 2 * n, height - n)
            image.convert("RGB").crop(box).save(folder / f"{n:02d}-{Path(name).stem}.png")
    return folder


@pytest.fixture(scope="module")
def many_photos(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 48 photos 10 times over (hard links), for the tests that stop a run midway: with 48
    the run could end between the fourth overlay and the interruption."""
    folder = tmp_path_factory.mktemp("many")
    for round_ in range(10):
        for photo in sorted(photos.iterdir()):
            os.link(photo, folder / f"{round_}-{photo.name}")
    return folder


def gapcam(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "gapcam", "localize", *args]
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=500)


COMMON = ["--backend", "eager", "--top-k", "2", "--no-overlay", "-q"]


@pytest.fixture(scope="module")
def local_results(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:  # type: ignore[type-arg]
    report = tmp_path_factory.mktemp("local") / "local.json"
    done = gapcam(str(photos), *COMMON, "--json", str(report), "--out", str(report.parent / "o"))
    assert done.returncode == 0, done.stderr
    results: list[dict] = json.loads(report.read_text())["results"]  # type: ignore[type-arg]
    return results


def assert_rows_equal_local(rows: list[dict], local: list[dict]) -> None:  # type: ignore[type-arg]
    assert [r["path"] for r in rows] == [r["input"] for r in local]
    for row, result in zip(rows, local, strict=True):
        assert row["error"] is None
        assert row["classes"] == [p["index"] for p in result["predictions"]]
        assert row["scores"] == pytest.approx(
            [p["probability"] for p in result["predictions"]], abs=1e-4
        )
        assert row["boxes"] == [[b["xyxy"] for b in m["boxes"]] for m in result["maps"]]


@pytest.mark.parametrize("where", ["ray://", "HEAD:PORT"])
def test_the_documented_command_runs_on_both_nodes_and_equals_the_local_engine(
    where: str,
    cluster: Cluster,
    photos: Path,
    local_results: list[dict],  # type: ignore[type-arg]
    tmp_path: Path,
) -> None:
    """From outside the cluster (ray://, the driver runs on the head) and from a node of it
    (the GCS address, the driver is the command), with paths typed relative to the folder the
    command runs in: the cluster's processes run in folders of Ray's."""
    address = cluster.address if where == "ray://" else f"127.0.0.1:{cluster.gcs_port}"
    out = tmp_path / "out"
    here = photos.parent
    relative = [photos.name, "--out", os.path.relpath(out, here)]
    args = [*relative, "--ray-address", address, *COMMON]
    started = time.monotonic()
    done = gapcam("--engine", "ray", *args, "--batch-size", "2", env=cluster.env, cwd=here)
    seconds = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    rows = pq.read_table(out / "parquet").to_pylist()
    assert_rows_equal_local(rows, local_results)
    nodes = {row["node"] for row in rows}
    assert len(nodes) == 2  # one actor per node: both did some
    lines = done.stderr.strip().splitlines()
    if where == "ray://":  # -q: the summary only (a driver here also gets Ray's core logs)
        assert lines[0].startswith("gapcam: ")
    summary = lines.index(f"gapcam: 48 of 48 inputs done, 0 failed; Parquet in {out / 'parquet'}")
    per_node = {row["node"][:8]: 0 for row in rows}
    for row in rows:
        per_node[row["node"][:8]] += 1
    said = [
        re.fullmatch(r"  node ([0-9a-f]{8}) \(\S+\): (\d+) rows", x) for x in lines[summary + 1 :]
    ]
    assert {m[1]: int(m[2]) for m in said if m} == per_node
    assert len(said) == 2
    counts = sorted(per_node.values())
    print(f"two-node cluster, {where}: {seconds:.1f} s for 48 images, rows per node {counts}")


def test_ctrl_c_stops_the_driver_task_on_the_cluster_too(
    cluster: Cluster, many_photos: Path, tmp_path: Path
) -> None:
    """Ctrl-C on the machine that typed the command cancels the job on the head node: exit 130,
    no OUT, no staging folder, and no actor left working on the cluster."""
    out = tmp_path / "out"
    args = [str(many_photos), "--out", str(out), "--ray-address", cluster.address]
    command = [sys.executable, "-m", "gapcam", "localize", "--engine", "ray", *args]
    command += ["--backend", "eager", "--batch-size", "1"]
    run = subprocess.Popen(
        command,
        env=cluster.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Ctrl-C as in a terminal: a test run started in the background (`cmd &` in a script)
        # hands its children SIGINT ignored, and Python then installs no handler for it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    _wait_for_overlays(tmp_path, 4, run)
    run.send_signal(signal.SIGINT)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "gapcam: interrupted"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and _actors(cluster):
        time.sleep(0.5)
    assert not _actors(cluster)
    assert list(tmp_path.iterdir()) == []


def _actors(cluster: Cluster) -> list[int]:
    """The cluster's Ray Data actor processes (their title names the map)."""
    found = []
    for pid in cluster.processes():
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:  # it ended meanwhile
            continue
        if b"MapWorker" in title:
            found.append(pid)
    return found


def test_a_worker_node_killed_mid_run_costs_no_rows(
    photos: Path,
    local_results: list[dict],
    tmp_path: Path,  # type: ignore[type-arg]
) -> None:
    cluster = start_cluster()  # its own: this test kills a node
    try:
        out = tmp_path / "out"
        args = [str(photos), "--out", str(out), "--ray-address", cluster.address]
        args += ["--backend", "eager", "--top-k", "2", "--batch-size", "1"]  # overlays: progress
        command = [sys.executable, "-m", "gapcam", "localize", "--engine", "ray", *args]
        run = subprocess.Popen(
            command, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        _wait_for_overlays(tmp_path, 8, run)
        worker = cluster.processes("worker")
        assert worker
        cluster.kill("worker")  # the raylet and everything it started, mid-run
        _stdout, stderr = run.communicate(timeout=400)
        assert run.returncode == 0, stderr
        rows = pq.read_table(out / "parquet").to_pylist()
        assert_rows_equal_local(rows, local_results)
        assert all(Path(row["overlay"]).is_file() for row in rows)
        lines = stderr.strip().splitlines()
        print("after killing the worker node:", *lines, sep="\n")
        assert lines[0].startswith("gapcam: 48 of 48 inputs done, 0 failed")
    finally:
        stop(cluster)


def _wait_for_overlays(folder: Path, count: int, run: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        made = list(folder.glob(".out.*/overlays/*.png"))
        if len(made) >= count:
            return
        if run.poll() is not None:
            raise AssertionError(f"the run ended first: {run.stderr.read() if run.stderr else ''}")
        time.sleep(0.2)
    run.kill()
    raise AssertionError("no overlays appeared")


def test_a_cluster_that_goes_away_fails_in_one_line_and_leaves_nothing(
    many_photos: Path, tmp_path: Path
) -> None:
    cluster = start_cluster()
    try:
        out = tmp_path / "out"
        args = [str(many_photos), "--out", str(out), "--ray-address", cluster.address, "-q"]
        command = [sys.executable, "-m", "gapcam", "localize", "--engine", "ray", *args]
        command += ["--backend", "eager", "--batch-size", "1"]
        run = subprocess.Popen(
            command, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        _wait_for_overlays(tmp_path, 4, run)
        cluster.kill()
        _, stderr = run.communicate(timeout=300)
    finally:
        stop(cluster)
    assert run.returncode == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"gapcam: error: the Ray cluster at {cluster.address} failed ")
    assert lines[0].endswith(f"nothing was written to {out}")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no OUT, no staging folder

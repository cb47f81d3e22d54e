"""A two-node Ray cluster on this machine, for trying `gapcam localize --engine ray` as on a real
one (and for tests/test_ray_cluster.py and benchmarks/bench_ray_cluster.py):

    python scripts/ray_two_nodes.py        # prints what to export, stops both nodes on Ctrl-C

Two `ray start` nodes (a head with a Ray Client server, and a worker), one CPU each, their own
temp folders under /tmp, token authentication with a fresh token of their own (never
~/.ray/auth_token), ``--node-ip-address 127.0.0.1``. Ray turns that address into this machine's
own (it wants one other nodes can reach); traffic to it stays on this machine. ``stop`` kills
the nodes' processes by PID (never ``ray stop``, which stops every Ray on the machine).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

RAY = Path(sys.executable).with_name("ray")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Cluster:
    """Two `ray start` nodes; ``env`` is what a user's shell holds to reach them."""

    root: Path
    client_port: int
    env: dict[str, str]
    gcs_port: int = 0

    @property
    def address(self) -> str:
        return f"ray://127.0.0.1:{self.client_port}"

    def processes(self, node: str | None = None) -> list[int]:
        """PIDs of the cluster (or of one node, ``head``/``worker``), with their children."""
        folders = [self.root / n for n in ((node,) if node else ("head", "worker"))]
        marks = [str(folder) + "/" for folder in folders]
        if node in (None, "head"):
            marks.append(f"--port={self.client_port} ")  # the client server's proxy
        table = _process_table()
        roots = {pid for pid, (_, args) in table.items() if any(m in args for m in marks)}
        return sorted(_with_descendants(roots, table))

    def kill(self, node: str | None = None) -> None:
        for pid in self.processes(node):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _process_table() -> dict[int, tuple[int, str]]:
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        table[int(entry.name)] = (ppid, args)
    return table


def _with_descendants(roots: set[int], table: dict[int, tuple[int, str]]) -> set[int]:
    found = set(roots)
    while True:
        more = {pid for pid, (ppid, _) in table.items() if ppid in found} - found
        if not more:
            return found
        found |= more


def start_cluster() -> Cluster:
    root = Path(tempfile.mkdtemp(prefix="gapcam-ray-", dir="/tmp"))  # short: socket paths
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),  # this cluster's own, not ~/.ray/auth_token
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_CLIENT_RECONNECT_GRACE_PERIOD": "5",
    }
    gcs, client = free_port(), free_port()
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats"]
    head = [str(RAY), "start", "--head", "--port", str(gcs), "--ray-client-server-port"]
    head += [str(client), "--include-dashboard", "false", "--temp-dir", str(root / "head")]
    worker = [str(RAY), "start", "--address", f"127.0.0.1:{gcs}", "--temp-dir"]
    worker += [str(root / "worker")]
    cluster = Cluster(root, client, env, gcs)
    try:
        for command in (head + common, worker + common):
            subprocess.run(command, env=env, check=True, capture_output=True, timeout=120)
        _wait_for_nodes(cluster, 2)
    except BaseException:
        stop(cluster)
        raise
    return cluster


def _wait_for_nodes(cluster: Cluster, count: int) -> None:
    script = (
        "import ray, sys; ray.init(sys.argv[1], logging_level='ERROR'); "
        "print(sum(n['Alive'] for n in ray.nodes()))"
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        done = subprocess.run(
            [sys.executable, "-c", script, cluster.address],
            env=cluster.env,
            capture_output=True,
            text=True,
            timeout=90,
        )
        if done.returncode == 0 and done.stdout.strip().endswith(str(count)):
            return
        time.sleep(1)
    raise RuntimeError(f"the cluster did not show {count} nodes: {done.stderr[-2000:]}")


def stop(cluster: Cluster) -> None:
    for _ in range(3):
        cluster.kill()
        time.sleep(0.5)
    if cluster.processes():
        raise RuntimeError(f"a Ray process of {cluster.root} outlived stop()")
    shutil.rmtree(cluster.root, ignore_errors=True)


def main() -> None:
    cluster = start_cluster()
    print(f"export RAY_AUTH_MODE=token RAY_AUTH_TOKEN={cluster.env['RAY_AUTH_TOKEN']}")
    print(f"# from outside the cluster: --ray-address {cluster.address}")
    print(f"# as on a node of it:       --ray-address 127.0.0.1:{cluster.gcs_port}")
    print("# Ctrl-C stops both nodes", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not stop the stop
        stop(cluster)
        print("both nodes stopped")


if __name__ == "__main__":
    main()

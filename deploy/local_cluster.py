"""A Ray cluster of several nodes on this machine: multi-node tests and benchmarks without a real cluster.

    with LoopbackCluster() as cluster:
        cluster.add_node(num_cpus=2)                                  # the head (GCS, Serve controller)
        gpu = cluster.add_node(num_cpus=2, num_gpus=2, resources={"reward_node": 1})
        ray.init(address=cluster.address)
        ...
        cluster.kill_node(gpu)                                        # the machine is lost

Each node is a `ray start --block` process in its own process group and temp dir, with free ports of its own and
its own loopback address (127.0.0.2, 127.0.0.3, ...; Ray puts the head on the machine's address, as `ray start
--head` does anywhere). Logical GPUs and custom resources are declared per node, so Ray places replicas and Train
workers as it would on a real cluster even where the devices are not: a replica given 0.5 GPU gets a
CUDA_VISIBLE_DEVICES but no CUDA on a CPU-only machine (services/serving.py says what happens then).

`kill_node` SIGKILLs the node's raylet and everything it started, which is what a lost machine looks like to the
GCS. Teardown kills, by process id, every process whose command line carries one of the cluster's temp dirs (Ray
writes the session dir into each of its processes' arguments), so nothing outlives a failed test.

Token authentication (on by default for `ray start` since Ray 2.5x) is off: the nodes and the driver are processes
of one user on one machine.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

# What every node and the driver that joins them run with.
CLUSTER_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LoopbackNode:
    """One node: its `ray start --block` process, the resources it declares and where its files are."""

    name: str
    ip: str
    temp_dir: Path
    process: subprocess.Popen
    num_cpus: float
    num_gpus: int
    resources: dict[str, float] = field(default_factory=dict)
    node_id: str | None = None

    def pids(self) -> list[int]:
        """Every live process of this node: those with its temp dir in their arguments (raylet, agents) and their
        descendants (workers, replicas and proxies, whose arguments Ray rewrites into titles like ray::ProxyActor)."""
        pids = set(_pids_with(str(self.temp_dir)))
        if self.process.poll() is None:
            pids.add(self.process.pid)
        for pid in list(pids):
            try:
                pids.update(child.pid for child in psutil.Process(pid).children(recursive=True))
            except psutil.NoSuchProcess:
                continue
        return sorted(pids)

    def raylet_pid(self) -> int | None:
        for pid in _pids_with(str(self.temp_dir)):
            try:
                if Path(psutil.Process(pid).exe()).name == "raylet":
                    return pid
            except psutil.Error:
                continue
        return None


def _pids_with(marker: str) -> list[int]:
    pids = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if proc.info["pid"] != os.getpid() and any(marker in arg for arg in cmdline):
            pids.append(proc.info["pid"])
    return pids


class LoopbackCluster:
    """Starts and stops the nodes of a Ray cluster on this machine (see the module docstring)."""

    def __init__(self, object_store_mb: int = 150, start_timeout_s: float = 120.0):
        # Short: Ray's Unix socket paths live under it and must stay within 107 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="rf-", dir="/tmp"))
        self.object_store_mb = object_store_mb
        self.start_timeout_s = start_timeout_s
        self.nodes: list[LoopbackNode] = []
        self.gcs_port: int | None = None
        self._next_ip = 2

    @property
    def address(self) -> str:
        if self.gcs_port is None:
            raise RuntimeError("the cluster has no head node yet (add_node first)")
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def env(self) -> dict[str, str]:
        """The environment for a process that joins the cluster (`ray.init(address=cluster.address)`)."""
        return {**os.environ, **CLUSTER_ENV, "RAY_ADDRESS": self.address}

    def add_node(
        self, *, num_cpus: float, num_gpus: int = 0, resources: dict[str, float] | None = None
    ) -> LoopbackNode:
        """Starts a node (the first is the head) and returns once the cluster counts it alive."""
        import json

        head = not self.nodes
        index = len(self.nodes)
        temp_dir = self.root / f"n{index}"
        temp_dir.mkdir()
        ip = f"127.0.0.{self._next_ip}"
        self._next_ip += 1
        ray_bin = str(Path(sys.executable).with_name("ray"))
        args = [
            ray_bin,
            "start",
            "--block",
            "--disable-usage-stats",
            f"--num-cpus={num_cpus}",
            f"--num-gpus={num_gpus}",
            f"--resources={json.dumps(resources or {})}",
            f"--temp-dir={temp_dir}",
            f"--object-store-memory={self.object_store_mb * 1024 * 1024}",
            # Every node on one machine: each needs ports of its own where Ray's defaults are fixed numbers.
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--metrics-export-port={_free_port()}",
        ]
        if head:
            self.gcs_port = _free_port()
            args += [
                "--head",
                f"--port={self.gcs_port}",
                "--include-dashboard=false",
                f"--ray-client-server-port={_free_port()}",
            ]
        else:
            args += [f"--address={self.address}", f"--node-ip-address={ip}"]
        log = open(temp_dir / "ray_start.log", "wb")  # noqa: SIM115 (the node's process owns it)
        process = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **CLUSTER_ENV}, start_new_session=True
        )
        node = LoopbackNode(
            name="head" if head else f"worker{index}",
            ip=ip,
            temp_dir=temp_dir,
            process=process,
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            resources=dict(resources or {}),
        )
        self.nodes.append(node)
        node.node_id = self._wait_alive(node)
        return node

    def _wait_alive(self, node: LoopbackNode) -> str:
        """The node's Ray node id, once `ray start` reports the node started (registered with the GCS)."""
        deadline = time.monotonic() + self.start_timeout_s
        start_log = node.temp_dir / "ray_start.log"
        while time.monotonic() < deadline:
            if node.process.poll() is not None:
                log = start_log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"ray start for {node.name} exited with {node.process.returncode}:\n{log}")
            text = re.sub(r"\x1b\[[0-9;]*m", "", start_log.read_text(errors="replace"))  # no colour codes
            if "Ray runtime started" in text:
                node.ip = re.search(r"Local node IP: (\S+)", text).group(1)
                for raylet_log in node.temp_dir.glob("session_*/logs/raylet.out"):
                    for line in raylet_log.read_text(errors="replace").splitlines():
                        if "Setting node ID node_id=" in line:
                            return line.rsplit("node_id=", 1)[1].split()[0]
            time.sleep(0.25)
        raise TimeoutError(f"node {node.name} did not start within {self.start_timeout_s}s (see {node.temp_dir})")

    def kill_node(self, node: LoopbackNode) -> float:
        """SIGKILLs the node's raylet first (the loss the GCS notices), then the rest of its processes. Returns the
        time of the kill (time.monotonic())."""
        raylet = node.raylet_pid()
        killed_at = time.monotonic()
        if raylet is not None:
            _kill([raylet])
        _kill(node.pids())
        node.process.wait(timeout=30)
        return killed_at

    def shutdown(self) -> None:
        """Kills every node's processes (head last, so workers do not linger reconnecting) and removes the dirs."""
        for node in reversed(self.nodes):
            try:
                os.killpg(node.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        # What left the process groups (Ray's workers start their own sessions) is found by its arguments.
        for _ in range(3):
            pids = _pids_with(str(self.root))
            if not pids:
                break
            _kill(pids)
            time.sleep(0.2)
        for node in self.nodes:
            try:
                node.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LoopbackCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

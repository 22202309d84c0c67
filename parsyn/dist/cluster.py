"""Ray, where parsyn's workers outgrow one machine: importing it, connecting to a cluster, and a throwaway
local cluster (`address="local"`) of real node processes.

Ray is optional (`pip install parsyn[dist]`); nothing here imports it before it is asked for, so
`import parsyn` never does. A local cluster binds a loopback address other than 127.0.0.1: Ray replaces
127.0.0.1 by the machine's network address, while 127.0.0.2 (still loopback) is kept as given, so no
Ray traffic of a local cluster leaves this machine's loopback interface.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = "127.0.0.2"
QUIET = {"RAY_USAGE_STATS_ENABLED": "0"}  # no usage reports, ever


def require():
    """The `ray` module; ValueError saying how to install it when it is missing."""
    try:
        import ray
    except ImportError:
        raise ValueError("Ray is not installed: pip install 'parsyn[dist]' (ray==2.60.0)") from None
    return ray


def check_address(address: str) -> str:
    """`address` when it names a cluster parsyn can use: "local", "auto" or HOST:PORT; else ValueError."""
    if not isinstance(address, str) or not address.strip():
        raise ValueError(f"a Ray address is 'local', 'auto' or HOST:PORT, got {address!r}")
    if address in ("local", "auto"):
        return address
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"a Ray address is 'local', 'auto' or HOST:PORT, got {address!r}")
    return address


def connect(address: str, timeout_s: float = 30.0) -> bool:
    """Connect this process to the running Ray cluster at `address` (HOST:PORT, or "auto": $RAY_ADDRESS or
    the cluster this machine started last). Returns True when this call connected (the caller disconnects
    with `ray.shutdown()`), False when the process already was. ValueError when nothing answers."""
    ray = require()
    if ray.is_initialized():
        joined = ray.get_runtime_context().gcs_address
        if address != "auto" and not _same(joined, address):
            raise ValueError(f"this process is already connected to the Ray cluster at {joined}, not {address}")
        return False
    for key, value in QUIET.items():
        os.environ.setdefault(key, value)
    options = {}
    if address != "auto":
        host, port = address.rsplit(":", 1)
        _reachable(host, int(port), timeout_s, address)
        if host.startswith("127."):  # the driver's node is the one on this loopback address, not the network one
            options["_node_ip_address"] = host
    try:
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False, **options)
    except (ConnectionError, RuntimeError) as error:
        raise ValueError(f"cannot join the Ray cluster at {address}: {error}") from None
    return True


def _same(joined: str, address: str) -> bool:
    """Whether `address` names the cluster at `joined` (Ray writes this machine's loopback as its network address)."""
    host, _, port = address.rpartition(":")
    local = host == "localhost" or host.startswith("127.")
    return joined == address or (local and joined.rpartition(":")[2] == port)


def _reachable(host: str, port: int, timeout_s: float, address: str) -> None:
    """Wait up to `timeout_s` for a TCP listener at host:port (ray.init itself would retry forever)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host, port), timeout=1.0).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise ValueError(f"no Ray cluster answers at {address}") from None
            time.sleep(0.2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


@dataclass(eq=False)
class LocalCluster:
    """A throwaway Ray cluster on this machine: a head node and `nodes - 1` more, each a `ray start --block`
    process with `cpus` CPUs (so an actor of one CPU per node: `nodes` worker processes), on a loopback
    address, without dashboard or usage stats. `close()` (or leaving a `with` block) ends every process
    it started; nothing else on the machine is touched."""

    address: str
    folder: Path
    processes: list[subprocess.Popen] = field(default_factory=list)

    @classmethod
    def start(cls, nodes: int = 2, *, cpus: int = 1, object_store_mib: int = 256, timeout_s: float = 120.0
              ) -> LocalCluster:
        """Start the head, then the other nodes; returns once all `nodes` are alive (ValueError otherwise,
        after ending what was started). The calling process stays connected to it."""
        if nodes < 1 or cpus < 1 or object_store_mib < 80:
            raise ValueError(f"a local cluster needs nodes >= 1, cpus >= 1 and >= 80 MiB of object store, got "
                             f"nodes={nodes}, cpus={cpus}, object_store_mib={object_store_mib}")
        if require().is_initialized():
            raise ValueError("this process is already connected to a Ray cluster; a local one needs it disconnected")
        port = _free_port()
        cluster = cls(f"{LOOPBACK}:{port}", Path(tempfile.mkdtemp(prefix="parsyn-ray-")))
        try:
            cluster._node(["--head", "--port", str(port), "--include-dashboard=false",
                           "--temp-dir", str(cluster.folder)], cpus, object_store_mib)
            connect(cluster.address, timeout_s)
            for _ in range(nodes - 1):
                cluster._node(["--address", cluster.address], cpus, object_store_mib)
            cluster._wait_for(nodes, timeout_s)
        except BaseException:
            cluster.close()
            raise
        return cluster

    def _node(self, role: list[str], cpus: int, object_store_mib: int) -> None:
        ports = ["--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
                 "--runtime-env-agent-port"]  # fixed defaults would collide between two nodes of one machine
        args = [os.path.join(os.path.dirname(sys.executable), "ray"), "start", *role, "--block",
                "--node-ip-address", LOOPBACK, "--num-cpus", str(cpus), "--num-gpus", "0",
                "--object-store-memory", str(object_store_mib * 2**20), "--disable-usage-stats",
                *[x for flag in ports for x in (flag, str(_free_port()))]]
        log = (self.folder / f"node{len(self.processes)}.log").open("wb")
        self.processes.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                               env={**os.environ, **QUIET}, start_new_session=True))
        log.close()

    def _wait_for(self, nodes: int, timeout_s: float) -> None:
        ray = require()
        deadline = time.monotonic() + timeout_s
        while sum(n["Alive"] for n in ray.nodes()) < nodes:
            dead = [p for p in self.processes if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise ValueError(f"the local Ray cluster did not start {nodes} nodes within {timeout_s:.0f} s; "
                                 f"logs in {self.folder}")
            time.sleep(0.2)

    @property
    def pids(self) -> list[int]:
        """Process ids of the `ray start` processes (each leads the process group of its node)."""
        return [p.pid for p in self.processes]

    def close(self) -> None:
        """Disconnect this process if it is connected, then end the nodes: SIGTERM (Ray stops a node's
        processes), SIGKILL to the node's process group after 30 s. The log folder is removed."""
        ray = require()
        if ray.is_initialized():
            ray.shutdown()
        for p in reversed(self.processes):
            if p.poll() is None:
                p.terminate()
        for p in reversed(self.processes):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)  # the group this cluster created for the node
                p.wait(10)
        self.processes.clear()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

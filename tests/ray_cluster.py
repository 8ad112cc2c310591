"""A real multi-node Ray cluster on this machine, for tests: ``ray start --head`` and
worker nodes that join it, each a separate raylet with its own temporary directory.

Why this shape:
- Each node is one ``ray start --block`` in its own process session, so stopping the
  session's process group stops the node. Ray gives each worker process a process group
  of its own, so ``stop()`` then ends every process that still names the cluster's
  directory on its command line: nothing outlives the cluster.
- Ray replaces ``--node-ip-address=127.0.0.1`` with the machine's own interface address;
  127.0.0.2 is loopback as well and is kept, so the nodes talk over loopback. The Ray
  client server listens on 127.0.0.1 too. Some of Ray's own ports (the GCS, the raylets,
  metrics) listen on every interface whatever the settings.
- Token authentication (``RAY_AUTH_MODE=token``) needs the same token on every node and
  in every client: it is in ``env``, which each process this cluster serves must get.
- The head advertises no CPUs and Geneva's ``geneva_ray_head`` resource, as Geneva's own
  KubeRay head does: Geneva's job drivers run there, everything else on the workers. It
  runs Ray's dashboard (on 127.0.0.1), whose state API Geneva asks which appliers live.
- ``zip_only=True`` runs the nodes on ``zip_only_python``: this environment's third-party
  packages without the project, which is installed here in editable mode. A KubeRay
  cluster built from the manifest has only what the manifest installs and the zip it
  ships; so do these nodes, so the zip is the only way their workers get the project.
  Every node starts in the cluster's directory, never the repository, since ``python -m``
  puts the working directory on ``sys.path``.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import venv
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

NODE_IP = "127.0.0.2"
START_TIMEOUT_S = 120.0
STOP_GRACE_S = 3.0
"""How long the nodes get to stop on SIGTERM before they are killed."""
OBJECT_STORE_BYTES = 500_000_000
"""Ray's object store per node (the default is 30% of the machine's memory, per node)."""
PROJECT_DIR = Path(__file__).resolve().parents[1]
HIDDEN_ENV = ("PYTHONPATH", "VIRTUAL_ENV")
"""Not passed to zip-only nodes: either could lead their Python back to the project."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Node:
    """One raylet: its name, its temporary directory, its ``ray start`` process and the
    node id Ray gave it."""

    name: str
    temp_dir: Path
    process: subprocess.Popen[bytes]
    node_id: str = ""

    @property
    def logs(self) -> Path:
        return self.temp_dir / "session_latest" / "logs"

    def raylet_pid(self) -> int:
        """The raylet's pid, from the first line it logs (``[time I pid tid] (raylet)``)."""
        first = (self.logs / "raylet.out").read_text().splitlines()[0]
        match = re.match(r"\[\S+ \S+ \w (\d+) \d+\] \(raylet\)", first)
        assert match, first
        return int(match.group(1))

    def worker_logs_with(self, text: str) -> set[Path]:
        """The logs of this node's worker processes that contain ``text``."""
        return {p for p in self.logs.glob("worker-*.err") if text in p.read_text(errors="replace")}


def zip_only_python(root: Path, project: Path = PROJECT_DIR) -> Path:
    """Create in ``root`` a Python that imports this environment's third-party packages
    but not ``project``, and return its ``python``.

    It is a virtual environment on the same base interpreter whose site-packages holds a
    path file naming this environment's site-packages. Python applies the ``.pth`` files
    of its own site directories only: a directory that a path file adds is put on
    ``sys.path`` as it is, so the editable install's path file there, which adds
    ``project``, is never read. The environment's other path files are copied (after
    the one that makes what they import importable)."""
    venv.create(root, with_pip=False, symlinks=True, clear=True)
    dirs = {"base": str(root), "platbase": str(root)}
    site = Path(sysconfig.get_path("purelib", "venv", vars=dirs))
    ours = [Path(sysconfig.get_path(key)) for key in ("purelib", "platlib")]
    (site / "00-third-party.pth").write_text("".join(f"{d}\n" for d in dict.fromkeys(ours)))
    for directory in dict.fromkeys(ours):
        for pth in directory.glob("*.pth"):
            lines = pth.read_text().splitlines()
            if not any(Path(line.strip()) == project for line in lines if line.strip()):
                (site / pth.name).write_text(pth.read_text())
    return root / "bin" / "python"


class LoopbackCluster:
    """A Ray cluster on loopback: a head, then ``add_nodes`` for the worker nodes.

    ``env`` holds the token and the settings every node started with, for the clients of
    the cluster; ``extra_env`` is added to it (storage endpoints the UDF reads from, say).
    With ``zip_only`` the nodes run ``zip_only_python`` (``python``) with ``node_env``,
    which lacks ``HIDDEN_ENV``."""

    def __init__(
        self, root: Path, extra_env: Mapping[str, str] | None = None, *, zip_only: bool = False
    ) -> None:
        self.root = root
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(16),
            "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
            **(extra_env or {}),
        }
        self.zip_only = zip_only
        self.python = Path(sys.executable)
        """The Python the nodes run, and so their workers (``zip_only_python`` if
        ``zip_only``, created by ``start``)."""
        self.gcs_port = _free_port()
        self.client_port = _free_port()
        self.nodes: dict[str, Node] = {}

    @property
    def node_env(self) -> dict[str, str]:
        """The environment the nodes start with."""
        if not self.zip_only:
            return self.env
        return {key: value for key, value in self.env.items() if key not in HIDDEN_ENV}

    @property
    def address(self) -> str:
        """The address Geneva connects to, through the Ray client."""
        return f"ray://127.0.0.1:{self.client_port}"

    def start(self) -> Self:
        if self.zip_only:
            self.python = zip_only_python(self.root / "python")
        head = [f"--port={self.gcs_port}", f"--ray-client-server-port={self.client_port}"]
        head += ["--num-cpus=0", '--resources={"geneva_ray_head": 1}']
        head += [f"--dashboard-port={_free_port()}"]
        self._wait_registered(self._launch("head", ["--head", *head]))
        return self

    def add_nodes(self, *names: str, num_cpus: int, num_gpus: int) -> None:
        """Start worker nodes, together, each advertising ``num_gpus`` GPUs whatever it
        has; return once the head has registered them all."""
        args = [f"--address={NODE_IP}:{self.gcs_port}", f"--num-cpus={num_cpus}"]
        nodes = [self._launch(name, [*args, f"--num-gpus={num_gpus}"]) for name in names]
        for node in nodes:
            self._wait_registered(node)

    def worker_logs_with(self, text: str) -> dict[str, set[Path]]:
        """Per node, the logs of its worker processes that contain ``text``."""
        return {name: node.worker_logs_with(text) for name, node in self.nodes.items()}

    def kill_raylet(self, node: Node) -> None:
        """Lose a node the hard way: SIGKILL its raylet, then wait for the head to see
        the node dead."""
        os.kill(node.raylet_pid(), signal.SIGKILL)
        self._wait_for(f"death reason = UNEXPECTED_TERMINATION.* node_id={node.node_id}")

    def stop(self) -> None:
        """Stop every node, then kill any process left that names the cluster's directory
        or its GCS address; raise if one survives that."""
        for node in self.nodes.values():
            _signal_group(node.process, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for node in self.nodes.values():
            try:
                node.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(node.process, signal.SIGKILL)
                node.process.wait()
        for _ in range(50):
            left = self.processes()
            if not left:
                return
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        raise RuntimeError(f"Ray processes outlived the cluster: {self.processes()}")

    def processes(self) -> list[int]:
        """Live processes (not zombies) whose command line names the cluster's directory
        or its GCS address (the Ray client's servers name only that)."""
        names = (str(self.root).encode(), f"{NODE_IP}:{self.gcs_port}".encode())
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if any(name in cmdline for name in names) and alive(int(proc.name)):
                pids.append(int(proc.name))
        return pids

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _launch(self, name: str, args: list[str]) -> Node:
        temp_dir = self.root / name
        command = [str(self.python), "-m", "ray.scripts.scripts", "start", "--block"]
        command += [f"--node-ip-address={NODE_IP}", f"--temp-dir={temp_dir}"]
        command += [f"--object-store-memory={OBJECT_STORE_BYTES}", "--disable-usage-stats"]
        command += [f"--dashboard-agent-listen-port={_free_port()}", *args]
        with (self.root / f"{name}.log").open("wb") as log:
            process = subprocess.Popen(
                command,
                cwd=self.root,
                env=self.node_env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.nodes[name] = Node(name, temp_dir, process)
        return self.nodes[name]

    def _wait_registered(self, node: Node) -> None:
        """Read the node's id from its raylet's log, then wait for the head to register it."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (node.logs / "raylet.out").is_file() or not (
            match := re.search(
                r"Setting node ID node_id=(\w+)", (node.logs / "raylet.out").read_text()
            )
        ):
            self._check_alive(node, deadline)
            time.sleep(0.2)
        node.node_id = match.group(1)
        self._wait_for(f"Registering new node. node_id={node.node_id}", node=node)

    def _wait_for(self, pattern: str, *, node: Node | None = None) -> None:
        """Wait until the head's GCS logs a line matching ``pattern``."""
        log = self.root / "head" / "session_latest" / "logs" / "gcs_server.out"
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (log.is_file() and re.search(pattern, log.read_text(errors="replace"))):
            if node is not None:
                self._check_alive(node, deadline)
            elif time.monotonic() > deadline:
                raise TimeoutError(f"the head never logged {pattern!r}")
            time.sleep(0.2)

    def _check_alive(self, node: Node, deadline: float) -> None:
        if node.process.poll() is not None:
            log = (self.root / f"{node.name}.log").read_text(errors="replace")
            raise RuntimeError(f"ray start for {node.name} exited: {log[-2000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"node {node.name} did not start in {START_TIMEOUT_S:.0f} s")


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process: a zombie has exited, only not been reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)

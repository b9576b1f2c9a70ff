"""Start training the way a user does (``torchrun ... -m dmc.cli train``, one torchrun per node with a local
c10d rendezvous for several nodes), wait for it, and kill one of its ranks with SIGKILL."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def commands(config: Path, nodes: int, devices: int, extra: list[str]) -> list[list[str]]:
    """One command line per node: plain ``python -m dmc.cli train`` for one process, torchrun otherwise."""
    train = ["-m", "dmc.cli", "train", "--config", str(config), *extra]
    if nodes * devices == 1:
        return [[sys.executable, *train]]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc_per_node", str(devices)]
    if nodes == 1:
        return [[*torchrun, "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *train]]
    endpoint = f"127.0.0.1:{free_port()}"
    node = [*torchrun, "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", f"rehearsal-{os.getpid()}"]
    return [[*node, *train] for _ in range(nodes)]


@dataclass
class Run:
    procs: list[subprocess.Popen]
    logs: list[Path]

    def wait(self, timeout: float) -> list[int | None]:
        deadline = time.monotonic() + timeout
        codes = []
        for p in self.procs:
            try:
                codes.append(p.wait(max(1.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                self.stop()
                codes.append(None)
        return codes

    def running(self) -> bool:
        return any(p.poll() is None for p in self.procs)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        for p in self.procs:
            p.wait()

    def tail(self, lines: int = 40) -> str:
        out = []
        for log in self.logs:
            text = log.read_text(errors="replace").splitlines() if log.exists() else []
            out += text[-lines:]
        return "\n".join(out)

    def ranks(self) -> dict[int, int]:
        """Global rank -> pid of every training process (torchrun's workers, or the single process)."""
        import psutil

        found = {}
        for p in self.procs:
            if p.poll() is not None:
                continue
            tree = [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
            for proc in tree:
                try:
                    cmd, env = proc.cmdline(), proc.environ()
                except psutil.Error:
                    continue
                if "dmc.cli" in cmd and "torch.distributed.run" not in cmd:
                    found[int(env.get("RANK", 0))] = proc.pid
        return found

    def kill_rank(self, rank: int) -> bool:
        pid = self.ranks().get(rank)
        if pid is None:
            return False
        os.kill(pid, signal.SIGKILL)
        return True


def start(config: Path, nodes: int, devices: int, env: dict, log_dir: Path, name: str,
          extra: list[str] | None = None) -> Run:
    log_dir.mkdir(parents=True, exist_ok=True)
    procs, logs = [], []
    for i, cmd in enumerate(commands(config, nodes, devices, extra or [])):
        logs.append(log_dir / f"{name}-node{i}.log")
        procs.append(subprocess.Popen(cmd, stdout=open(logs[-1], "w"), stderr=subprocess.STDOUT, env=env,
                                      start_new_session=True))
    return Run(procs, logs)

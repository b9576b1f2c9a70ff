"""Start ``dmc serve`` as a separate process and wait until it answers (the serving benchmark, the tests)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def dmc_serve(*args, env: dict | None = None, ready_s: float = 600, log: Path | None = None):
    """``python -m dmc.cli serve ARGS --port P`` on 127.0.0.1 until it answers ``/health``; yields (base URL,
    process); stopped with SIGINT (uvicorn's graceful shutdown) on exit. ``ready_s`` bounds the wait for a
    model to load (a hung start fails instead of blocking forever). ``log``: the server's output goes there."""
    import httpx

    port = free_port()
    full_env = dict(os.environ, **(env or {}))
    out = open(log, "w") if log is not None else subprocess.PIPE
    proc = subprocess.Popen([sys.executable, "-m", "dmc.cli", "serve", *map(str, args), "--port", str(port)],
                            env=full_env, stdout=out, stderr=subprocess.STDOUT if log is not None else subprocess.PIPE,
                            text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_s
        while True:
            if proc.poll() is not None:
                said = Path(log).read_text() if log is not None else proc.stderr.read()
                raise RuntimeError(f"dmc serve exited with {proc.returncode}: {said.strip()}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"dmc serve did not answer /health within {ready_s:g} s")
            time.sleep(0.2)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if log is not None:
            out.close()

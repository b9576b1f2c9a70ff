"""Run untrusted generated code (HumanEval completions) in a separate, fenced-off process.

Always: a fresh process in its own session (killed as a group on timeout), a wall-clock timeout, rlimits
on CPU time, address space, file size, open files and processes, an empty temporary working directory
and a stripped environment. Strong isolation, required unless the caller allows weak: unprivileged
namespaces, through ``bwrap`` (bubblewrap) when it is installed, otherwise ``unshare``: a new network
namespace (no interfaces up: no network at all), a PID namespace (when its first process dies, every
process it forked dies with it) and a mount namespace in which every filesystem but the sandbox directory
is read-only (bwrap also hides $HOME behind an empty tmpfs). Without either, ``run_untrusted`` refuses
(``SandboxUnavailable``) unless ``allow_weak=True``: rlimits alone leave the network on and the home
folder readable. ``isolation()`` says what this machine gives; results record it.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

NOBODY = 65534
STRONG = ("bwrap", "namespaces")


class SandboxUnavailable(RuntimeError):
    """Strong isolation is not available and weak was not allowed; the message says how to get it."""

# Runs first inside the sandbox: makes every mount read-only but the sandbox (when in a mount namespace),
# sets the limits, then executes the program as __main__.
_RUNNER = r"""
import ctypes, os, resource, sys
box, limits, remount = sys.argv[1], [int(x) for x in sys.argv[2].split(",")], sys.argv[3] == "1"
if remount:
    libc = ctypes.CDLL(None, use_errno=True)
    MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC = 1, 32, 4096, 16384
    def mount(src, dst, flags):
        if libc.mount(src, dst.encode(), None, flags, None) != 0:
            raise OSError(ctypes.get_errno(), "mount " + dst)
    mount(b"/", "/", MS_BIND | MS_REC)
    # a user namespace must keep each mount's locked flags (nosuid, nodev, ...) when it remounts
    FLAGS = {"nosuid": 2, "nodev": 4, "noexec": 8, "noatime": 1024, "nodiratime": 2048, "relatime": 1 << 21}
    mounts = {}
    for line in open("/proc/self/mountinfo"):
        fields = line.split()
        mounts[fields[4]] = sum(FLAGS.get(o, 0) for o in fields[5].split(","))
    points = sorted(mounts, key=len)
    for p in points:
        if p.split("/")[1:2] in (["proc"], ["dev"]):
            continue  # /proc is this namespace's own; /dev/null must stay writable
        try:
            mount(None, p, MS_REMOUNT | MS_BIND | MS_RDONLY | mounts[p])
        except OSError:
            pass  # checked below
    mount(box.encode(), box, MS_BIND)
    mount(None, box, MS_REMOUNT | MS_BIND)  # the sandbox alone is writable
    for p in points:  # a mount we could not make read-only is a hole: refuse to run
        if not p.startswith(("/proc", "/dev", box)) and os.path.isdir(p):
            try:
                open(os.path.join(p, ".dmc-sandbox-probe"), "w").close()
            except OSError:
                continue
            os.remove(os.path.join(p, ".dmc-sandbox-probe"))
            sys.exit("sandbox: could not make %s read-only" % p)
os.chdir(box)
cpu, mem, fsize, nproc, nofile = limits
for res, val in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, mem), (resource.RLIMIT_FSIZE, fsize),
                 (resource.RLIMIT_NPROC, nproc), (resource.RLIMIT_NOFILE, nofile), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(res, (val, val))
sys.argv = ["program.py"]
sys.path.insert(0, box)
code = compile(open("program.py").read(), "program.py", "exec")
exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
"""


@dataclass
class Limits:
    timeout_s: float = 10.0  # wall clock
    cpu_s: int = 10
    memory_bytes: int = 2 * 2**30  # address space
    file_bytes: int = 16 * 2**20  # largest file it may write
    processes: int = 32
    open_files: int = 64


@dataclass
class Outcome:
    status: str  # "passed", "failed" (non-zero exit, exception, limit hit) or "timeout"
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    isolation: tuple[str, ...]


_UNSHARE = ["unshare", "--user", "--map-root-user", "--net", "--pid", "--fork", "--kill-child", "--mount",
            "--mount-proc"]


def _bwrap(box: str) -> list[str]:
    """bubblewrap: every namespace new, / read-only, the box writable, $HOME hidden, fresh /dev and /proc."""
    home = os.path.expanduser("~")
    hide = ["--tmpfs", home] if home not in ("/", "") and not box.startswith(home) else []
    return [shutil.which("bwrap") or "bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--ro-bind", "/", "/", *hide,
            "--dev", "/dev", "--proc", "/proc", "--bind", box, box, "--chdir", box, "--"]


def _works(cmd: list[str]) -> bool:
    try:
        return subprocess.run([*cmd, "true"], capture_output=True, timeout=10, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@functools.cache
def isolation() -> tuple[str, ...]:
    """What this machine gives beyond rlimits: ("bwrap",) or ("namespaces",) (unshare) with network, PID and
    read-only-mount isolation; else ("nobody",) when running as root (the program runs as user nobody), or ()."""
    if shutil.which("bwrap") and _works(_bwrap(tempfile.gettempdir())):
        return ("bwrap",)
    if shutil.which("unshare") and _works(_UNSHARE):
        return ("namespaces",)
    return ("nobody",) if os.geteuid() == 0 else ()


def require_strong(allow_weak: bool = False) -> None:
    """Refuse (``SandboxUnavailable``) when this machine cannot isolate programs and weak was not allowed."""
    if allow_weak or any(i in STRONG for i in isolation()):
        return
    raise SandboxUnavailable(
        "this machine gives no strong sandbox for generated code (no working bwrap, and unprivileged user "
        "namespaces are off, so unshare fails): install bubblewrap (apt install bubblewrap) or enable user "
        "namespaces (sysctl kernel.unprivileged_userns_clone=1), or pass --allow-weak-sandbox to run with "
        "rlimits only (network on, home folder readable)")


def _read(path: str, limit: int = 65536) -> str:
    with open(path, "rb") as f:
        return f.read(limit).decode("utf-8", "replace")


def run_untrusted(code: str, limits: Limits | None = None, allow_weak: bool = False) -> Outcome:
    """Run ``code`` as a Python program in the sandbox; never raises for anything the program does (only
    ``SandboxUnavailable``, before running it, when there is no strong isolation and weak is not allowed)."""
    limits = limits or Limits()
    require_strong(allow_weak)
    iso = isolation()
    box = tempfile.mkdtemp(prefix="dmc-sandbox-")
    logs = tempfile.mkdtemp(prefix="dmc-sandbox-logs-")  # outside the box: the program cannot rewrite them
    try:
        with open(os.path.join(box, "program.py"), "w") as f:
            f.write(code)
        numbers = ",".join(str(int(x)) for x in (limits.cpu_s, limits.memory_bytes, limits.file_bytes,
                                                  limits.processes, limits.open_files))
        ns = "namespaces" in iso  # unshare: the runner makes the mounts read-only itself; bwrap already has
        cmd = [sys.executable, "-I", "-c", _RUNNER, box, numbers, "1" if ns else "0"]
        kwargs = {}
        if "bwrap" in iso:
            cmd = [*_bwrap(box), *cmd]
        elif ns:
            cmd = [*_UNSHARE, *cmd]
        elif "nobody" in iso:
            os.chmod(box, 0o777)
            os.chmod(os.path.join(box, "program.py"), 0o644)
            kwargs = {"user": NOBODY, "group": NOBODY, "extra_groups": []}
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": box, "TMPDIR": box}
        start = time.monotonic()
        with open(os.path.join(logs, "out"), "wb") as out, open(os.path.join(logs, "err"), "wb") as err:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=box, env=env,
                                    start_new_session=True, **kwargs)
            try:
                rc = proc.wait(timeout=limits.timeout_s)
                status = "passed" if rc == 0 else "failed"
            except subprocess.TimeoutExpired:
                rc, status = None, "timeout"
            finally:
                _kill_group(proc)
                _reap(box)
        return Outcome(status, rc, _read(os.path.join(logs, "out")), _read(os.path.join(logs, "err")),
                       time.monotonic() - start, iso)
    finally:
        shutil.rmtree(logs, ignore_errors=True)
        _remove(box)


def run_many(codes: list[str], limits: Limits | None = None, allow_weak: bool = False,
             workers: int | None = None) -> list[Outcome]:
    """``run_untrusted`` for several programs, at most ``workers`` at a time (default: the CPUs, up to 8)."""
    require_strong(allow_weak)
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda code: run_untrusted(code, limits, allow_weak), codes))


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the session: the program and anything it forked
    except ProcessLookupError:
        pass
    proc.wait()


def processes_naming(mark: str) -> list[int]:
    """Processes whose command line contains ``mark`` (a sandbox program's command line names its box)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if mark.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            continue
    return found


def _reap(box: str, patience_s: float = 10.0) -> None:
    """Kill and wait out every process still running this sandbox's program (their command lines name the
    box): a process that left the session, or the tail of a PID namespace being torn down."""
    deadline = time.monotonic() + patience_s
    while True:
        alive = processes_naming(box)
        if not alive or time.monotonic() > deadline:
            return
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.05)


def _remove(box: str) -> None:
    # A program running as nobody may have left read-only dirs; make them writable before removing.
    for root, dirs, _ in os.walk(box):
        for d in dirs:
            try:
                os.chmod(os.path.join(root, d), 0o700)
            except OSError:
                pass
    shutil.rmtree(box, ignore_errors=True)

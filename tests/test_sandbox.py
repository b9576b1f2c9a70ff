"""The HumanEval sandbox: hostile programs neither hang the evaluation nor reach outside their box."""

import socket
import time

import pytest

from eval.sandbox import Limits, isolation, processes_naming, run_untrusted

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

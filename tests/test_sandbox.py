"""The sandbox stops runaway and hostile programs (needs root: namespaces and uid changes)."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from srpo_core.verifiers.sandbox import SandboxLimits, SandboxUnavailable, run_python

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="the isolated sandbox needs root (CAP_SYS_ADMIN, CAP_SETUID)"
)

FAST = SandboxLimits(cpu_s=2, wall_s=2, memory_mb=256)


def run(program: str, limits: SandboxLimits = FAST, stdin: str = ""):
    return run_python({"main.py": program}, ["main.py"], stdin, limits)


def processes_of(uid: int) -> list[str]:
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue
        uids = next((line.split()[1:] for line in text.splitlines() if line.startswith("Uid:")), [])
        if str(uid) in uids:
            found.append(status.parent.name)
    return found


@needs_root
def test_runs_a_program_with_stdin_as_an_unprivileged_user():
    result = run("import os\nprint(int(input()) * 2, os.getuid() != 0, os.getcwd())", stdin="21\n")
    assert result.ok, result.stderr
    doubled, unprivileged, cwd = result.stdout.split()
    assert doubled == "42" and unprivileged == "True" and cwd == "/tmp/work"


@needs_root
def test_infinite_loop_is_stopped():
    start = time.monotonic()
    result = run("while True:\n    pass")
    assert not result.ok
    assert result.timed_out or result.returncode != 0
    assert time.monotonic() - start < 6


@needs_root
def test_sleeping_program_is_killed_at_wall_time():
    start = time.monotonic()
    result = run("import time\ntime.sleep(60)", SandboxLimits(wall_s=1))
    assert result.timed_out and result.returncode is None
    assert time.monotonic() - start < 5


@needs_root
def test_fork_bomb_is_contained_and_cleaned_up():
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    start = time.monotonic()
    result = run(bomb)
    assert not result.ok
    assert time.monotonic() - start < 8
    time.sleep(0.2)
    assert processes_of(result.uid) == []


@needs_root
def test_escaped_background_process_dies_with_the_run():
    program = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    time.sleep(60)\n"
        "print('parent exits')\n"
    )
    result = run(program)
    assert result.ok and "parent exits" in result.stdout
    time.sleep(0.2)
    assert processes_of(result.uid) == []


@needs_root
def test_memory_hog_fails():
    result = run("x = bytearray(2 * 1024 ** 3)\nprint('allocated')")
    assert not result.ok and "allocated" not in result.stdout
    assert "MemoryError" in result.stderr
    growing = run("x = []\nwhile True:\n    x.append(bytearray(10 ** 7))")
    assert not growing.ok


@needs_root
def test_network_connection_fails():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    program = (
        "import socket\n"
        "try:\n"
        f"    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
        "    print('CONNECTED')\n"
        "except OSError as exc:\n"
        "    print('FAILED', exc)\n"
    )
    try:
        result = run(program)
        with pytest.raises(socket.timeout):
            server.accept()
    finally:
        server.close()
    assert "CONNECTED" not in result.stdout
    assert result.stdout.startswith("FAILED")


@needs_root
def test_writes_outside_the_working_directory_fail(tmp_path):
    target = tmp_path / "outside.txt"
    os.chmod(tmp_path, 0o777)  # even a world-writable directory of the host is out of reach
    shared_tmp = Path("/tmp") / f"srpo-sandbox-test-{os.getpid()}"
    program = (
        "import os\n"
        "open('inside.txt', 'w').write('ok')\n"
        f"for path in [{str(target)!r}, {str(shared_tmp)!r}, '/var/tmp/srpo-x', '/dev/shm/srpo-x']:\n"
        "    try:\n"
        "        open(path, 'w').write('pwned')\n"
        "        print('WROTE', path)\n"
        "    except OSError as exc:\n"
        "        print('DENIED', path, type(exc).__name__)\n"
    )
    result = run(program)
    assert result.ok, result.stderr
    assert "WROTE" not in result.stdout
    assert result.stdout.count("DENIED") == 4
    assert not target.exists() and not shared_tmp.exists()


@needs_root
def test_output_is_capped():
    result = run("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", SandboxLimits(output_mb=1, wall_s=5))
    assert not result.ok
    assert len(result.stdout) <= 1 << 20


@needs_root
def test_unavailable_setup_is_a_clear_error(monkeypatch):
    import srpo_core.verifiers.sandbox as sandbox

    monkeypatch.setattr(sandbox, "_python_location", lambda: ("/nonexistent-prefix", "bin/python3"))
    with pytest.raises(SandboxUnavailable, match="SETUP_FAILED"):
        run("print(1)")


def test_without_isolation_limits_still_apply():
    unsafe = SandboxLimits(cpu_s=2, wall_s=2, memory_mb=256, isolate=False)
    result = run("print(sum(range(10)))", unsafe)
    assert result.ok and result.stdout.strip() == "45" and result.uid is None
    hog = run("x = bytearray(2 * 1024 ** 3)", unsafe)
    assert not hog.ok and "MemoryError" in hog.stderr
    loop = run("while True:\n    pass", unsafe)
    assert not loop.ok

"""The sandbox stops runaway and hostile programs (needs root: namespaces, cgroups, uid changes;
bubblewrap installed: .ci/install-sandbox.sh)."""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import socket
import time
from pathlib import Path

import pytest

from srpo_core.benchmarks import get_benchmark
from srpo_core.benchmarks.registry import benchmark_dir
from srpo_core.verifiers._cgroup import CgroupUnavailable
from srpo_core.verifiers.sandbox import SandboxLimits, SandboxUnavailable, run_python

REPO = Path(__file__).resolve().parents[1]

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
    from srpo_core.verifiers import sandbox

    monkeypatch.setattr(sandbox, "_python_location", lambda: ("/nonexistent-prefix", "bin/python3"))
    with pytest.raises(SandboxUnavailable, match="bubblewrap could not build the sandbox.*/nonexistent-prefix"):
        run("print(1)")


@needs_root
def test_missing_bubblewrap_or_cgroups_are_clear_errors(monkeypatch, tmp_path):
    from srpo_core.verifiers import sandbox

    monkeypatch.setattr(sandbox, "_BWRAP_PATH", str(tmp_path))
    with pytest.raises(SandboxUnavailable, match="bubblewrap .bwrap. is not installed"):
        run("print(1)")
    monkeypatch.undo()

    def no_cgroups(*args, **kwargs):
        raise CgroupUnavailable("no cgroup with the memory and pids controllers (test)")

    monkeypatch.setattr(sandbox.RunCgroup, "create", no_cgroups)
    with pytest.raises(SandboxUnavailable, match="no cgroup with the memory and pids controllers.*code-scoring.yaml"):
        run("print(1)")


# A program that looks for the answers to its own input: it walks the whole file system it can
# see for data files holding its stdin, and opens the benchmark files and the repository by path.
ANSWER_SEARCH = """
import os, sys
wanted = sys.stdin.read().strip()
hits, opened = [], []
for root, dirs, files in os.walk("/"):
    if root == "/proc":
        dirs[:] = []
        continue
    for name in files:
        path = os.path.join(root, name)
        if "livecodebench" in name:
            hits.append(path)
        if not name.endswith((".jsonl", ".json", ".csv", ".txt", ".md")):
            continue
        try:
            if os.path.getsize(path) < 8 << 20 and wanted in open(path, errors="replace").read():
                hits.append(path)
        except OSError:
            pass
for path in sys.argv[1:]:
    try:
        os.listdir(path) if os.path.isdir(path) else open(path).read(1)
        opened.append(path)
    except OSError:
        pass
print("HITS", hits)
print("OPENED", opened)
"""


@needs_root
def test_a_program_cannot_find_its_test_data():
    data = benchmark_dir() / "livecodebench_medium.jsonl"
    item = next(i for i in get_benchmark("livecodebench_medium").load() if i.meta["title"] == "Snake Numbers")
    case = item.tests[0]
    assert case.input.strip() in data.read_text()  # what the program looks for is there on the host
    targets = [str(data), str(data.parent), str(REPO), str(REPO / "srpo_core" / "benchmarks" / "catalog.py")]
    result = run_python({"main.py": ANSWER_SEARCH}, ["main.py", *targets], case.input,
                        SandboxLimits(cpu_s=60, wall_s=120, memory_mb=512))
    assert result.ok, result.stderr
    assert "HITS []" in result.stdout and "OPENED []" in result.stdout, result.stdout


@needs_root
def test_proc_and_hostname_are_the_sandboxes_own():
    program = (
        "import os\n"
        "pids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())\n"
        "print(pids, os.uname().nodename, os.getpid())\n"
    )
    result = run(program)
    assert result.ok, result.stderr
    pids, hostname, own = result.stdout.rsplit(" ", 2)
    assert len(json.loads(pids)) <= 3 and int(own) <= 3  # bubblewrap's init and the program: no host PIDs
    assert hostname == "srpo-sandbox" != socket.gethostname()


def host_shm_keys() -> set[int]:
    lines = Path("/proc/sysvipc/shm").read_text().splitlines()[1:]
    return {int(line.split()[0]) for line in lines if line.strip()}


@needs_root
def test_sysv_shared_memory_dies_with_the_run():
    key = 0x5A000000 + secrets.randbelow(1 << 24)
    program = (
        "import ctypes\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        f"shmid = libc.shmget({key}, 1 << 20, 0o1000 | 0o600)  # IPC_CREAT\n"
        "print('SHMID', shmid, open('/proc/sysvipc/shm').read().count('\\n') - 1)\n"
    )
    result = run(program)
    try:
        assert result.ok, result.stderr
        _, shmid, inside = result.stdout.split()
        assert int(shmid) >= 0 and int(inside) == 1  # made, and the only segment it can see
        assert key not in host_shm_keys()
    finally:
        if key in host_shm_keys():  # without an IPC namespace: remove the leak
            libc = ctypes.CDLL(None, use_errno=True)
            libc.shmctl(libc.shmget(key, 0, 0), 0, None)  # IPC_RMID


# Six children each take and touch `each_mb`; they report once they hold it and keep it until
# the parent has counted: "HELD n" is how many held their memory at the same time.
CHILDREN_HOLD_MEMORY = """
import os, sys
each_mb = int(sys.argv[1])
ready_r, ready_w = os.pipe()
release_r, release_w = os.pipe()
children = []
for _ in range(6):
    pid = os.fork()
    if pid == 0:
        os.close(ready_r); os.close(release_w)
        block = bytearray(b"x" * (each_mb << 20))
        os.write(ready_w, b"+")
        os.close(ready_w)
        os.read(release_r, 1)
        os._exit(0)
    children.append(pid)
os.close(ready_w); os.close(release_r)
held = 0
while os.read(ready_r, 1):
    held += 1
print("HELD", held, flush=True)
os.close(release_w)
for pid in children:
    os.waitpid(pid, 0)
"""


@needs_root
def test_memory_limit_holds_for_the_run_not_per_process():
    limits = SandboxLimits(cpu_s=20, wall_s=60, memory_mb=512)  # per process 512 MB, the run 512 MB
    small = run_python({"main.py": CHILDREN_HOLD_MEMORY}, ["main.py", "30"], "", limits)
    assert small.ok and "HELD 6" in small.stdout, small.stderr  # 6 x 30 MB fit
    big = run_python({"main.py": CHILDREN_HOLD_MEMORY}, ["main.py", "200"], "", limits)
    assert "HELD 6" not in big.stdout  # 6 x 200 MB = 1.2 GB: each fits its rlimit, the run does not
    assert big.oom_kills >= 1


@needs_root
def test_output_cap_holds_across_files():
    program = (
        "written = 0\n"
        "for i in range(40):\n"
        "    try:\n"
        "        with open(f'out{i}.bin', 'wb') as f:\n"
        "            f.write(b'x' * (1 << 20))\n"
        "        written += 1\n"
        "    except OSError:\n"
        "        pass\n"
        "print('WROTE', written)\n"
    )
    result = run(program, SandboxLimits(cpu_s=5, wall_s=20, memory_mb=256, output_mb=2))
    assert result.ok, result.stderr
    assert int(result.stdout.split()[1]) <= 2  # 2 MB for all files together, not 2 MB per file


def test_without_isolation_limits_still_apply():
    unsafe = SandboxLimits(cpu_s=2, wall_s=2, memory_mb=256, isolate=False)
    result = run("print(sum(range(10)))", unsafe)
    assert result.ok and result.stdout.strip() == "45" and result.uid is None
    hog = run("x = bytearray(2 * 1024 ** 3)", unsafe)
    assert not hog.ok and "MemoryError" in hog.stderr
    loop = run("while True:\n    pass", unsafe)
    assert not loop.ok

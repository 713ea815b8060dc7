"""Run untrusted Python in a sandbox with its own root: the program sees the interpreter, its
work directory and nothing else of the machine; CPU, wall-clock, memory, process and output
limits hold for the run as a whole.

What one isolated run gets (all set up by bubblewrap, ``bwrap``, started as root):
  * **Own root** (a fresh tmpfs, pivot_root'ed into, read-only): ``/usr`` (the dynamic loader, the
    C library and the shared libraries of the interpreter and its extension modules; ``/lib*``
    and ``/bin`` as on the host), the interpreter's installation when it lives elsewhere (e.g.
    pyenv under /root), ``/etc/ld.so.cache``. Hidden even there: ``/usr/local`` (unless the
    interpreter is installed in it) and every ``site-packages``/``dist-packages`` directory,
    since the program runs ``python -I`` on the standard library only. Not there at all: the
    repository, the benchmark data, /home, /root, /etc, /var, /sys, the host's /tmp.
  * **Work directory** ``/tmp/work``: a tmpfs of ``output_mb`` (the program's files are copied in
    by bwrap; everything the program writes there counts against that one cap: many small files
    fail like one big one); the rest of /tmp is an empty read-only tmpfs.
  * **Namespaces**: PID (a fresh ``/proc`` listing only the run's processes; when the
    namespace's init dies every process of the run dies), network (only a loopback that is
    down: no connection, not even to 127.0.0.1), IPC (SysV shared memory, semaphores and
    message queues made inside vanish with the run), UTS (hostname ``srpo-sandbox``), mount,
    cgroup. /dev is a minimal one (null, zero, random, urandom, tty, pts, shm read-only by the
    program's uid).
  * **A cgroup per run** (:mod:`srpo_core.verifiers._cgroup`): memory (``memory_mb``, no swap)
    and task count (``nproc``) for all processes of the run together; at the end every task
    still in it is killed and the cgroup removed.
  * **Identity**: a throwaway uid/gid, random in ``UID_RANGE`` and distinct per run, no groups,
    no capabilities, no_new_privs; environment scrubbed to PATH, LANG, HOME, PYTHONHASHSEED,
    PYTHONDONTWRITEBYTECODE. Per-process rlimits stay too: RLIMIT_CPU, RLIMIT_AS (a single
    process cannot take the run's whole memory either), RLIMIT_NPROC for the uid, RLIMIT_FSIZE
    (stdout and stderr are host files capped at ``output_mb`` each), RLIMIT_NOFILE, no cores.
  * **Wall clock**: the parent kills the run at ``wall_s`` (its process group, then the cgroup).

Why bubblewrap and not more hand-written namespace code: the old launcher unshared mount,
network and PID namespaces with ctypes and covered /tmp-like directories, and every gap the
review found (host root visible, host /proc, no IPC namespace) was a step it did not do. What
was missing -- a minimal root with pivot_root, mount propagation, a fresh procfs with its
sensitive entries read-only, a minimal /dev with devpts, size-limited tmpfs, IPC/UTS/cgroup
namespaces, die-with-parent, a new session against TIOCSTI, no_new_privs -- is exactly what
bubblewrap is: a small C tool maintained by the Flatpak/GNOME projects for this job, packaged
by every distribution (Debian ``bubblewrap``, one apt line: ``.ci/install-sandbox.sh``).
Writing it again in ctypes would mean owning those details and their CVEs. bubblewrap does not
do cgroups or uid changes outside a user namespace, so those two stay ours: the launcher joins
the run's cgroup before exec'ing bwrap, and a 20-line init inside the sandbox drops from root to
the throwaway uid (a real uid on the host, so RLIMIT_NPROC and file ownership are per run; a
user namespace would map the program to root outside).

Requirements: root (CAP_SYS_ADMIN for the namespaces and mounts, CAP_SETUID), ``bwrap`` on the
PATH, and a writable cgroup hierarchy with the memory and pids controllers. When any is
missing :func:`run_python` raises :class:`SandboxUnavailable` naming it -- there is no silent
weaker mode. On Kubernetes the training step pods are non-root without capabilities, so code is
scored in the privileged, network-less scoring Job of ``infra/scoring/code-scoring.yaml`` (see
infra/README.md). ``SandboxLimits(isolate=False)`` runs with the per-process rlimits only, in a
host temp directory (no isolation at all: for trusted code on a development machine).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from srpo_core.verifiers._cgroup import CgroupUnavailable, RunCgroup
from srpo_core.verifiers._sandbox_launcher import INIT_SOURCE, INIT_STARTED, SETUP_EXIT, SETUP_FAILED

UID_RANGE = (40000, 60000)
HOSTNAME = "srpo-sandbox"
WORK_DIR = "/tmp/work"
_LAUNCHER = str(Path(__file__).with_name("_sandbox_launcher.py"))
_BWRAP_PATH = "/usr/bin:/bin:/usr/local/bin:/usr/sbin:/sbin"
_MB = 1 << 20
_K8S_HINT = "on Kubernetes, score code with infra/scoring/code-scoring.yaml (infra/README.md, 'Scoring code')"


class SandboxUnavailable(RuntimeError):
    """The sandbox could not be set up on this machine (the message says which step failed)."""


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one run.

    cpu_s: CPU seconds per process (RLIMIT_CPU). wall_s: wall-clock seconds of the run (parent).
    memory_mb: per process (RLIMIT_AS) and for the whole run (cgroup memory limit).
    output_mb: stdout and stderr each (RLIMIT_FSIZE) and all files of the work directory together
      (tmpfs size). nproc: tasks of the run (cgroup pids.max) and of its uid (RLIMIT_NPROC).
    nofile: open files per process. isolate: False = rlimits only, no isolation (trusted code).
    """

    cpu_s: float = 10.0
    wall_s: float = 10.0
    memory_mb: int = 1024
    output_mb: int = 16
    nproc: int = 64
    nofile: int = 256
    isolate: bool = True


@dataclass(frozen=True)
class SandboxResult:
    returncode: int | None  # None when killed at the wall-clock limit
    stdout: str
    stderr: str
    timed_out: bool
    wall_s: float
    uid: int | None  # the throwaway uid (None without isolation)
    oom_kills: int = 0  # processes of the run killed for the run's memory limit

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


@lru_cache(maxsize=1)
def _python_location() -> tuple[str, str]:
    """(installation prefix, interpreter path relative to it) of the running Python."""
    prefix = Path(sys.base_prefix).resolve()
    exe = Path(sys.executable).resolve()
    try:
        return str(prefix), str(exe.relative_to(prefix))
    except ValueError:
        rel = Path("bin") / f"python{sys.version_info.major}.{sys.version_info.minor}"
        if (prefix / rel).exists():
            return str(prefix), str(rel)
        raise SandboxUnavailable(f"cannot locate the interpreter {exe} under prefix {prefix}") from None


def _bwrap() -> str:
    found = shutil.which("bwrap", path=_BWRAP_PATH)
    if found is None:
        raise SandboxUnavailable(
            "bubblewrap (bwrap) is not installed: `apt-get install bubblewrap` (.ci/install-sandbox.sh); "
            "SandboxLimits(isolate=False) runs without isolation"
        )
    return found


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _root_tree(prefix: str) -> list[str]:
    """bwrap arguments of the read-only root: /usr, the interpreter, loader cache; packages hidden."""
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    if not _under(prefix, "/usr"):
        # bwrap would create the missing parents (e.g. /root) 0700: traversable for root only
        for parent in reversed(Path(prefix).parents[:-1]):
            args += ["--perms", "0755", "--dir", str(parent)]
        args += ["--ro-bind", prefix, prefix]
    hidden = ["/usr/local"] if os.path.isdir("/usr/local") and not _under(prefix, "/usr/local") else []
    patterns = ("lib/python3*/site-packages", "lib/python3*/dist-packages", "local/lib/python3*/site-packages",
                "local/lib/python3*/dist-packages")
    packages = {d for root in (prefix, "/usr") for pattern in patterns for d in glob.glob(os.path.join(root, pattern))}
    hidden += sorted(d for d in packages if not any(_under(d, h) for h in hidden))
    for d in hidden:
        args += ["--tmpfs", d, "--remount-ro", d]
    if os.path.isfile("/etc/ld.so.cache"):
        args += ["--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    return args


def _bwrap_argv(files: Mapping[str, int], status_fd: int, output_bytes: int, init_cfg: dict) -> list[str]:
    prefix, python_rel = _python_location()
    python = os.path.join(prefix, python_rel)
    argv = [
        _bwrap(),
        "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup",
        "--hostname", HOSTNAME, "--die-with-parent", "--new-session",
        "--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_CHOWN",
        *_root_tree(prefix),
        "--proc", "/proc", "--dev", "/dev",
        "--tmpfs", "/tmp",
        "--perms", "0700", "--size", str(output_bytes), "--tmpfs", WORK_DIR,
    ]
    for name, fd in files.items():
        argv += ["--perms", "0644", "--file", str(fd), f"{WORK_DIR}/{name}"]
    argv += [
        "--remount-ro", "/tmp", "--remount-ro", "/dev", "--remount-ro", "/",
        "--chdir", WORK_DIR,
        python, "-I", "-S", "-c", INIT_SOURCE,
        json.dumps({**init_cfg, "python": python, "status_fd": status_fd, "workdir": WORK_DIR,
                    "setup_failed": SETUP_FAILED, "setup_exit": SETUP_EXIT, "init_started": INIT_STARTED}),
    ]
    return argv


def _read_capped(f, cap: int) -> str:
    f.seek(0)
    return f.read(cap).decode("utf-8", errors="replace")


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _env(home: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": home, "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}


def run_python(
    files: Mapping[str, str],
    argv: Sequence[str],
    stdin: str = "",
    limits: SandboxLimits = SandboxLimits(),
) -> SandboxResult:
    """Write ``files`` (name -> text) into a fresh work directory and run ``python -I *argv`` there."""
    for name in files:
        if os.path.basename(name) != name or name in ("", ".", ".."):
            raise ValueError(f"sandbox file names must be plain names, got {name!r}")
    if limits.isolate and os.geteuid() != 0:
        raise SandboxUnavailable(f"the sandbox needs root (namespaces, mounts, cgroups, uid changes); {_K8S_HINT}; "
                                 "SandboxLimits(isolate=False) runs without isolation")
    with contextlib.ExitStack() as stack:
        def temp():
            return stack.enter_context(tempfile.TemporaryFile())

        f_in, f_out, f_err, f_status = temp(), temp(), temp(), temp()
        f_in.write(stdin.encode("utf-8"))
        f_in.seek(0)
        cfg = {
            "isolate": limits.isolate,
            "argv": list(argv),
            "status_fd": f_status.fileno(),
            "limits": {
                "cpu_s": limits.cpu_s,
                "memory_bytes": limits.memory_mb * _MB,
                "fsize_bytes": limits.output_mb * _MB,
                "nproc": limits.nproc,
                "nofile": limits.nofile,
            },
        }
        pass_fds = [f_status.fileno()]
        uid = cgroup = None
        if limits.isolate:
            uid = UID_RANGE[0] + secrets.randbelow(UID_RANGE[1] - UID_RANGE[0])
            file_fds = {}
            for name, text in files.items():
                f = temp()
                f.write(text.encode("utf-8"))
                f.seek(0)
                file_fds[name] = f.fileno()
            pass_fds += list(file_fds.values())
            init_cfg = {"uid": uid, "gid": uid, "argv": list(argv), "env": _env(WORK_DIR)}
            cfg["bwrap_argv"] = _bwrap_argv(file_fds, f_status.fileno(), limits.output_mb * _MB, init_cfg)
            try:
                cgroup = RunCgroup.create(limits.memory_mb * _MB, limits.nproc)
            except CgroupUnavailable as exc:
                raise SandboxUnavailable(f"{exc}; {_K8S_HINT}") from None
            stack.callback(cgroup.remove)
            cfg["cgroup_procs"] = cgroup.procs_files
            workdir = "/"
        else:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="srpo-sbx-"))
            for name, text in files.items():
                Path(workdir, name).write_text(text, encoding="utf-8")
            cfg.update(workdir=workdir, python_executable=sys.executable, env=_env(workdir))
        start = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", _LAUNCHER, json.dumps(cfg)],
            stdin=f_in, stdout=f_out, stderr=f_err, pass_fds=pass_fds,
            cwd=workdir, env={}, start_new_session=True,
        )
        timed_out = False
        try:
            returncode: int | None = proc.wait(timeout=limits.wall_s)
        except subprocess.TimeoutExpired:
            timed_out, returncode = True, None
        _kill_group(proc.pid)
        proc.wait()
        if cgroup is not None:
            cgroup.kill_all()
        wall = time.monotonic() - start
        status = _read_capped(f_status, 4096)
        if returncode == SETUP_EXIT and SETUP_FAILED in status:
            raise SandboxUnavailable(f"{status.strip()} ({_K8S_HINT}; SandboxLimits(isolate=False) runs without isolation)")
        if cgroup is not None and not timed_out and INIT_STARTED not in status:
            raise SandboxUnavailable(f"bubblewrap could not build the sandbox (exit {returncode}): {_read_capped(f_err, 4096).strip()}")
        cap = limits.output_mb * _MB
        oom = cgroup.memory_events().get("oom_kill", 0) if cgroup is not None else 0
        return SandboxResult(
            returncode=returncode,
            stdout=_read_capped(f_out, cap),
            stderr=_read_capped(f_err, 64 * 1024),
            timed_out=timed_out,
            wall_s=wall,
            uid=uid,
            oom_kills=oom,
        )


@lru_cache(maxsize=2)
def sandbox_available(isolate: bool = True) -> str | None:
    """None when the sandbox works here, else the reason it does not (cached per process)."""
    try:
        result = run_python({"main.py": "print('ok')"}, ["main.py"], limits=SandboxLimits(wall_s=30, isolate=isolate))
    except (SandboxUnavailable, OSError) as exc:
        return str(exc)
    if result.stdout.strip() != "ok":
        return f"probe failed: rc={result.returncode} stderr={result.stderr[-500:]!r}"
    return None

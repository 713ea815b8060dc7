"""Run untrusted Python in a sandbox: separate process, CPU/wall/memory/process/file limits,
no network, no writes outside a throwaway working directory.

Each run gets a fresh temporary directory owned by a throwaway uid/gid (random in
``UID_RANGE``, distinct per run, so the per-uid process limit and file permissions are not
shared between concurrent runs). The launcher (``_sandbox_launcher.py``, a fresh ``python -I
-S`` so no ``preexec_fn`` runs in a threaded parent) unshares the mount, network and PID
namespaces, covers the world-writable directories with read-only tmpfs mounts, sets
RLIMIT_CPU / RLIMIT_AS / RLIMIT_NPROC / RLIMIT_FSIZE / RLIMIT_NOFILE / RLIMIT_CORE, drops to the
throwaway uid and execs Python. stdin/stdout/stderr are files, so output size is capped by
RLIMIT_FSIZE (the program dies with SIGXFSZ beyond it) and nothing can dead-lock on a pipe.
The parent kills the whole process group at the wall-clock limit; leaving the PID namespace
kills every process the program started.

Namespaces, mounts and uid changes need root (CAP_SYS_ADMIN, CAP_SETUID). Where they are not
available, :func:`run_python` raises :class:`SandboxUnavailable` with the reason; pass
``SandboxLimits(isolate=False)`` to run with resource limits only (no network or filesystem
isolation: for trusted code on a development machine).
"""

from __future__ import annotations

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

from srpo_core.verifiers._sandbox_launcher import SETUP_EXIT, SETUP_FAILED

UID_RANGE = (40000, 60000)
_LAUNCHER = str(Path(__file__).with_name("_sandbox_launcher.py"))
_MB = 1 << 20


class SandboxUnavailable(RuntimeError):
    """The sandbox could not be set up on this machine (the message says which step failed)."""


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one run. ``wall_s`` is enforced by the parent, the rest by rlimits."""

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
        raise SandboxUnavailable(f"cannot locate the interpreter {exe} under prefix {prefix}")


def _read_capped(f, cap: int) -> str:
    f.seek(0)
    return f.read(cap).decode("utf-8", errors="replace")


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_python(
    files: Mapping[str, str],
    argv: Sequence[str],
    stdin: str = "",
    limits: SandboxLimits = SandboxLimits(),
) -> SandboxResult:
    """Write ``files`` (name -> text) into a fresh directory and run ``python -I *argv`` there."""
    workdir = tempfile.mkdtemp(prefix="srpo-sbx-")
    uid = UID_RANGE[0] + secrets.randbelow(UID_RANGE[1] - UID_RANGE[0]) if limits.isolate else None
    try:
        for name, text in files.items():
            if os.path.basename(name) != name:
                raise ValueError(f"sandbox file names must be plain names, got {name!r}")
            Path(workdir, name).write_text(text, encoding="utf-8")
        if uid is not None:
            for name in (".", *files):
                os.chown(os.path.join(workdir, name), uid, uid)
            os.chmod(workdir, 0o700)
        prefix, python_rel = _python_location()
        with tempfile.TemporaryFile() as f_in, tempfile.TemporaryFile() as f_out, \
                tempfile.TemporaryFile() as f_err, tempfile.TemporaryFile() as f_status:
            f_in.write(stdin.encode("utf-8"))
            f_in.seek(0)
            cfg = {
                "workdir": workdir,
                "uid": uid,
                "gid": uid,
                "isolate": limits.isolate,
                "python_prefix": prefix,
                "python_rel": python_rel,
                "python_executable": sys.executable,
                "argv": list(argv),
                "status_fd": f_status.fileno(),
                "env": {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir,
                        "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"},
                "limits": {
                    "cpu_s": limits.cpu_s,
                    "memory_bytes": limits.memory_mb * _MB,
                    "fsize_bytes": limits.output_mb * _MB,
                    "nproc": limits.nproc,
                    "nofile": limits.nofile,
                },
            }
            start = time.monotonic()
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", _LAUNCHER, json.dumps(cfg)],
                stdin=f_in, stdout=f_out, stderr=f_err, pass_fds=(f_status.fileno(),),
                cwd=workdir, env={}, start_new_session=True,
            )
            timed_out = False
            try:
                returncode: int | None = proc.wait(timeout=limits.wall_s)
            except subprocess.TimeoutExpired:
                timed_out, returncode = True, None
            _kill_group(proc.pid)
            proc.wait()
            wall = time.monotonic() - start
            status = _read_capped(f_status, 4096)
            if returncode == SETUP_EXIT and SETUP_FAILED in status:
                raise SandboxUnavailable(
                    f"{status.strip()} (the sandbox needs root for namespaces and uid changes; "
                    "SandboxLimits(isolate=False) runs without isolation)"
                )
            cap = limits.output_mb * _MB
            return SandboxResult(
                returncode=returncode,
                stdout=_read_capped(f_out, cap),
                stderr=_read_capped(f_err, 64 * 1024),
                timed_out=timed_out,
                wall_s=wall,
                uid=uid,
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@lru_cache(maxsize=2)
def sandbox_available(isolate: bool = True) -> str | None:
    """None when the sandbox works here, else the reason it does not (cached per process)."""
    try:
        result = run_python({"main.py": "print('ok')"}, ["main.py"], limits=SandboxLimits(
            wall_s=30, isolate=isolate))
    except (SandboxUnavailable, OSError) as exc:
        return str(exc)
    if result.stdout.strip() != "ok":
        return f"probe failed: rc={result.returncode} stderr={result.stderr[-500:]!r}"
    return None

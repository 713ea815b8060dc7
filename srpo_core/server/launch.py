"""`start_server`: run the inference server as a subprocess on 127.0.0.1 for local runs and tests.

    with start_server(model_path, engine="hf") as server:      # waits for /ready
        engine = server.engine()                                 # a RemoteEngine on it
        engine.load_adapter("/runs/x/adapter", "step-1")
        ...
    # leaving the block stops the server (SIGTERM, then SIGKILL)

The server binds port 0 by default and reports the port it got through `--port-file`, so two
servers never race for a port. A server that exits before it is ready raises `ServerStartError`
with the tail of its log.

Each start generates a fresh bearer token (`secrets.token_urlsafe(32)`, 256 bits): it reaches the
child through its environment ($SRPO_SERVER_TOKEN, which the server removes from its own
environment once read), never its command line or a log, and is `handle.token`; `handle.engine()`
sends it. Give it to other processes that call the server through their environment too.
Adapters load only from under `artifact_roots` (default: the artifact store root of this process,
`srpo_core.store.default_root()`).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self


class ServerStartError(RuntimeError):
    """The server process exited or did not become ready in time; the message has its log tail."""


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"<no log: {exc}>"


@dataclass
class ServerHandle:
    url: str
    process: subprocess.Popen
    log_path: Path
    workdir: Path
    _owned_workdir: bool = field(default=False, repr=False)
    token: str = field(default="", repr=False)  # the bearer token of this start (never printed)

    def engine(self, adapter_version: str | None = None, **kwargs):
        from srpo_core.engine.remote import RemoteEngine

        kwargs.setdefault("token", self.token)
        return RemoteEngine(self.url, adapter_version=adapter_version, **kwargs)

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)

    def stop(self, grace_s: float = 15.0) -> int | None:
        """SIGTERM the server (it shuts down cleanly), SIGKILL if it lingers. Returns its exit code."""
        proc = self.process
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if self._owned_workdir:
            import shutil

            shutil.rmtree(self.workdir / "cache", ignore_errors=True)
        return proc.returncode

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def http_status(url: str, timeout: float = 2.0) -> int | None:
    """The HTTP status of a GET (error statuses included), None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, ValueError):
        return None


def start_server(
    model_path: str,
    port: int = 0,
    *,
    host: str = "127.0.0.1",
    engine: str = "hf",
    dtype: str | None = None,
    device: str | None = None,
    threads: int | None = None,
    max_adapters: int | None = None,
    adapters: dict[str, str] | None = None,
    artifact_roots: list[str] | tuple[str, ...] | None = None,
    extra_args: list[str] | tuple[str, ...] = (),
    ready_timeout: float = 600.0,
    workdir: str | os.PathLike | None = None,
    env: dict[str, str] | None = None,
    command_prefix: list[str] | tuple[str, ...] = (),
) -> ServerHandle:
    """Spawn `python -m srpo_core.server` (after `command_prefix`, e.g. a watchdog) with a fresh
    token and wait until /ready answers 200."""
    owned = workdir is None
    work = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="srpo-server-"))
    work.mkdir(parents=True, exist_ok=True)
    port_file = work / "port"
    port_file.unlink(missing_ok=True)
    log_path = work / "server.log"
    cmd = [
        sys.executable,
        "-m",
        "srpo_core.server",
        "--model",
        str(model_path),
        "--host",
        host,
        "--port",
        str(port),
        "--port-file",
        str(port_file),
        "--engine",
        engine,
        "--cache-dir",
        str(work / "cache"),
    ]
    if dtype:
        cmd += ["--dtype", dtype]
    if device:
        cmd += ["--device", device]
    if threads:
        cmd += ["--threads", str(threads)]
    if max_adapters:
        cmd += ["--max-adapters", str(max_adapters)]
    if artifact_roots is None:
        from srpo_core.store import default_root

        artifact_roots = [default_root()]
    for root in artifact_roots:
        cmd += ["--artifact-root", str(root)]
    for version, uri in (adapters or {}).items():
        cmd += ["--adapter", f"{version}={uri}"]
    cmd = [*command_prefix, *cmd, *extra_args]
    token = secrets.token_urlsafe(32)
    child_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", **(env or {}), "SRPO_SERVER_TOKEN": token}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=child_env, start_new_session=True)
    handle = None
    deadline = time.monotonic() + ready_timeout
    try:
        while time.monotonic() < deadline:
            code = proc.poll()
            if code is not None:
                raise ServerStartError(f"inference server exited with code {code} before it was ready; command: {' '.join(cmd)}\nlog {log_path}:\n{_tail(log_path)}")
            if handle is None and port_file.exists():
                handle = ServerHandle(f"http://{host}:{int(port_file.read_text())}", proc, log_path, work, owned, token)
            if handle is not None and http_status(handle.url + "/ready") == 200:
                return handle
            time.sleep(0.2)
        raise ServerStartError(f"inference server not ready after {ready_timeout:.0f}s; log {log_path}:\n{_tail(log_path)}")
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        raise

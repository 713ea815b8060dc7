"""Pytest plugin with real local servers for store/tracking tests.

Load it from ``tests/conftest.py`` with ``pytest_plugins = ["tests.conftest_servers"]``
(or ad hoc: ``pytest -p tests.conftest_servers ...``).

Fixtures
    ``s3_server`` (session): ``moto_server`` on a free 127.0.0.1 port; yields the endpoint URL and
        sets dummy AWS credentials/region in ``os.environ`` for the session (restored afterwards).
    ``s3_bucket`` (function): a fresh, uniquely named bucket with versioning enabled on ``s3_server``.
    ``mlflow_server`` (session): ``mlflow server`` (sqlite backend + local artifact destination, one
        worker) on a free 127.0.0.1 port; yields its ``http://`` tracking URI.

Both servers run in their own process group, which is terminated (then killed) at the end of the
session. A server that exits early or is not ready in time fails the fixture with its log tail.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from srpo_core.server.launch import http_status

S3_READY_TIMEOUT_S = 30.0
MLFLOW_READY_TIMEOUT_S = 120.0  # sqlite migrations + uvicorn import on a shared 2-core machine
DUMMY_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}
AWS_ENV_TO_CLEAR = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


@dataclass(frozen=True)
class ServerProcess:
    """A server started by a fixture: its process, log file and base URL."""

    name: str
    process: subprocess.Popen
    log_path: Path
    url: str


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"<no log: {exc}>"


def _executable(name: str) -> str:
    """The console script next to the running interpreter (the venv), else from PATH."""
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name!r} not found next to {sys.executable} or on PATH; install the test extras")
    return found


def start_server(name: str, cmd: Sequence[str], url: str, log_path: Path, cwd: Path) -> ServerProcess:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            list(cmd), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd, start_new_session=True
        )
    return ServerProcess(name=name, process=process, log_path=log_path, url=url)


def stop_server(server: ServerProcess, grace_s: float = 10.0) -> None:
    """SIGTERM the server's own process group (pgid == its pid), SIGKILL if it lingers."""
    proc = server.process
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait_s)
            try:  # the group may still hold children of the leader
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            break
        except subprocess.TimeoutExpired:
            continue


def wait_ready(server: ServerProcess, probe_url: str, timeout_s: float) -> None:
    """Poll ``probe_url`` until it answers 200; fail with the log tail on early exit or timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        code = server.process.poll()
        if code is not None:
            pytest.fail(
                f"{server.name} exited with code {code} before becoming ready at {probe_url}; "
                f"log {server.log_path}:\n{log_tail(server.log_path)}"
            )
        if http_status(probe_url, timeout=1.0) == 200:
            return
        time.sleep(0.25)
    stop_server(server)
    pytest.fail(
        f"{server.name} not ready at {probe_url} after {timeout_s:.0f}s; "
        f"log {server.log_path}:\n{log_tail(server.log_path)}"
    )


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Endpoint URL of a moto S3 server; dummy AWS credentials are set for the session."""
    patch = pytest.MonkeyPatch()
    for key in AWS_ENV_TO_CLEAR:
        patch.delenv(key, raising=False)
    for key, value in DUMMY_AWS_ENV.items():
        patch.setenv(key, value)
    workdir = tmp_path_factory.mktemp("moto")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [_executable("moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    server = start_server("moto_server", cmd, url, workdir / "moto.log", workdir)
    try:
        wait_ready(server, url + "/", S3_READY_TIMEOUT_S)
        yield url
    finally:
        stop_server(server)
        patch.undo()


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """A fresh bucket with versioning enabled on the moto server."""
    import boto3

    name = f"srpo-test-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket=name)
    client.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    return name


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``http://127.0.0.1:<port>`` of a real MLflow tracking server (sqlite, proxied artifacts)."""
    workdir = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        _executable("mlflow"), "server",
        "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
        "--artifacts-destination", str(workdir / "artifacts"),
        "--serve-artifacts",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
    ]  # fmt: skip
    server = start_server("mlflow server", cmd, url, workdir / "mlflow-server.log", workdir)
    try:
        wait_ready(server, url + "/health", MLFLOW_READY_TIMEOUT_S)
        yield url
    finally:
        stop_server(server)

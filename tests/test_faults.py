"""The fault-injection suite: a training killed (`kill -9` of its whole process group) at every
phase, its inference server killed mid-step, its S3 endpoint stopped mid-upload and a checkpoint
file corrupted; after each, the resume must end identical to an uninterrupted training: the same
committed steps, data order (each step's data cursor), rollouts and adapter hashes.

The trainings are driven phase by phase by tests/fault_driver.py (the flow's own prepare, phases
and lease, without Metaflow's one process per task); faults fire at exact points through the
store's `$SRPO_FAULT` hook (store.base.fault_point): just before a phase stores its result, so
the phase's work is done and lost. A training is the tiny preset cut to two epoch steps of 8
prompts.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from srpo_core import store as S
from tests.conftest_servers import free_port

ROOT = Path(__file__).resolve().parent.parent
DRIVER = str(ROOT / "tests" / "fault_driver.py")
QUICK = "data.train_size=16 train.prompts_per_step=8 train.mini_batch_prompts=8 train.epochs=1 eval.items_per_benchmark=8 eval.batch_size=8 eval.every_steps=0"
EVENT_TIMEOUT_S = 600  # a deadline for events that do come (a phase reaching its fault point), not a timing assumption
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env_base(tmp_path_factory, tiny_model_path) -> dict:
    work = tmp_path_factory.mktemp("faults")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SRPO_FAULT", "SRPO_LEASE", "SRPO_SERVER_TOKEN"))}
    env.update({"MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db", "SRPO_CONFIG": "tiny", "USERNAME": "srpo-tests", "PYTHONPATH": str(ROOT), "FAULT_MODEL": tiny_model_path})
    return env


def run_env_of(env: dict, root: str, extra: dict | None = None) -> dict:
    """`env` for a run on `root`, with the AWS settings the s3_server fixture put in os.environ."""
    aws = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    return {**env, **aws, "SRPO_ARTIFACT_ROOT": root, **(extra or {})}


def driver_cmd(env: dict, tid: str, sets: str = "") -> list[str]:
    return [sys.executable, DRIVER, "--training-id", tid, "--set", f"{QUICK} model.name_or_path={env['FAULT_MODEL']} {sets}".strip()]


def drive(env: dict, root: str, tid: str, *, fault: str = "", sets: str = "", extra: dict | None = None) -> subprocess.CompletedProcess:
    """One run of the training (its own process group, as `kill -9` of a training kills)."""
    run_env = run_env_of(env, root, extra)
    if fault:
        run_env[S.ENV_FAULT] = fault
    return subprocess.run(driver_cmd(env, tid, sets), env=run_env, cwd=ROOT, capture_output=True, text=True, timeout=EVENT_TIMEOUT_S, start_new_session=True)


def summary(store: S.Store, tid: str) -> dict:
    """What must not change under faults: committed steps, latest, and per step the data cursor,
    parent, adapter hash and the sha256 of its rollouts."""
    steps = sorted(S.parse_step_key(k.rsplit("/", 1)[0])[1] for k in store.list(f"runs/{tid}/steps/") if k.endswith("/" + S.MANIFEST_NAME))
    out = {"latest": S.get_latest_step(store, tid), "steps": {}}
    for step in steps:
        m = S.read_manifest(store, tid, step)
        prefix = S.step_prefix(tid, step)
        out["steps"][step] = {
            "data_cursor": m.data_cursor,
            "parent": None if m.parent_key is None else S.parse_step_key(m.parent_key)[1],
            "adapter_sha256": store.get_bytes(f"{prefix}/adapter.sha256").decode().strip(),
            "rollouts_sha256": hashlib.sha256(store.get_bytes(f"{prefix}/rollouts.jsonl")).hexdigest(),
        }
    return json.loads(json.dumps(out))


@pytest.fixture(scope="module")
def reference(env_base, tmp_path_factory) -> dict:
    """The uninterrupted training every faulted one must reproduce."""
    root = str(tmp_path_factory.mktemp("reference") / "art")
    done = drive(env_base, root, "ref")
    assert done.returncode == 0, done.stderr[-3000:]
    ref = summary(S.open_store(root), "ref")
    assert ref["latest"] == 1 and sorted(ref["steps"]) == ["0", "1"]
    return ref


def work_keys(store: S.Store, tid: str, step: int) -> list[str]:
    return store.list(f"runs/{tid}/work/{step:06d}/")


# every phase of an epoch step, killed just before it stores its result: evaluate in step 0, the
# others in step 1 (which resumes from the checkpoint of step 0)
KILLS = [
    ("evaluate", "put:runs/kill/eval/000000/*"),  # the evaluation before training, after step 0 committed
    ("generate", "put:runs/kill/work/000001/*/generate-a0.json"),
    ("verify", "put:runs/kill/work/000001/*/verify-a0.json"),
    ("localize", "put:runs/kill/work/000001/*/localize-a0.json"),
    ("suffix", "put:runs/kill/work/000001/*/suffix-a0.json"),
    ("verify_suffix", "put:runs/kill/work/000001/*/verify_suffix-a0.json"),
    ("learner before its upload", "put:runs/kill/steps/000001/adapter.sha256"),  # the first file put_dir writes
    ("learner mid-upload", "put:runs/kill/steps/000001/rollouts.jsonl"),  # all but the last file stored
    ("learner after its upload", "put:runs/kill/steps/000001/manifest.json"),  # every file stored, no manifest
    ("learner after its commit", "pointer:runs/kill/latest=*/000001"),  # manifest written, `latest` not moved
]


def test_kill_9_at_every_phase_then_resume(env_base, reference, tmp_path) -> None:
    """One training killed at each phase in turn; each resume continues where the store says
    (taking the dead run's lease over at once), and the last one ends identical to `reference`.
    Between the kills, a corrupted step-0 file stops the resume naming the file, before any
    phase ran on it."""
    root = str(tmp_path / "art")
    store = S.open_store(root)
    survived = []
    for name, point in KILLS:
        run = drive(env_base, root, "kill", fault=f"kill:{point}")
        assert run.returncode == -signal.SIGKILL, f"{name}: the run was not killed at {point} (rc {run.returncode})\n{run.stderr[-3000:]}"
        state = summary(store, "kill")
        assert state["latest"] == 0, (name, state)  # the killed step never became the resume point
        expect_manifest = name == "learner after its commit"
        assert ("1" in state["steps"]) == expect_manifest, (name, state)
        if name == "evaluate":  # step 0 committed before its evaluation was killed
            assert state["steps"]["0"] == reference["steps"]["0"]
        else:
            assert "taking over the lease" in run.stderr, f"{name}: the resume did not take the dead run's lease over\n{run.stderr[-2000:]}"
        if name == "generate":  # a corrupted checkpoint file: named, never loaded
            adapter = Path(root) / S.step_prefix("kill", 0) / "adapter" / "adapter_model.safetensors"
            good = adapter.read_bytes()
            adapter.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # one flipped bit
            before = work_keys(store, "kill", 1)
            bad = drive(env_base, root, "kill")
            # named by whoever loads it: the in-process loader (store.load_step) or the inference
            # server's manifest check (rollout.server_url: auto, the tiny default)
            assert bad.returncode == 1 and re.search(r"corrupt: (adapter/)?adapter_model\.safetensors", bad.stderr), bad.stderr[-3000:]
            assert work_keys(store, "kill", 1) == before  # no phase ran on the corrupt checkpoint
            adapter.write_bytes(good)
            survived.append("corrupted checkpoint")
        survived.append(name)
    done = drive(env_base, root, "kill")
    assert done.returncode == 0, done.stderr[-3000:]
    assert summary(store, "kill") == reference
    assert S.current_lease(store, "kill").released
    print(f"fault suite: kill -9 at {len(KILLS)}/{len(KILLS)} phases + 1/1 corrupted checkpoint survived: {survived}")


def _server_pid(parent: int) -> int:
    """The inference server the driver `parent` started (its child running srpo_core.server)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (proc / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and b"srpo_core.server" in cmd:
            return int(proc.name)
    raise AssertionError(f"no inference server child of pid {parent}")


def _paused(env: dict, root: str, tid: str, point: str, fault_dir: Path, sets: str = "", extra: dict | None = None) -> subprocess.Popen:
    """Start a run that pauses at `point` and wait until it is there."""
    fault_dir.mkdir(parents=True, exist_ok=True)
    run_env = {**run_env_of(env, root, extra), S.ENV_FAULT: f"pause:{point}", S.ENV_FAULT_DIR: str(fault_dir)}
    proc = subprocess.Popen(driver_cmd(env, tid, sets), env=run_env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + EVENT_TIMEOUT_S
    while not (fault_dir / "paused").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"the run never reached {point}: rc {proc.returncode}\n{err[-3000:]}")
        time.sleep(0.2)
    return proc


def test_inference_server_killed_mid_step(env_base, reference, tmp_path) -> None:
    """rollout.server_url=auto: the server is killed after `generate`; the step fails with a
    message naming the server, nothing of the step is committed, and the resume (a new server)
    ends identical to the in-process reference (the server samples with the same seeds)."""
    root = str(tmp_path / "art")
    store = S.open_store(root)
    proc = _paused(env_base, root, "srv", "put:runs/srv/work/000000/*/generate-a0.json", tmp_path / "fault", "rollout.server_url=auto")
    try:
        server = _server_pid(proc.pid)
        os.kill(server, signal.SIGKILL)
        (tmp_path / "fault" / "go").write_text("")
        out, err = proc.communicate(timeout=EVENT_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1, err[-3000:]
    assert "inference server" in err and "127.0.0.1" in err, err[-3000:]
    assert store.list("runs/srv/steps/") == [] and S.get_latest_step(store, "srv") is None  # nothing half-written
    done = drive(env_base, root, "srv", sets="rollout.server_url=auto")
    assert done.returncode == 0, done.stderr[-3000:]
    assert summary(store, "srv") == reference
    print("fault suite: inference server killed mid-step 1/1 survived")


class TcpProxy:
    """127.0.0.1:port -> target: the S3 endpoint the training sees, stopped and restarted on the
    same port while the S3 server behind it (and its data) stays up."""

    def __init__(self, target: tuple[str, int]):
        self.target, self.port = target, free_port()
        self._conns: list[socket.socket] = []
        self._server: socket.socket | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._server = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self._server,), daemon=True).start()

    def stop(self) -> None:
        self._server.close()
        for conn in self._conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()
        self._conns.clear()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def test_s3_endpoint_stopped_mid_upload(env_base, reference, tmp_path, s3_server, s3_bucket) -> None:
    """The learner's upload of step 0 loses its S3 endpoint half-way (the adapter's hash file is
    stored, its weights are not): a clear error naming the endpoint, no manifest; once the
    endpoint is back the resume discards the uncommitted keys under its lease and ends
    identical to the reference."""
    host, port = s3_server.removeprefix("http://").split(":")
    proxy = TcpProxy((host, int(port)))
    proxy.start()
    root = f"s3://{s3_bucket}/art"
    extra = {S.ENV_S3_ENDPOINT: proxy.url}
    store = S.S3Store.from_uri(root, endpoint_url=s3_server)  # the test's own view, not through the proxy
    proc = _paused(env_base, root, "s3t", "put:runs/s3t/steps/000000/adapter/adapter_model.safetensors", tmp_path / "fault", extra=extra)
    try:
        proxy.stop()
        (tmp_path / "fault" / "go").write_text("")
        out, err = proc.communicate(timeout=EVENT_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1, err[-3000:]
    assert f"S3 endpoint {proxy.url} is unreachable" in err, err[-3000:]
    assert store.exists(f"{S.step_prefix('s3t', 0)}/adapter.sha256")  # mid-upload: some files stored ...
    assert not store.exists(S.manifest_key("s3t", 0)) and S.get_latest_step(store, "s3t") is None  # ... none committed
    proxy.start()
    done = drive(env_base, root, "s3t", extra=extra)
    proxy.stop()
    assert done.returncode == 0, done.stderr[-3000:]
    assert summary(store, "s3t") == reference
    print("fault suite: S3 endpoint stopped mid-upload 1/1 survived")


def test_a_second_run_of_one_training_id_is_refused(tmp_path, tiny_model_path, monkeypatch) -> None:
    """flow_driver.prepare (the flow's `start`) takes the training's lease: a second writer of the
    same id is refused naming the holder; once the first releases it, a resume may start."""
    from srpo_core import flow_driver as D

    monkeypatch.setenv("SRPO_ARTIFACT_ROOT", str(tmp_path / "art"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.delenv(S.TAKEOVER_ENV, raising=False)
    monkeypatch.setenv("SRPO_CONFIG", "tiny")
    cfg = D.apply_overrides(D.parse_config(Path(D.default_config_path()).read_text()), "", "", "", -1, f"{QUICK} model.name_or_path={tiny_model_path}", 0)
    first = D.prepare(cfg, "dup")
    with pytest.raises(S.LeaseHeldError) as err:
        D.prepare(cfg, "dup")
    assert socket.gethostname() in str(err.value) and f"pid {os.getpid()}" in str(err.value)
    store = S.open_store(first.artifact_root)
    S.Lease.from_env(first.lease).release(store)
    again = D.prepare(cfg, "dup")
    assert S.Lease.from_env(again.lease).check(store).generation == 2

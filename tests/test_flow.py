"""The Metaflow training flow, run with Metaflow's own Runner on the tiny preset: local
datastore + local store + real MLflow server; S3 datastore + store on a real S3-compatible
server with bucket versioning; and a training killed mid-step then resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from srpo_core import data_order
from srpo_core import store as S
from srpo_core.config import load_config

ROOT = Path(__file__).resolve().parent.parent
FLOW = str(ROOT / "flows" / "srpo_flow.py")
pytestmark = pytest.mark.slow


def quick_set(model_path: str, extra: str = "") -> str:
    return f"model.name_or_path={model_path} eval.items_per_benchmark=30 data.train_size=32 train.prompts_per_step=8 train.mini_batch_prompts=8 {extra}".strip()


def flow_env(tmp_path: Path, artifact_root: str, tracking_uri: str, **extra: str) -> dict:
    env = {"USERNAME": "srpo-tests", "SRPO_ARTIFACT_ROOT": artifact_root, "MLFLOW_TRACKING_URI": tracking_uri, "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(tmp_path / "mf"), "SRPO_CONFIG": "tiny"}
    env.update(extra)
    return env


def run_flow(tmp_path, env, flow: str = FLOW, **params):
    from srpo_core.metaflow_env import runner

    Runner = runner()  # keeps torch importable in this process afterwards (metaflow#2462)
    with Runner(flow, show_output=False, env=env, cwd=str(tmp_path), file_read_timeout=300) as runner:
        result = runner.run(**params)
        assert result.run is not None and result.run.successful, result.stdout[-3000:] + result.stderr[-3000:]
        return result.run, result.stdout


def mlflow_run(uri: str, training_id: str):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("srpo")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.training_id = '{training_id}'")
    assert len(runs) == 1
    return client, runs[0]


def test_flow_trains_and_tracks_on_tiny_preset(tmp_path, tiny_model_path, mlflow_server, monkeypatch):
    art = tmp_path / "art"
    env = flow_env(tmp_path, str(art), mlflow_server)
    run, stdout = run_flow(tmp_path, env, steps=2, set=quick_set(tiny_model_path), training_id="tiny-local", quiet_steps=True)
    summary = run["end"].task.data.summary
    assert summary["training_id"] == "tiny-local"
    # every epoch step is its own Metaflow run, tagged and visible through the client
    from metaflow import Flow, namespace

    namespace(None)
    monkeypatch.setenv("METAFLOW_DATASTORE_SYSROOT_LOCAL", env["METAFLOW_DATASTORE_SYSROOT_LOCAL"])
    step_runs = list(Flow("SRPOStepFlow").runs("training_id:tiny-local"))
    assert sorted(int(next(t for t in r.tags if t.startswith("step:")).split(":")[1]) for r in step_runs) == [0, 1]
    assert all("method:srpo" in r.tags and "seed:0" in r.tags and r.successful for r in step_runs)
    # the store holds a verified manifest and a PEFT adapter per step; latest points at step 1
    store = S.open_store(str(art))
    for step in (0, 1):
        m = S.read_manifest(store, "tiny-local", step)
        paths = {f.path for f in m.files}
        assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors", "optimizer.pt", "rollouts.jsonl", "metrics.json"} <= paths
        assert m.parent_key == (S.step_prefix("tiny-local", step - 1) if step else None)
        assert m.data_cursor["step"] == step
        S.load_step(store, "tiny-local", step, tmp_path / f"ck{step}")
    assert S.get_latest_step(store, "tiny-local") == 1
    # MLflow: tags, params, per-step metrics, evaluations at step 0 (before) and 2 (after)
    client, r = mlflow_run(mlflow_server, "tiny-local")
    assert {"method": "srpo", "split": "1x4", "localizer": "self", "seed": "0"}.items() <= r.data.tags.items()
    assert r.data.params["method.method"] == "srpo" and r.data.params["lora.r"] == "8"
    hist = client.get_metric_history(r.info.run_id, "eval/synthetic/accuracy")
    assert sorted(m.step for m in hist) == [0, 2]
    for key in ("reward/base/mean", "localization/parse_rate", "grad_signal/both_groups_share", "time/generation", "time/learner", "generation/tokens_per_s", "time/orchestration_overhead"):
        assert key in r.data.metrics, key
    assert sorted(m.step for m in client.get_metric_history(r.info.run_id, "time/learner")) == [0, 1]
    assert any(a.path == "plots" for a in client.list_artifacts(r.info.run_id))


def test_flow_on_s3_datastore_with_versioned_latest(tmp_path, tiny_model_path, mlflow_server, s3_server, s3_bucket, monkeypatch):
    env = flow_env(tmp_path, f"s3://{s3_bucket}/art", mlflow_server, SRPO_S3_ENDPOINT_URL=s3_server, METAFLOW_S3_ENDPOINT_URL=s3_server, METAFLOW_DEFAULT_DATASTORE="s3", METAFLOW_DATASTORE_SYSROOT_S3=f"s3://{s3_bucket}/metaflow")
    monkeypatch.setenv("SRPO_S3_ENDPOINT_URL", s3_server)
    from srpo_core.metaflow_env import runner

    Runner = runner()

    with Runner(FLOW, show_output=False, env=env, cwd=str(tmp_path), datastore="s3", file_read_timeout=300) as runner:
        result = runner.run(steps=2, set=quick_set(tiny_model_path, "eval.every_steps=0 resources.shards=2"), training_id="tiny-s3", quiet_steps=True)
        # the status comes from the run's process: Metaflow's client in this process read its S3
        # settings at import time, so the run's artifacts are checked through boto3 below
        assert result.status == "successful", result.stdout[-3000:] + result.stderr[-3000:]
    store = S.open_store(f"s3://{s3_bucket}/art")
    versions = store.get_pointer_versions(S.latest_pointer_name("tiny-s3"))
    assert len(versions) == 2
    values = [store.get_pointer(S.latest_pointer_name("tiny-s3"), version_id=v.version_id) for v in versions]
    assert values == [S.step_prefix("tiny-s3", 1), S.step_prefix("tiny-s3", 0)]
    for step in (0, 1):
        S.load_step(store, "tiny-s3", step, tmp_path / f"s3ck{step}")
    # Metaflow's own artifacts went to the S3 datastore too
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="metaflow/").get("Contents", [])]
    assert any("SRPOStepFlow" in k for k in keys) and any("SRPOFlow" in k for k in keys)


def test_killed_training_resumes_without_repeating_or_skipping(tmp_path, tiny_model_path):
    art = tmp_path / "art"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = {**os.environ, **flow_env(tmp_path, str(art), uri)}
    cmd = [sys.executable, FLOW, "run", "--training-id", "tiny-resume", "--steps", "3", "--quiet-steps", "true", "--set", quick_set(tiny_model_path, "eval.every_steps=0")]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    store = S.open_store(str(art))
    work1 = "runs/tiny-resume/work/000001/"
    deadline = time.time() + 400
    try:
        while time.time() < deadline and not any("/verify-" in k for k in store.list(work1)):  # step 1 is mid-way
            assert proc.poll() is None, "training ended before it could be killed"
            time.sleep(0.5)
        assert time.time() < deadline, "step 1 never started"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert S.get_latest_step(store, "tiny-resume") == 0
    step0 = store.get_bytes(S.manifest_key("tiny-resume", 0))
    assert not store.exists(S.manifest_key("tiny-resume", 1))
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert store.get_bytes(S.manifest_key("tiny-resume", 0)) == step0  # step 0 not redone
    cfg = load_config(
        "tiny",
        {
            "model.name_or_path": tiny_model_path,
            "eval.items_per_benchmark": 30,
            "data.train_size": 32,
            "train.prompts_per_step": 8,
            "train.mini_batch_prompts": 8,
            "eval.every_steps": 0,
            "train.max_steps": 3,
        },
    )
    items = data_order.step_batches(32, 8, cfg.train.epochs, cfg.train.seed)
    from srpo_core.tasks import get_task

    ids = [it.id for it in get_task("synthetic").items("train", 32, cfg.data.data_seed)]
    for step in range(3):
        m = S.read_manifest(store, "tiny-resume", step)
        assert m.data_cursor["item_ids"] == [ids[i] for i in items[step]]  # data order unchanged
        assert m.parent_key == (S.step_prefix("tiny-resume", step - 1) if step else None)
        rows = [json.loads(l) for l in store.get_bytes(f"{S.step_prefix('tiny-resume', step)}/rollouts.jsonl").decode().splitlines()]
        assert {r["step"] for r in rows} == {step}
    assert S.get_latest_step(store, "tiny-resume") == 2
    client, r = mlflow_run(uri, "tiny-resume")
    assert sorted(m.step for m in client.get_metric_history(r.info.run_id, "time/learner")) == [0, 1, 2]


def test_bad_inputs_fail_fast_naming_the_thing(tmp_path, tiny_model_path):
    base = {**os.environ, **flow_env(tmp_path, str(tmp_path / "art"), f"sqlite:///{tmp_path}/m.db")}

    def run(extra_env=None, args=()):
        t = time.time()
        p = subprocess.run([sys.executable, FLOW, "run", "--quiet-steps", "true", *args], cwd=tmp_path, env={**base, **(extra_env or {})}, capture_output=True, text=True, timeout=120)
        return p.returncode, p.stdout + p.stderr, time.time() - t

    bad = tmp_path / "bad.yaml"
    bad.write_text("rollout:\n  temprature: 0.5\n")
    code, out, _ = run({"SRPO_CONFIG": str(bad)})
    assert code != 0 and "rollout.temprature: unknown key" in out
    code, out, _ = run(args=("--set", f"model.name_or_path={tiny_model_path} data.task=numinamath_olympiads data.path={tmp_path}/missing.jsonl"))
    assert code != 0 and "missing.jsonl" in out
    code, out, secs = run({"SRPO_ARTIFACT_ROOT": "s3://no-such-bucket/x", "SRPO_S3_ENDPOINT_URL": "http://127.0.0.1:9"}, ("--set", f"model.name_or_path={tiny_model_path}"))
    assert code != 0 and "127.0.0.1:9" in out and secs < 60
    code, out, secs = run({"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}, ("--set", f"model.name_or_path={tiny_model_path}"))
    assert code != 0 and "127.0.0.1:9" in out and secs < 60

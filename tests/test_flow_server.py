"""The flow with the inference-server option: the training starts one server (and one learner
worker) for all its epoch steps, the phase steps call it, each new adapter is hot-loaded and checked by the canary, and every rollout
records the adapter version it was sampled with. The learner step runs as 2 FSDP processes under
torchrun, and the canary compares the server with what those processes computed."""

import json
import os
import subprocess
import sys

import pytest

from srpo_core import store as S
from tests.test_flow import FLOW, flow_env, mlflow_run, quick_set, run_flow

pytestmark = pytest.mark.slow


def test_flow_with_inference_server(tmp_path, tiny_model_path):
    art = tmp_path / "art"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_flow(
        tmp_path,
        flow_env(tmp_path, str(art), uri),
        steps=2,
        set=quick_set(tiny_model_path, "rollout.server_url=auto eval.every_steps=0 train.processes=2"),
        training_id="tiny-server",
        quiet_steps=True,
    )
    store = S.open_store(str(art))
    for step, version in ((0, "base"), (1, "step-1")):
        rows = [json.loads(l) for l in store.get_bytes(f"{S.step_prefix('tiny-server', step)}/rollouts.jsonl").decode().splitlines()]
        assert rows and {r["adapter_version"] for r in rows} == {version}
    client, r = mlflow_run(uri, "tiny-server")
    canary = client.get_metric_history(r.info.run_id, "canary/max_abs_diff")
    assert sorted(m.step for m in canary) == [0, 1] and all(m.value <= 1e-4 for m in canary)
    procs = client.get_metric_history(r.info.run_id, "learner/processes")
    assert sorted(m.step for m in procs) == [0, 1] and all(m.value == 2 for m in procs)


def test_unreachable_server_fails_before_any_phase(tmp_path, tiny_model_path):
    env = {**os.environ, **flow_env(tmp_path, str(tmp_path / "art"), f"sqlite:///{tmp_path}/m.db")}
    p = subprocess.run(
        [sys.executable, FLOW, "run", "--quiet-steps", "true", "--set", quick_set(tiny_model_path, "rollout.server_url=http://127.0.0.1:9")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert p.returncode != 0 and "http://127.0.0.1:9" in p.stdout + p.stderr
    assert "/train_step/" not in p.stdout + p.stderr  # failed in start, before any epoch step
    assert not (tmp_path / "art" / "runs").exists()

"""Tests of srpo_core.tracking: pure helpers, and a real `mlflow server` (see tests/conftest_servers.py)."""

from __future__ import annotations

import math
import socket
import time
import uuid
from pathlib import Path

import pytest

from srpo_core import tracking as tr
from tests.conftest_servers import free_port


@pytest.fixture
def clean_mlflow(monkeypatch: pytest.MonkeyPatch):
    """Leave no active run, global tracking URI or MLFLOW_TRACKING_URI behind."""
    monkeypatch.delenv(tr.ENV_TRACKING_URI, raising=False)
    yield
    import mlflow

    tr.end_training_run()
    mlflow.set_tracking_uri(None)  # also unsets MLFLOW_TRACKING_URI; monkeypatch restores the original
    monkeypatch.setattr(tr, "_current_uri", None)


def test_default_tracking_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(tr.ENV_TRACKING_URI, raising=False)
    assert tr.resolve_tracking_uri() == f"sqlite:///{tmp_path}/mlflow.db"
    assert tr.check_tracking_reachable() == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv(tr.ENV_TRACKING_URI, "http://mlflow.example:5000")
    assert tr.resolve_tracking_uri() == "http://mlflow.example:5000"
    assert tr.resolve_tracking_uri("sqlite:///x.db") == "sqlite:///x.db"


def test_flatten_config() -> None:
    long_a, long_b = "a" * 700, "a" * 699 + "b"
    flat = tr.flatten_config(
        {"model": {"name": "tiny", "lora": {"r": 8, "targets": ["q_proj", "v_proj"]}}, "lr": 1e-5,
         "empty": {}, "none": None, "flag": True, "bad key!": 1, "long_a": long_a, "long_b": long_b}
    )
    assert flat["model.name"] == "tiny"
    assert flat["model.lora.r"] == "8"
    assert flat["model.lora.targets"] == '["q_proj","v_proj"]'
    assert flat["lr"] == "1e-05"
    assert (flat["empty"], flat["none"], flat["flag"]) == ("{}", "None", "True")
    assert flat["bad key_"] == "1"
    assert len(flat["long_a"]) == 500 and flat["long_a"] != flat["long_b"]
    assert all(isinstance(v, str) for v in flat.values())
    assert tr.flatten_config({"x": "y" * 1000}, max_value_len=6000)["x"] == "y" * 1000


def test_unreachable_tracking_server_fails_fast() -> None:
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(tr.TrackingUnreachableError, match=uri):
        tr.check_tracking_reachable(uri)
    assert time.monotonic() - start < 5


def test_silent_tracking_server_times_out() -> None:
    with socket.socket() as sock:  # accepts connections (backlog) but never answers
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        uri = f"http://127.0.0.1:{sock.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(tr.TrackingUnreachableError, match=uri):
            tr.check_tracking_reachable(uri, timeout=1.0)
        assert time.monotonic() - start < 5


def test_log_without_active_run_is_clear(clean_mlflow) -> None:
    with pytest.raises(RuntimeError, match="start_training_run"):
        tr.log_step_metrics({"loss": 1.0}, step=0)


@pytest.mark.slow
def test_run_on_real_server(mlflow_server: str, clean_mlflow) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow.tracking import MlflowClient

    assert tr.check_tracking_reachable(mlflow_server) == mlflow_server
    test_id = uuid.uuid4().hex
    params = {"algo": "srpo", "optim": {"lr": 1e-5, "betas": [0.9, 0.99]}, "notes": "x" * 2000}
    with tr.start_training_run("srpo-tests", run_name="tiny", tags={"srpo.test_id": test_id},
                               params=params, tracking_uri=mlflow_server) as run:
        assert not run.resumed
        with pytest.warns(UserWarning, match="nan_metric"):
            logged = tr.log_step_metrics({"loss": 0.5, "nan_metric": math.nan, "inf": math.inf}, step=1)
        assert logged == 1
        tr.log_step_metrics({"loss": 0.25, **{f"m{i}": float(i) for i in range(1200)}}, step=2)  # 2 batches
        tr.log_eval({"synthetic": 0.75, "gsm8k": 0.5}, step=3)
        fig, ax = plt.subplots()
        ax.plot([0, 1], [1, 0])
        assert tr.log_figure(fig, "plots/reward") == "plots/reward.png"
        plt.close(fig)
        assert tr.log_table([{"benchmark": "synthetic", "accuracy": 0.75}, {"benchmark": "a|b", "accuracy": 0.5}],
                            "eval_step3") == ("tables/eval_step3.csv", "tables/eval_step3.md")

    # resume the same run from a "later Metaflow step"
    resumed = tr.start_training_run("srpo-tests", params=params, tags={"stage": "eval"}, run_id=run.run_id,
                                    tracking_uri=mlflow_server)
    assert resumed.resumed and resumed.run_id == run.run_id
    tr.log_eval({"synthetic": 0.875}, step=4)
    tr.end_training_run()
    with pytest.raises(tr.ParamConflictError, match="algo"):
        tr.start_training_run("srpo-tests", params={**params, "algo": "grpo"}, run_id=run.run_id,
                              tracking_uri=mlflow_server)

    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("srpo-tests")
    found = client.search_runs([exp.experiment_id], filter_string=f"tags.`srpo.test_id` = '{test_id}'")
    assert [r.info.run_id for r in found] == [run.run_id]
    data = found[0].data
    assert data.params["algo"] == "srpo" and data.params["optim.lr"] == "1e-05"
    assert data.params["optim.betas"] == "[0.9,0.99]" and len(data.params["notes"]) == 500
    assert data.tags["stage"] == "eval" and found[0].info.status == "FINISHED"
    assert data.metrics["eval/gsm8k/accuracy"] == 0.5
    assert "nan_metric" not in data.metrics and "inf" not in data.metrics
    history = client.get_metric_history(run.run_id, "eval/synthetic/accuracy")
    assert sorted((m.step, m.value) for m in history) == [(3, 0.75), (4, 0.875)]
    assert len([k for k in data.metrics if k.startswith("m")]) == 1200

    artifacts = {a.path for a in client.list_artifacts(run.run_id, "plots")}
    artifacts |= {a.path for a in client.list_artifacts(run.run_id, "tables")}
    assert artifacts == {"plots/reward.png", "tables/eval_step3.csv", "tables/eval_step3.md"}
    md = Path(client.download_artifacts(run.run_id, "tables/eval_step3.md")).read_text()
    assert "| a\\|b | 0.5 |" in md


def test_experiments_open_in_the_model_training_view(mlflow_server, clean_mlflow) -> None:
    """MLflow 3's UI picks its GenAI or model-training view from the `mlflow.experimentKind`
    experiment tag: every experiment srpo creates or logs into carries the training kind."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    name = f"kind-{uuid.uuid4().hex[:8]}"
    run = tr.start_training_run(name, tracking_uri=mlflow_server)
    tr.end_training_run()
    exp = client.get_experiment(run.experiment_id)
    assert exp.tags[tr.EXPERIMENT_KIND_TAG] == "custom_model_development"
    # an experiment made elsewhere, without a kind, is tagged on first use; an explicit kind is kept
    plain = client.create_experiment(f"plain-{uuid.uuid4().hex[:8]}")
    assert tr.ensure_experiment(client, client.get_experiment(plain).name) == plain
    assert client.get_experiment(plain).tags[tr.EXPERIMENT_KIND_TAG] == "custom_model_development"
    genai = client.create_experiment(f"genai-{uuid.uuid4().hex[:8]}", tags={tr.EXPERIMENT_KIND_TAG: "genai_development"})
    tr.ensure_experiment(client, client.get_experiment(genai).name)
    assert client.get_experiment(genai).tags[tr.EXPERIMENT_KIND_TAG] == "genai_development"
    assert tr.experiment_url(mlflow_server, plain) == f"{mlflow_server}/#/experiments/{plain}?workflowType=machine_learning"
    assert tr.experiment_url("sqlite:///x.db", plain) is None

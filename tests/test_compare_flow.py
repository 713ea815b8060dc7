"""flows/compare_flow.py with Metaflow's Runner: an experiment design (`--preset`) as a fan-out of
trainings whose join writes the design's report, as `srpo compare --preset` does in process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FLOW = str(ROOT / "flows" / "compare_flow.py")
pytestmark = pytest.mark.slow


def test_the_compare_flow_runs_an_experiment_design_and_writes_its_report(tmp_path, mlflow_server):
    import mlflow

    from tests.test_flow import run_flow

    env = {"USERNAME": "srpo-tests", "MLFLOW_TRACKING_URI": mlflow_server, "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(tmp_path / "mf"), "SRPO_CONFIG": "tiny"}
    out, report = tmp_path / "out", tmp_path / "docs" / "fidelity.md"
    run, _ = run_flow(
        tmp_path, env, FLOW, preset="fidelity", methods="grpo,srpo", seeds="0", steps=1, eval_items=16, set="train.prompts_per_step=4 train.mini_batch_prompts=4",
        out=str(out), report=str(report), experiment="fidelity-flow-test",
    )  # fmt: skip
    md = report.read_text()
    assert "## Claims" in md and "GRPO" in md and "SRPO" in md
    assert (tmp_path / "docs" / "fidelity").is_dir() and any((tmp_path / "docs" / "fidelity").iterdir())  # its figures
    info = json.loads((out / "experiment.json").read_text())
    assert "compare_flow.py" in info["command"] and "--preset" in info["command"]
    assert info["comparison_id"] == f"cmp-mf{run.id}" and info["wall_s"] > 0
    assert sorted(v["arm"] for v in info["trainings"].values()) == sorted(a["key"] for a in info["arms"])
    assert len(list(run["train"].tasks())) == len(info["trainings"]) == len(info["arms"])  # one training per arm x seed, fanned out
    tags = mlflow.MlflowClient(tracking_uri=mlflow_server).get_run(info["parent_run_id"]).data.tags
    assert tags["experiment"] == "fidelity"
    assert "report" in run["end"].task.data.report_md

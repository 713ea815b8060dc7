"""The sbatch wrappers on a real SLURM: a one-node cluster on loopback with two fake A100s
(tests/slurm_cluster.py). Most jobs launch ``tests/slurm_cluster.py flow-shim``, which accepts the
parameters of ``python flows/srpo_flow.py run`` and runs the plain trainer (``srpo train``) on the
tiny preset for one step (about 20 s a job); ``test_train_sbatch_runs_the_real_flow`` (about
30 s) leaves SRPO_CMD unset and runs the flow itself inside the allocation.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.slurm_cluster import free_port, pid_alive

REPO = Path(__file__).resolve().parents[1]
SHIM = REPO / "tests" / "slurm_cluster.py"
JOB_TIMEOUT_S = 1500  # one tiny training step + two 20-item evaluations, on a busy shared 2-core machine


@pytest.fixture(scope="module")
def tiny_args(tiny_model_path) -> tuple[str, ...]:
    """Flow arguments for a one-step tiny training (the model resolved once, like the other tests)."""
    return ("--steps", "1", "--set", f"model.name_or_path={tiny_model_path} eval.items_per_benchmark=20")

pytestmark = pytest.mark.slow


def job_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "SRPO_ARTIFACT_ROOT": str(tmp_path / "artifacts"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "SRPO_REPO": str(REPO),
        "SRPO_CONFIG": "tiny",
        "SRPO_CMD": f"{sys.executable} {SHIM} flow-shim",
        **extra,
    }


def single(records: list[dict[str, str]]) -> dict[str, str]:
    assert len(records) == 1, records
    return records[0]


def read_invocation(tmp_path: Path, training_id: str) -> dict:
    return json.loads((tmp_path / "artifacts" / training_id / "invocation.json").read_text())


def test_failed_launch_is_a_failed_job(slurm_cluster, tmp_path):
    (tmp_path / "logs").mkdir()
    job = slurm_cluster.sbatch(["--chdir", str(tmp_path), "-c1", "--mem=1G", str(REPO / "slurm" / "train.sbatch")],
                               env=job_env(tmp_path, SRPO_CMD="bash -c 'echo flow failing; exit 3'"))
    rec = single(slurm_cluster.wait(job, timeout=120))
    assert rec["JobState"] == "FAILED" and rec["ExitCode"] == "3:0", rec
    assert "flow failing" in Path(rec["StdOut"]).read_text()


def test_missing_variable_refused_at_submission(slurm_cluster, tmp_path):
    env = {**slurm_cluster.env, **job_env(tmp_path)}
    env.pop("MLFLOW_TRACKING_URI")
    proc = subprocess.run(["bash", str(REPO / "slurm" / "train.sbatch")], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "MLFLOW_TRACKING_URI" in proc.stderr
    assert "Submitted" not in proc.stdout
    assert slurm_cluster.run(["squeue", "-h"]).stdout.strip() == ""


def test_multigpu_server_and_learner_use_the_allocations_gpus(slurm_cluster, tmp_path, tiny_args):
    """The real inference server (python -m srpo_core.server, hf engine on CPU here instead of vLLM)
    starts inside the allocation, the flow starts once it is ready, and it is stopped at the end."""
    (tmp_path / "logs").mkdir()
    env = job_env(tmp_path, SRPO_SHIM_RECORD_ONLY="1", SRPO_SERVER_PORT=str(free_port()),
                  SRPO_SERVER_ARGS="--engine hf --device cpu --threads 1", SRPO_SERVER_TIMEOUT="600")
    job = slurm_cluster.sbatch(["--chdir", str(tmp_path), "--gres=gpu:a100:2", "-c1", "--mem=2G",
                                str(REPO / "slurm" / "train_multigpu.sbatch"), *tiny_args], env=env)
    rec = single(slurm_cluster.wait(job, timeout=900))
    log = Path(rec["StdOut"])
    text = log.read_text() if log.exists() else ""
    assert rec["JobState"] == "COMPLETED", (rec, text[-3000:])
    assert log == tmp_path / "logs" / f"srpo-train-mgpu-{job}.out"
    flow = read_invocation(tmp_path, f"srpo-train-mgpu-{job}")
    assert flow["env"]["CUDA_VISIBLE_DEVICES"] == "0,1" and flow["env"]["SLURM_GPUS_ON_NODE"] == "2"
    assert flow["env"]["SRPO_TENSOR_PARALLEL_SIZE"] == "2"
    assert flow["inference_ready_status"] == 200, "the flow starts once the server is ready"
    assert "--tensor-parallel-size 2" in text and f"--model {tiny_args[3].split()[0].split('=', 1)[1]}" in text
    sets = flow["argv"][flow["argv"].index("--set") + 1]
    assert sets.endswith(f"rollout.server_url={flow['env']['SRPO_INFERENCE_URL']} train.processes=2"), "the flow generates through the server, learns on both GPUs"
    server_log = (tmp_path / "logs" / f"srpo-train-mgpu-{job}.server.log").read_text()
    assert "listening on" in server_log, server_log[-2000:]
    pid = int(re.search(r"inference server pid (\d+)", text).group(1))
    assert "stopping the inference server" in text
    assert not pid_alive(pid), "the server must be stopped when the job ends"


def check_training_output(out: Path, method: str, seed: int) -> None:
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == method and summary["steps"] == 1
    records = [json.loads(line) for line in (out / "steps" / "000000" / "rollouts.jsonl").read_text().splitlines()]
    assert records and all(r["step"] == 0 for r in records)
    groups = {r["group"] for r in records}
    assert groups <= ({"base"} if method == "grpo" else {"base", "shared_prefix", "fallback", "seed"}), groups
    import yaml

    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["method"]["method"] == method and config["train"]["seed"] == seed


def test_train_sbatch_runs_a_training_on_a_gpu_node(slurm_cluster, tmp_path, tiny_args):
    (tmp_path / "logs").mkdir()  # as users do before a plain sbatch: SLURM does not create it
    job = slurm_cluster.sbatch(["--chdir", str(tmp_path), "--gres=gpu:a100:1", "-c1", "--mem=2G",
                                str(REPO / "slurm" / "train.sbatch"), "--method", "srpo", "--seed", "0", *tiny_args],
                               env=job_env(tmp_path))
    rec = single(slurm_cluster.wait(job, timeout=JOB_TIMEOUT_S))
    log = Path(rec["StdOut"])
    assert log == tmp_path / "logs" / f"srpo-train-{job}.out"
    text = log.read_text()
    assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0", (rec, text[-3000:])
    assert f"train.sbatch: job {job} on localhost gpus=1 (CUDA_VISIBLE_DEVICES=0)" in text
    assert "accuracy before:" in text and "after:" in text
    training_id = f"srpo-train-{job}"
    check_training_output(tmp_path / "artifacts" / training_id, "srpo", 0)
    flow = read_invocation(tmp_path, training_id)
    assert flow["argv"][:3] == ["run", "--training-id", training_id] and flow["env"]["SRPO_CONFIG"] == "tiny"
    assert flow["env"]["MLFLOW_TRACKING_URI"].startswith("sqlite:///") and flow["env"]["METAFLOW_DEFAULT_DATASTORE"] == "local"
    assert flow["env"]["OMP_NUM_THREADS"] == "1" and flow["cwd"] == str(REPO)


def test_compare_array_runs_each_method_and_seed(slurm_cluster, tmp_path, tiny_args):
    env = {**slurm_cluster.env, **job_env(tmp_path, SRPO_METHODS="grpo srpo", SRPO_SEEDS="0", SRPO_SBATCH_ARGS="-c1 --mem=2G")}
    # run directly: the wrapper checks its variables, creates logs/ and submits itself with --array=0-1
    proc = subprocess.run(["bash", str(REPO / "slurm" / "compare.sbatch"), *tiny_args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    job = re.search(r"Submitted batch job (\d+)", proc.stdout).group(1)
    records = slurm_cluster.wait(job, timeout=JOB_TIMEOUT_S, expect_tasks=2)
    by_task = {r["ArrayTaskId"]: r for r in records}
    assert sorted(by_task) == ["0", "1"], records
    for task, (method, seed) in {"0": ("grpo", 0), "1": ("srpo", 0)}.items():
        rec = by_task[task]
        log = tmp_path / "logs" / f"srpo-compare-{job}_{task}.out"
        assert Path(rec["StdOut"]) == log
        text = log.read_text()
        assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0", (rec, text[-3000:])
        assert f"method={method} seed={seed}" in text
        training_id = f"srpo-compare-{job}-{method}-s{seed}"
        check_training_output(tmp_path / "artifacts" / training_id, method, seed)
        argv = read_invocation(tmp_path, training_id)["argv"]
        assert argv[argv.index("--method") + 1] == method and argv[argv.index("--seed") + 1] == str(seed)


def test_train_sbatch_runs_the_real_flow(slurm_cluster, tmp_path, tiny_args, mlflow_server):
    """SRPO_CMD unset: the wrapper's default command, python flows/srpo_flow.py, one epoch step of the
    tiny preset with the local Metaflow runtime inside the allocation, tracking to an MLflow server."""
    (tmp_path / "logs").mkdir()
    env = job_env(tmp_path, METAFLOW_DATASTORE_SYSROOT_LOCAL=str(tmp_path / "metaflow"), MLFLOW_TRACKING_URI=mlflow_server)
    env.pop("SRPO_CMD")
    job = slurm_cluster.sbatch(["--chdir", str(tmp_path), "--gres=gpu:a100:1", "-c1", "--mem=4G",
                                str(REPO / "slurm" / "train.sbatch"), "--method", "srpo", "--seed", "0", *tiny_args], env=env)
    rec = single(slurm_cluster.wait(job, timeout=JOB_TIMEOUT_S))
    text = Path(rec["StdOut"]).read_text()
    assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0", (rec, text[-4000:])
    assert f"+ python flows/srpo_flow.py run --training-id srpo-train-{job}" in text and "Done!" in text
    assert (tmp_path / "artifacts" / "runs" / f"srpo-train-{job}" / "steps" / "000000").is_dir()
    from mlflow.tracking import MlflowClient

    runs = MlflowClient(tracking_uri=mlflow_server).search_runs(
        [e.experiment_id for e in MlflowClient(tracking_uri=mlflow_server).search_experiments()],
        filter_string=f"tags.training_id = 'srpo-train-{job}'")
    assert runs, "the training's MLflow run"
    assert any(k.startswith("eval/") and k.endswith("/accuracy") for k in runs[0].data.metrics), runs[0].data.metrics

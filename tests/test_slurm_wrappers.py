"""The sbatch wrappers without a cluster: syntax, sections, golden headers and launch lines, refusals,
the methods x seeds mapping, and the inference-server lifecycle of train_multigpu.sbatch (run with
bash inside a pretend allocation: SLURM_JOB_ID set, a fake server from tests/slurm_cluster.py).

Golden files: tests/golden/slurm_<wrapper>.txt. After a deliberate change to a wrapper, rewrite
them with ``SRPO_UPDATE_GOLDEN=1 python -m pytest tests/test_slurm_wrappers.py`` and review the diff.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.slurm_cluster import free_port, pid_alive

REPO = Path(__file__).resolve().parents[1]
SLURM_DIR = REPO / "slurm"
GOLDEN = REPO / "tests" / "golden"
SHIM = REPO / "tests" / "slurm_cluster.py"
WRAPPERS = ("train.sbatch", "compare.sbatch", "train_multigpu.sbatch")
SECTIONS = ("# --- SBATCH ---", "# --- environment ---", "# --- launch ---")
REQUIRED = ("SRPO_ARTIFACT_ROOT", "MLFLOW_TRACKING_URI")
BASH = shutil.which("bash")

pytestmark = pytest.mark.skipif(BASH is None, reason="bash is needed to run the sbatch wrappers")


def clean_env(**extra: str) -> dict[str, str]:
    """os.environ without anything SLURM/SRPO/Metaflow/MLflow, plus ``extra``."""
    drop = ("SLURM_", "SBATCH_", "SRPO_", "METAFLOW_", "MLFLOW_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(extra)
    return env


def base_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return clean_env(**{"SRPO_ARTIFACT_ROOT": str(tmp_path / "artifacts"), "MLFLOW_TRACKING_URI": "http://mlflow.test:5000", **extra})


def allocation_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A pretend allocation: the variables slurmd sets that the wrappers read."""
    return base_env(tmp_path, **{"SLURM_JOB_ID": "1234", "SLURM_SUBMIT_DIR": str(tmp_path), "SRPO_REPO": str(REPO), **extra})


def run_wrapper(name: str, env: dict[str, str], *args: str, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    cwd = cwd or env.get("SLURM_SUBMIT_DIR")  # a job starts in its submit directory (or --chdir)
    assert cwd, "run wrappers in a temp directory: they create logs/ where they start"
    return subprocess.run([BASH, str(SLURM_DIR / name), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def shown_commands(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("+ ")]


# --- structure -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", WRAPPERS)
def test_wrapper_syntax(name):
    proc = subprocess.run([BASH, "-n", str(SLURM_DIR / name)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert subprocess.run([BASH, "-n", str(SLURM_DIR / "common.sh")], capture_output=True, text=True).returncode == 0


@pytest.mark.parametrize("name", WRAPPERS)
def test_wrapper_sections(name):
    lines = (SLURM_DIR / name).read_text().splitlines()
    assert lines[0] == "#!/bin/bash"
    positions = [lines.index(label) for label in SECTIONS]
    assert positions == sorted(positions), f"{name}: sections out of order"
    sbatch_lines = [i for i, line in enumerate(lines) if line.startswith("#SBATCH")]
    assert sbatch_lines and all(positions[0] < i < positions[1] for i in sbatch_lines), "#SBATCH lines belong in the SBATCH section"
    # sbatch stops reading directives at the first command: nothing but comments before them
    assert all(not line.strip() or line.startswith("#") for line in lines[: sbatch_lines[-1]])
    launch = "\n".join(lines[positions[2]:])
    text = "\n".join(lines)
    # arguments pass through to the flow: "$@" -> srpo_args (its --set merged) -> the launch line
    assert re.search(r'^srpo_merge_sets srpo_args .*-- "\$@"', text, re.M), "arguments must pass through to the flow"
    assert re.search(r'^srpo_launch run .*"\$\{srpo_args\[@\]\}"$', launch, re.M)
    log_pattern = "logs/%x-%A_%a.out" if name == "compare.sbatch" else "logs/%x-%j.out"
    assert f"#SBATCH --output={log_pattern}" in lines


def sbatch_header(name: str) -> list[str]:
    return [line for line in (SLURM_DIR / name).read_text().splitlines() if line.startswith("#SBATCH")]


def job_name(name: str) -> str:
    return next(line.split("=", 1)[1] for line in sbatch_header(name) if line.startswith("#SBATCH --job-name="))


def render(name: str, tmp_path: Path) -> str:
    """The wrapper as the golden file records it: SBATCH header, then the commands it would run in
    a fixed pretend allocation (and the sbatch line it submits itself with), paths normalised."""
    out = [f"# {name}: SBATCH header", *sbatch_header(name)]
    fixed = dict(SRPO_DRY_RUN="1", SLURM_JOB_NAME=job_name(name), SLURM_GPUS_ON_NODE="4", SLURM_ARRAY_JOB_ID="1230", TMPDIR=str(tmp_path / "tmp"))
    args = ("--split", "1x4", "--set", "model.name_or_path=/models/Qwen2.5-14B-Instruct", "--set=eval.every_steps=2")
    if name == "compare.sbatch":
        for task in range(9):
            proc = run_wrapper(name, allocation_env(tmp_path, SLURM_ARRAY_TASK_ID=str(task), **fixed), *args)
            assert proc.returncode == 0, proc.stderr
            out += [f"# launch, SLURM_ARRAY_TASK_ID={task}", *shown_commands(proc.stdout)]
    else:
        proc = run_wrapper(name, allocation_env(tmp_path, **fixed), *args)
        assert proc.returncode == 0, proc.stderr
        out += ["# launch (SLURM_JOB_ID=1234, 4 GPUs)", *shown_commands(proc.stdout)]
    proc = run_wrapper(name, base_env(tmp_path, SRPO_DRY_RUN="1"), *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out += ["# outside an allocation: submits itself", *shown_commands(proc.stdout)]
    return "\n".join(out).replace(str(REPO), "<repo>").replace(str(tmp_path), "<tmp>") + "\n"


@pytest.mark.parametrize("name", WRAPPERS)
def test_wrapper_matches_golden(name, tmp_path):
    rendered = render(name, tmp_path)
    golden = GOLDEN / f"slurm_{name.replace('.', '_')}.txt"
    if os.environ.get("SRPO_UPDATE_GOLDEN") == "1":
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(rendered)
    assert golden.exists(), f"{golden} missing: run with SRPO_UPDATE_GOLDEN=1 to create it"
    assert rendered == golden.read_text(), f"{name} changed; if deliberate, SRPO_UPDATE_GOLDEN=1 and review the diff"


# --- refusals ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", WRAPPERS)
@pytest.mark.parametrize("missing", REQUIRED)
def test_missing_variable_refused_before_anything(name, missing, tmp_path):
    env = base_env(tmp_path, SLURM_JOB_ID="1234", SLURM_GPUS_ON_NODE="2", SRPO_CMD=f"touch {tmp_path / 'launched'}",
                   SRPO_SERVER_CMD=f"touch {tmp_path / 'server'}")
    env.pop(missing)
    proc = run_wrapper(name, env, cwd=tmp_path)
    assert proc.returncode == 2
    assert missing in proc.stderr and "not set" in proc.stderr
    assert not (tmp_path / "launched").exists() and not (tmp_path / "server").exists()
    assert not (tmp_path / "logs").exists()  # nothing submitted, nothing created


@pytest.mark.parametrize("name", WRAPPERS)
def test_s3_datastore_needs_its_root(name, tmp_path):
    env = base_env(tmp_path, SRPO_ARTIFACT_ROOT="s3://bucket/srpo", SRPO_DRY_RUN="1")
    proc = run_wrapper(name, env, cwd=tmp_path)
    assert proc.returncode == 2 and "METAFLOW_DATASTORE_SYSROOT_S3" in proc.stderr
    env["METAFLOW_DATASTORE_SYSROOT_S3"] = "s3://bucket/metaflow"
    proc = run_wrapper(name, env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


def test_s3_endpoint_reaches_metaflow_and_mlflow(tmp_path):
    record = tmp_path / "env.txt"
    env = allocation_env(tmp_path, SRPO_S3_ENDPOINT_URL="http://minio.test:9000", METAFLOW_DATASTORE_SYSROOT_S3="s3://b/mf",
                         SRPO_CMD=f"{BASH} -c 'env > {record}'")
    proc = run_wrapper("train.sbatch", env)
    assert proc.returncode == 0, proc.stderr
    seen = dict(line.split("=", 1) for line in record.read_text().splitlines() if "=" in line)
    assert seen["METAFLOW_S3_ENDPOINT_URL"] == seen["MLFLOW_S3_ENDPOINT_URL"] == "http://minio.test:9000"
    assert seen["METAFLOW_DEFAULT_DATASTORE"] == "s3" and seen["METAFLOW_DATASTORE_SYSROOT_S3"] == "s3://b/mf"
    assert seen["USERNAME"] and seen["PYTHONUNBUFFERED"] == "1"


@pytest.mark.parametrize("methods,seeds,message", [
    ("grpo ppo", "0", "unknown method 'ppo'"),
    ("grpo", "0 x", "'x' is not a non-negative integer"),
    ("", "0", "SRPO_METHODS is empty"),
])
def test_compare_refuses_bad_grid(methods, seeds, message, tmp_path):
    proc = run_wrapper("compare.sbatch", base_env(tmp_path, SRPO_METHODS=methods, SRPO_SEEDS=seeds, SRPO_DRY_RUN="1"), cwd=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr


def test_compare_task_out_of_range_and_non_array(tmp_path):
    env = allocation_env(tmp_path, SRPO_METHODS="grpo srpo", SRPO_SEEDS="0", SRPO_DRY_RUN="1")
    proc = run_wrapper("compare.sbatch", {**env, "SLURM_ARRAY_TASK_ID": "2"})
    assert proc.returncode == 2 and "SLURM_ARRAY_TASK_ID=2 is out of range" in proc.stderr and "--array=0-1" in proc.stderr
    proc = run_wrapper("compare.sbatch", env)
    assert proc.returncode == 2 and "submit as an array job" in proc.stderr


def test_compare_self_submission_sizes_the_array(tmp_path):
    env = base_env(tmp_path, SRPO_METHODS="grpo rrpo srpo", SRPO_SEEDS="0 42", SRPO_DRY_RUN="1", SRPO_SBATCH_ARGS="-c1 --mem='2 G'")
    proc = run_wrapper("compare.sbatch", env, "--set", "a=b c", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert shown_commands(proc.stdout) == [f"+ sbatch --array=0-5 -c1 --mem=2\\ G {SLURM_DIR}/compare.sbatch --set a=b\\ c"]


def test_compare_mapping_covers_the_grid(tmp_path):
    seen = []
    for task in range(6):
        env = allocation_env(tmp_path, SRPO_METHODS="grpo rrpo srpo", SRPO_SEEDS="0 42", SRPO_DRY_RUN="1", SLURM_ARRAY_TASK_ID=str(task), SLURM_ARRAY_JOB_ID="77")
        proc = run_wrapper("compare.sbatch", env)
        assert proc.returncode == 0, proc.stderr
        line = shown_commands(proc.stdout)[0]
        method, seed = re.search(r"--method (\w+) --seed (\d+)", line).groups()
        assert f"--training-id srpo-compare-77-{method}-s{seed}" in line
        seen.append((method, int(seed)))
    assert seen == [(m, s) for m in ("grpo", "rrpo", "srpo") for s in (0, 42)]


def test_arguments_pass_through_and_sets_merge(tmp_path):
    """Arguments reach the flow intact; several --set (the contract's repeatable style, or the
    flow's one string) become the flow's single --set, or Metaflow would keep only the last."""
    record = tmp_path / "argv.json"
    env = allocation_env(tmp_path, SRPO_CMD=f"{sys.executable} -c 'import json,sys; json.dump(sys.argv[1:], open(\"{record}\", \"w\"))'")
    proc = run_wrapper("train.sbatch", env, "--set", "model.name_or_path='/models/a b'", "--method", "srpo", "--set=eval.every_steps=2 lora.r=16")
    assert proc.returncode == 0, proc.stderr
    argv = json.loads(record.read_text())
    assert argv == ["run", "--training-id", "srpo-train-1234", "--method", "srpo", "--set", "model.name_or_path='/models/a b' eval.every_steps=2 lora.r=16"]
    assert shlex.split(argv[-1]) == ["model.name_or_path=/models/a b", "eval.every_steps=2", "lora.r=16"]  # as the flow splits it


def test_config_defaults_to_paper_and_reaches_the_flow(tmp_path):
    record = tmp_path / "env.txt"
    env = allocation_env(tmp_path, SRPO_CMD=f"{BASH} -c 'echo $SRPO_CONFIG > {record}'")
    assert run_wrapper("train.sbatch", env).returncode == 0
    assert record.read_text().strip() == "paper"
    assert run_wrapper("train.sbatch", {**env, "SRPO_CONFIG": "tiny"}).returncode == 0
    assert record.read_text().strip() == "tiny"


def test_launch_failure_is_the_job_status(tmp_path):
    proc = run_wrapper("train.sbatch", allocation_env(tmp_path, SRPO_CMD=f"{BASH} -c 'exit 7'"))
    assert proc.returncode == 7


# --- train_multigpu.sbatch: the inference server's lifecycle ---------------------------------------------
def mgpu_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    settings = dict(
        SLURM_JOB_NAME="srpo-train-mgpu", SLURM_GPUS_ON_NODE="2", SRPO_CONFIG="tiny",
        SRPO_SERVER_CMD=f"{sys.executable} {SHIM} fake-server", SRPO_SERVER_PORT=str(free_port()),
        SRPO_FAKE_SERVER_RECORD=str(tmp_path / "server.json"), SRPO_CMD=f"{sys.executable} {SHIM} flow-shim",
        SRPO_SHIM_RECORD_ONLY="1")
    return allocation_env(tmp_path, **{**settings, **extra})


def test_multigpu_starts_waits_for_and_stops_the_server(tmp_path):
    proc = run_wrapper("train_multigpu.sbatch", mgpu_env(tmp_path, SRPO_FAKE_SERVER_DELAY="2"),
                       "--set", "eval.items_per_benchmark=20", "--set=lora.r=16", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    server = json.loads((tmp_path / "server.json").read_text())
    argv = server["argv"]
    opt = {k: v for k, v in zip(argv, argv[1:]) if k.startswith("--")}
    assert opt["--tensor-parallel-size"] == "2" and opt["--engine"] == "vllm"
    # the model settings of the tiny preset, with the run's overrides
    assert opt["--model"] == "builtin:tiny-arith" and opt["--dtype"] == "float32" and opt["--max-lora-rank"] == "16"
    assert server["pgid"] == server["pid"], "the server runs in its own process group"
    assert not pid_alive(server["pid"]), "the server must be stopped when the job ends"
    flow = json.loads((tmp_path / "artifacts" / "srpo-train-mgpu-1234" / "invocation.json").read_text())
    assert flow["inference_ready_status"] == 200, "the flow starts only once the server is ready"
    assert flow["env"]["SRPO_INFERENCE_URL"].startswith("http://127.0.0.1:")
    sets = flow["argv"][flow["argv"].index("--set") + 1]
    assert sets == f"eval.items_per_benchmark=20 lora.r=16 rollout.server_url={flow['env']['SRPO_INFERENCE_URL']} train.processes=2"
    assert flow["env"]["SRPO_TENSOR_PARALLEL_SIZE"] == "2"
    assert (tmp_path / "logs" / "srpo-train-mgpu-1234.server.log").read_text().count("GET /ready") >= 1


def test_multigpu_server_that_dies_fails_the_job(tmp_path):
    proc = run_wrapper("train_multigpu.sbatch", mgpu_env(tmp_path, SRPO_FAKE_SERVER_FAIL="1"), timeout=60)
    assert proc.returncode == 1
    assert "exited (status 3) before it was ready" in proc.stderr and "failing on purpose" in proc.stderr
    assert not (tmp_path / "artifacts").exists(), "the flow must not start without a server"


def test_multigpu_server_never_ready_times_out_and_is_killed(tmp_path):
    proc = run_wrapper("train_multigpu.sbatch", mgpu_env(tmp_path, SRPO_FAKE_SERVER_DELAY="never", SRPO_SERVER_TIMEOUT="3"), timeout=60)
    assert proc.returncode == 1 and "not ready after 3 s" in proc.stderr
    assert not pid_alive(json.loads((tmp_path / "server.json").read_text())["pid"])


def test_multigpu_flow_failure_still_stops_the_server(tmp_path):
    env = mgpu_env(tmp_path, SRPO_CMD=f"{BASH} -c 'exit 5'")
    proc = run_wrapper("train_multigpu.sbatch", env, timeout=60)
    assert proc.returncode == 5
    assert not pid_alive(json.loads((tmp_path / "server.json").read_text())["pid"])


def test_multigpu_cancel_stops_the_server(tmp_path):
    """scancel sends SIGTERM to the batch shell: the EXIT trap must still stop the server."""
    started = tmp_path / "flow-started"
    env = mgpu_env(tmp_path, SRPO_CMD=f"{BASH} -c 'touch {started}; sleep 60'")
    wrapper = subprocess.Popen([BASH, str(SLURM_DIR / "train_multigpu.sbatch")], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not started.exists() and wrapper.poll() is None:
        time.sleep(0.2)
    assert started.exists(), "the flow did not start"
    record = tmp_path / "server.json"
    os.killpg(wrapper.pid, signal.SIGTERM)  # like SLURM: every process of the job gets SIGTERM
    out, _ = wrapper.communicate(timeout=60)
    assert wrapper.returncode != 0
    assert not pid_alive(json.loads(record.read_text())["pid"]), out


def test_multigpu_bad_config_refused_before_the_server(tmp_path):
    proc = run_wrapper("train_multigpu.sbatch", mgpu_env(tmp_path), "--set", "lora.rank=8")
    assert proc.returncode == 2 and "lora.rank: unknown key" in proc.stderr
    assert not (tmp_path / "server.json").exists()


def test_multigpu_needs_gpus(tmp_path):
    env = mgpu_env(tmp_path)
    env.pop("SLURM_GPUS_ON_NODE")
    proc = run_wrapper("train_multigpu.sbatch", env)
    assert proc.returncode == 2 and "SLURM_GPUS_ON_NODE" in proc.stderr and "--gres=gpu:N" in proc.stderr


# --- train_multigpu.sbatch: hostile variables, the port and the token -------------------------------------
HOSTILE = "x[$(touch {canary})]"  # bash arithmetic runs the command substitution in an array subscript


@pytest.mark.parametrize("variable,value", [
    ("SRPO_SERVER_TIMEOUT", HOSTILE), ("SRPO_SERVER_TIMEOUT", "1+1"), ("SRPO_SERVER_TIMEOUT", "-5"), ("SRPO_SERVER_TIMEOUT", "0"),
    ("SRPO_SERVER_PORT", HOSTILE), ("SRPO_SERVER_PORT", "1+1"), ("SRPO_SERVER_PORT", "70000"), ("SRPO_SERVER_PORT", "-5"),
])
def test_multigpu_numbers_are_checked_never_evaluated(tmp_path, variable, value):
    """`$((SECONDS + ${SRPO_SERVER_TIMEOUT}))` ran the command substitution inside the variable."""
    canary = tmp_path / "pwned"
    value = value.format(canary=canary)
    proc = run_wrapper("train_multigpu.sbatch", mgpu_env(tmp_path, **{variable: value}), timeout=60)
    assert proc.returncode == 2 and variable in proc.stderr, proc.stderr
    assert not canary.exists(), "the variable was evaluated as code"
    assert not (tmp_path / "server.json").exists(), "refused before the server starts"


FAKE_SERVER = """
import json, os, secrets, stat, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

argv = sys.argv[1:]
opt = dict(zip(argv, argv[1:]))
token_file = Path(opt["--token-file"])
record = {"argv": argv, "pid": os.getpid(), "token_mode": stat.S_IMODE(token_file.stat().st_mode),
          "dir_mode": stat.S_IMODE(token_file.parent.stat().st_mode), "token": token_file.read_text().strip()}


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/ready" else 404)
        self.end_headers()

    def log_message(self, *a):
        pass


server = ThreadingHTTPServer((opt["--host"], int(opt["--port"])), Handler)
record["bound_port"] = server.server_address[1]
Path(os.environ["SRPO_FAKE_SERVER_RECORD"]).write_text(json.dumps(record))
Path(opt["--port-file"]).write_text(str(record["bound_port"]))
server.serve_forever()
"""


def test_multigpu_port_is_the_kernels_and_the_token_a_private_file(tmp_path):
    fake = tmp_path / "fake_server.py"
    fake.write_text(FAKE_SERVER)
    flow_record = tmp_path / "flow.txt"
    flow_sh = tmp_path / "flow.sh"
    flow_sh.write_text(f'env > {flow_record}\necho "ARGS $*" >> {flow_record}\n')
    env = mgpu_env(tmp_path, SRPO_SERVER_CMD=f"{sys.executable} {fake}", TMPDIR=str(tmp_path), SRPO_CMD=f"{BASH} {flow_sh}")
    env.pop("SRPO_SERVER_PORT")
    proc = run_wrapper("train_multigpu.sbatch", env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    server = json.loads((tmp_path / "server.json").read_text())
    opt = dict(zip(server["argv"], server["argv"][1:]))
    assert opt["--port"] == "0" and server["bound_port"] > 0  # the kernel's pick, not one derived from the job id
    assert server["token_mode"] == 0o600 and server["dir_mode"] == 0o700 and len(server["token"]) >= 40
    assert opt["--artifact-root"] == env["SRPO_ARTIFACT_ROOT"]
    flow = flow_record.read_text()
    seen = dict(line.split("=", 1) for line in flow.splitlines() if "=" in line and not line.startswith("ARGS"))
    assert seen["SRPO_INFERENCE_URL"] == f"http://127.0.0.1:{server['bound_port']}"
    assert seen["SRPO_SERVER_TOKEN_FILE"] == opt["--token-file"]
    assert f"rollout.server_url=http://127.0.0.1:{server['bound_port']}" in flow
    assert server["token"] not in flow and server["token"] not in proc.stdout + proc.stderr  # by file only
    assert not Path(opt["--token-file"]).parent.exists(), "the token directory goes with the job"
    assert not pid_alive(server["pid"])

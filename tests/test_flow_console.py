"""The README's main command as a user on a fresh machine runs it: as root with no user name in
the environment, in an empty directory, reading the console. (A reduced config via --steps and
--set keeps it short; everything else is the command as written.)"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FLOW = str(ROOT / "flows" / "srpo_flow.py")
pytestmark = pytest.mark.slow
SMALL = "eval.items_per_benchmark=20 data.train_size=16 train.prompts_per_step=8 train.mini_batch_prompts=8"
NESTED = re.compile(r"\[[^\]/]+/(generate|verify|localize|suffix|verify_suffix|learner|evaluate)/\d+ \(pid \d+\)\]")  # a task line of an epoch-step run


def bare_env() -> dict:
    """A container's environment: no user name anywhere, nothing of srpo's or Metaflow's set."""
    drop = ("USERNAME", "USER", "METAFLOW_USER", "SUDO_USER", "LOGNAME")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("SRPO_", "METAFLOW_", "MLFLOW_"))}
    env["PYTHONPATH"] = str(ROOT)  # the checkout under test (an installed `pip install -e .` gives the same)
    return env


def as_root(cmd: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return cmd
    if shutil.which("unshare") and subprocess.run(["unshare", "-r", "true"], capture_output=True).returncode == 0:
        return ["unshare", "-r", *cmd]  # uid 0 in a user namespace: what Metaflow sees as root
    pytest.skip("needs root or unprivileged user namespaces (unshare -r) to run the command as root")


def run_main(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = as_root([sys.executable, FLOW, "run", *args])
    return subprocess.run(cmd, cwd=tmp_path, env=bare_env(), capture_output=True, text=True, timeout=1500)


def test_main_command_as_root_with_a_bare_environment_shows_progress_not_task_logs(tmp_path):
    p = run_main(tmp_path, "--steps", "1", "--set", SMALL)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-5000:]
    assert out.count("running as 'srpo'") == 1  # the default user, said once (not by every task)
    # one progress display: the epoch step, each phase, the rates and the evaluation of the step
    assert re.search(r"progress: epoch step 1/1 \| phase generate", out)
    assert re.search(r"progress: epoch step 1/1 \| phase learner", out)
    assert re.search(r"progress: epoch step 1/1 \| phase done \| reward base [0-9.]+ .*\| eval @ step 1 synthetic_long [0-9.]+ \| elapsed [0-9:]+ \| ETA 0:00", out)
    # the epoch-step run's task logs are in the printed file, not on the console
    logs = re.search(r"epoch-step task logs: (\S+)", out)
    assert logs, out[-3000:]
    log = Path(logs.group(1))
    assert log.is_file() and log.is_relative_to(tmp_path)
    assert NESTED.search(log.read_text())
    assert not NESTED.search(out), "epoch-step task logs reached the console"
    assert "orchestration per epoch step: median" in out
    # the training's local services (rollout.server_url: auto) stopped with it
    assert not list((log.parent / "server" / "cache").glob("*"))


def test_a_failing_epoch_step_prints_its_error_whole(tmp_path):
    # 4 prompt tokens cannot hold a question: the generate phase raises (after start's checks pass)
    p = run_main(tmp_path, "--steps", "1", "--set", f"{SMALL} rollout.max_prompt_tokens=4")
    out = p.stdout + p.stderr
    assert p.returncode != 0
    assert "epoch step 1/1 FAILED" in out
    assert "Traceback (most recent call last)" in out and "rollout.max_prompt_tokens=4" in out and "ValueError" in out
    assert "epoch step 0 of" in out and "failed" in out

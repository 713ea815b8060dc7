"""What a process needs before it drives Metaflow (srpo_core/metaflow_env.py), the watchdog that
ties the training's local services to its Metaflow runtime, and the progress display's state."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import typing
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BARE = {k: v for k, v in os.environ.items() if k not in ("USERNAME", "USER", "METAFLOW_USER", "SUDO_USER", "LOGNAME")}
HELLO = textwrap.dedent(
    """
    from metaflow import FlowSpec, step

    class Hello(FlowSpec):
        @step
        def start(self):
            self.next(self.end)

        @step
        def end(self):
            pass

    if __name__ == "__main__":
        Hello()
    """
)


def _python(code: str, env: dict, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env={**env, "PYTHONPATH": str(ROOT)}, cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(
    "extra, expected, announced",
    [({}, "srpo", True), ({"USER": "root", "USERNAME": "root"}, "srpo", True), ({"USERNAME": "alice"}, "alice", False), ({"METAFLOW_USER": "bob", "USER": "root"}, "bob", False)],
)
def test_metaflow_user_defaults_only_when_none_is_found(extra, expected, announced):
    code = "from srpo_core.metaflow_env import ensure_metaflow_user; from metaflow.util import get_username; ensure_metaflow_user(); ensure_metaflow_user(); print(get_username())"
    p = _python(code, {**BARE, **extra})
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == expected
    assert p.stderr.count("running as 'srpo'") == (1 if announced else 0)  # said once, even when asked twice


def test_runner_leaves_torchs_typing_intact(tmp_path):
    """Metaflow's Runner loads Metaflow's vendored typing_extensions; afterwards torch.distributed.tensor
    (imported by peft) failed with "Type parameter ~_T1 without a default follows type parameter
    with a default" (metaflow#2462). Through metaflow_env.runner() it imports."""
    (tmp_path / "hello.py").write_text(HELLO)
    body = """
    import typing_extensions  # as in any process that imported torch, pydantic or mlflow before
    {get_runner}
    with Runner("hello.py", show_output=False) as runner:
        assert runner.run().status == "successful"
    import torch.distributed.tensor
    print("imported")
    """
    fixed = _python(textwrap.dedent(body.format(get_runner="from srpo_core.metaflow_env import runner; Runner = runner()")), {**BARE, "USERNAME": "srpo-tests"}, tmp_path)
    assert fixed.returncode == 0 and "imported" in fixed.stdout, fixed.stderr[-3000:]
    # the failure this guards against, so the test keeps meaning something with later Metaflow versions
    plain = _python(textwrap.dedent(body.format(get_runner="from metaflow import Runner")), {**BARE, "USERNAME": "srpo-tests"}, tmp_path)
    if plain.returncode == 0:
        pytest.skip("this Metaflow's Runner no longer breaks torch's typing (metaflow#2462 fixed); the fix is then a no-op")
    assert "without a default follows type parameter with a default" in plain.stderr


def test_runner_in_this_process_gives_the_typing_hooks_back():
    from srpo_core.metaflow_env import VENDORED, runner

    runner()
    assert getattr(typing, "_collect_parameters", lambda: None).__module__ != VENDORED


def test_watchdog_stops_its_command_when_the_watched_process_dies(tmp_path):
    watched = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    marker = tmp_path / "child.pid"
    child = f"import os, time; open({str(marker)!r}, 'w').write(str(os.getpid())); time.sleep(600)"
    cmd = [sys.executable, "-m", "srpo_core.watchdog", "--watch-pid", str(watched.pid), "--poll", "0.1", "--", sys.executable, "-c", child]
    dog = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() or not marker.read_text():
            assert time.monotonic() < deadline and dog.poll() is None, "the watched command never started"
            time.sleep(0.1)
        child_pid = int(marker.read_text())
        watched.kill()
        watched.wait()
        assert dog.wait(timeout=120) != 0  # the child was stopped by SIGTERM
        with pytest.raises(ProcessLookupError):
            os.kill(child_pid, 0)
    finally:
        for p in (watched, dog):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_progress_state_shows_step_phase_rates_evaluation_and_eta():
    from srpo_core.progress import State

    s = State(started=time.monotonic() - 65)
    s.apply({"type": "training", "training_id": "t", "total_steps": 6, "first_step": 0, "log_path": "/x/steps.log", "artifacts": "a"})
    s.apply({"type": "step_done", "step": 0, "wall": 30.0, "metrics": {"reward/base/mean": 0.25, "pass_rate/base": 0.5}, "evaluations": {"0": {"synthetic": 0.27}, "1": {"synthetic": 0.3}}})
    s.apply({"type": "phase", "step": 1, "phase": "localize"})
    fields = dict(s.fields())
    assert fields["epoch step"] == "2/6" and fields["phase"] == "localize"
    assert fields["reward base"] == "0.250" and fields["pass base"] == "0.500"
    assert fields["eval @ step 1"] == "synthetic 0.300"
    assert fields["elapsed"] == "1:05"
    assert fields["ETA"] == "2:30"  # 5 steps left x 30 s

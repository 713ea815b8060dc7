"""Per-epoch-step wall time of the training flow with and without the inference server, as a
ratio measured in one run (tiny preset by default, same machine, back to back).

    python bench/server_step_time.py [--steps 3] [--config tiny]

Without the server every model step of an epoch-step run (generate, localize, suffix, evaluate)
loads the model itself; with `rollout.server_url=auto` the training starts one server per epoch
step (its start-up is included in the time) and the phases call it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

FLOW = Path(__file__).resolve().parent.parent / "flows" / "srpo_flow.py"


def step_times(workdir: Path, steps: int, config: str, server: str) -> list[float]:
    import mlflow

    sets = "eval.every_steps=0" + (f" rollout.server_url={server}" if server else "")
    env = {**os.environ, "USERNAME": os.environ.get("USERNAME", "srpo-bench"), "SRPO_CONFIG": config, "SRPO_ARTIFACT_ROOT": str(workdir / "art"), "MLFLOW_TRACKING_URI": f"sqlite:///{workdir}/mlflow.db"}
    subprocess.run([sys.executable, str(FLOW), "run", "--quiet-steps", "true", "--steps", str(steps), "--set", sets], cwd=workdir, env=env, check=True, capture_output=True)
    client = mlflow.MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("srpo").experiment_id])[0]
    return [m.value for m in sorted(client.get_metric_history(run.info.run_id, "time/epoch_step_wall"), key=lambda m: m.step)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--config", default="tiny")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        times = {}
        for label, server in (("in-process", ""), ("server", "auto")):
            work = Path(tmp) / label
            work.mkdir()
            times[label] = step_times(work, args.steps, args.config, server)
            print(f"{label:>10}: epoch-step wall s {[round(t, 1) for t in times[label]]}")
    # step 0 also evaluates the base model in both modes; compare the later steps
    mean = {k: sum(v[1:]) / max(len(v) - 1, 1) for k, v in times.items()}
    print(f"RATIO in-process / server per epoch step (steps 1..{args.steps - 1}): {mean['in-process'] / mean['server']:.2f}  ({mean['in-process']:.1f} s vs {mean['server']:.1f} s)")


if __name__ == "__main__":
    main()

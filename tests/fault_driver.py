"""A training driven phase by phase in one process, for the fault suite (tests/test_faults.py).

It calls what the flow calls, in the flow's order: flow_driver.prepare (lease, resume point,
MLflow run), then per epoch step the lease renewal and the inference server of
flow_driver.launch_step, flow_phases.plan_shards, phase_generate, phase_verify, phase_localize,
phase_suffix, phase_verify_suffix, phase_learn, phase_evaluate, and at the end the lease release
of flow_driver.finish. What it leaves out is Metaflow's one process per task (about a minute of
process starts per epoch step on a loaded 2-core machine): the durable state a resume reads is
all in the artifact store either way.

    python tests/fault_driver.py --training-id ID --set "key=value ..." [--stop-after N]
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from srpo_core import flow_driver as D  # noqa: E402
from srpo_core import flow_phases as P  # noqa: E402
from srpo_core import store as S  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--training-id", required=True)
    ap.add_argument("--set", default="")
    ap.add_argument("--stop-after", type=int, default=0, help="stop (releasing the lease) after this many epoch steps of this run")
    args = ap.parse_args(argv)
    cfg_dict = D.parse_config(Path(D.default_config_path()).read_text())
    cfg = D.apply_overrides(cfg_dict, "", "", "", -1, args.set, 0)
    plan = D.prepare(cfg, args.training_id, experiment="srpo-faults")
    store = S.open_store(plan.artifact_root)
    print(f"training {plan.training_id}: steps {plan.next_step}..{plan.total_steps - 1}", flush=True)
    done = 0
    for step in range(plan.next_step, plan.total_steps):
        if args.stop_after and done >= args.stop_after:
            break
        plan.lease = S.Lease.from_env(plan.lease).renew(store).to_env()
        os.environ[S.LEASE_ENV] = plan.lease
        with D.inference_server(cfg, plan) as (url, token):
            if token:
                os.environ["SRPO_SERVER_TOKEN"] = token
            ctx = P.StepContext(plan.config, plan.training_id, step, f"drv-{uuid.uuid4().hex[:12]}", plan.artifact_root, step - 1 if step else None, url)
            keys = []
            for shard, ids in enumerate(P.plan_shards(ctx, int(cfg.resources.get("shards", 1) or 1))):
                key = P.phase_generate(ctx, shard, ids)
                for phase in (P.phase_verify, P.phase_localize, P.phase_suffix, P.phase_verify_suffix):
                    key = phase(ctx, shard, key)
                keys.append(key)
            P.phase_learn(ctx, keys)
            P.phase_evaluate(ctx, plan.total_steps, progress=False)
        print(f"epoch step {step} done", flush=True)
        done += 1
    S.Lease.from_env(plan.lease).release(store)
    return 0


if __name__ == "__main__":
    sys.exit(main(shlex.split(os.environ.get("FAULT_DRIVER_ARGS", "")) or None))

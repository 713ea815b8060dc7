"""What a reset method costs next to GRPO at an equal rollout budget (8 trained rollouts per
prompt), in one run, in process (the plain loop) and through the flow: SRPO/GRPO ratios of

  phase time       the epoch step's own work: rollout phases + verification + the learner update
                   (in process time/step; in the flow the phases' critical path, slowest shard per
                   phase, as `time/orchestration_overhead` counts it)
  generation time  all sampling: seed search, fills, localization and suffixes (time/generation +
                   time/localization + time/suffix; with events they overlap in time/generation)
  decode steps     in process: the sequential decode steps of the continuous batch, whatever
                   their rows. A reset method's count is bound below by its critical path, the
                   slowest prompt's seed chain -> localization -> suffixes, against GRPO's one
                   chain; each step costs a fixed part (~1.3 ms per forward of the tiny model on
                   one CPU thread) plus a part per row (~8 us) and per cached position (~0.4 us):
                   bench/forward_cost.py
  model calls      in process: forward passes of the model (decode forwards, one per cohort and
                   step; prefills; one-token forwards on reused KV), each paying the fixed part
  prefill tokens   in process: context tokens encoded by prefills (padded), ~0.3x a decoded
                   row-step each on this CPU: SRPO's include the localization prompts
  epoch step wall  through the flow: what a user waits per epoch step (orchestration included,
                   evaluation excluded)

In process, before (`rollout.scheduler: batched`, three sequential batched decodes) and after
(`events`, srpo_core/scheduler.py: each prompt on its own through the phases on one continuous
batch). Through the flow the phases stay Metaflow steps and the overlap comes from shards: the
foreach branches of an epoch step run at once against the training's inference server, whose
shared continuous batch (srpo_core/server/batching.py) decodes their concurrent calls together.
Printed beside the paper's 1.31x total and 1.61x generation (tables 7-8); goal: phase <= 1.10,
generation <= 1.15.

Every in-process repeat trains each variant from the same initial policy for `--steps` steps (a
fresh session each), the three interleaved step by step in a rotating order, so that a step of
SRPO is paired with the same step of GRPO measured moments apart (the machine is shared and its
speed drifts over minutes); the script prints the median over the paired steps with their range.
GRPO has no event-driven path (its one generate call already is one batch), so one GRPO training
per repeat serves both ratios. The flow section runs one training per method and shard
count (`--flow-shards`, `--flow-steps`; `--flow-shards` with no value skips it) and prints medians
over its epoch steps.

Two regimes, both measured by default (`--prompts 0 128`): the config's prompts per step (tiny:
16 x 8 = 128 rows, under the engine's 256-row batch: the critical path's decode steps matter, each
paying a forward's fixed part) and 128 prompts (1024 rows, 4x the batch: throughput-bound, as
generation is at paper scale, where time follows tokens and SRPO's are GRPO's).

    python bench/method_overhead.py [--steps 3] [--repeats 3] [--localizer self] [--prompts 0 128]
    python bench/method_overhead.py --repeats 0 --flow-shards 1 4 --flow-steps 3   # the flow only
    python bench/method_overhead.py --set rollout.engine=vllm --repeats 1 --steps 5 --prompts 128 --flow-shards   # vLLM in process (a GPU)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAPER = {"phase": 1.31, "generation": 1.61}
CAP = 256  # rows the in-process HF engine decodes at once (HFEngine.max_batch_rows)
GOAL = {"phase": 1.10, "generation": 1.15}


class BatchCounter:
    """Sums the continuous batch's counters (bench instrument: wraps ContinuousBatch.step):
    decode steps, model calls (decode forwards + prefills + reused-prefix forwards) and prefill
    tokens (padded) -- where a reset step's extra generation time goes on this engine."""

    KEYS = ("decode_steps", "forwards", "prefills", "reuse_forwards", "prefill_tokens")

    def __init__(self):
        from srpo_core.engine import hf

        self.count = dict.fromkeys(self.KEYS, 0)
        real = hf.ContinuousBatch.step

        def step(batch):
            before = {k: batch.stats[k] for k in self.KEYS}
            out = real(batch)
            for k in self.KEYS:
                self.count[k] += batch.stats[k] - before[k]
            return out

        hf.ContinuousBatch.step = step

    def snapshot(self) -> dict[str, int]:
        return dict(self.count)

    def since(self, before: dict[str, int]) -> dict[str, float]:
        d = {k: self.count[k] - before[k] for k in self.KEYS}
        return {"decode_steps": d["decode_steps"], "model_calls": d["forwards"] + d["prefills"] + d["reuse_forwards"], "prefill_tokens": d["prefill_tokens"]}


def sized(cfg, steps: int):
    """The config with enough training items for `steps` steps of its prompts."""
    need = steps * cfg.train.prompts_per_step
    return cfg if cfg.data.train_size >= need else cfg.override(**{"data.train_size": need})


def measure(cfgs: dict, steps: int, counter: BatchCounter, repeat: int) -> dict[str, list[dict[str, float]]]:
    """Train every variant for `steps` steps from the same initial policy, interleaved step by step
    (the order rotating), so the paired steps of two variants are measured close in time."""
    from srpo_core import data_order
    from srpo_core.loop import open_session, train_step

    sessions = {name: open_session(cfg) for name, cfg in cfgs.items()}
    step_items = {}  # name -> the items of each step
    for name, cfg in cfgs.items():
        items = data_order.train_items(cfg)
        step_items[name] = [[items[i] for i in batch] for batch in data_order.batches_of(cfg, items)[:steps]]
    names = list(cfgs)
    out: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for k in range(steps):
        turn = (repeat + k) % len(names)
        for name in names[turn:] + names[:turn]:
            before = counter.snapshot()
            result = train_step(sessions[name], step_items[name][k], k)
            t = result.timings
            out[name].append({
                "phase": t["step"],
                "generation": t.get("generation", 0.0) + t.get("localization", 0.0) + t.get("suffix", 0.0),
                **counter.since(before),
                "tokens": result.metrics["tokens/generated"],
            })
    return out


def in_process(args, common: dict) -> None:
    from srpo_core.config import load_config

    variants = {
        "grpo": {"method.method": "grpo", "method.localizer": "", "rollout.scheduler": "batched"},
        "srpo/batched": {"method.method": "srpo", "method.localizer": args.localizer, "rollout.scheduler": "batched"},
        "srpo/events": {"method.method": "srpo", "method.localizer": args.localizer, "rollout.scheduler": "events"},
    }
    counter = BatchCounter()
    names = list(variants)
    cfgs = {name: sized(load_config(args.config, {**common, **over}), args.steps) for name, over in variants.items()}
    if cfgs["grpo"].rollout.engine == "vllm":  # one vLLM engine per variant, side by side on one GPU (main allows one training each)
        import dataclasses

        from srpo_core import runtime

        real = runtime.vllm_options
        runtime.vllm_options = lambda cfg: dataclasses.replace(real(cfg), gpu_memory_utilization=0.85 / len(cfgs))
    steps: dict[str, list[dict]] = {n: [] for n in names}  # every (repeat, step), in the same order per variant
    t0 = time.perf_counter()
    for r in range(args.repeats):
        for name, got in measure(cfgs, args.steps, counter, r).items():
            steps[name].extend(got)
    cfg = cfgs["grpo"]
    rows = cfg.train.prompts_per_step * 8
    regime = f"{rows} rows <= the batch cap {CAP}" if rows <= CAP else f"{rows} rows = {rows / CAP:.0f}x the batch cap {CAP}: throughput-bound"
    print(f"IN PROCESS: {args.config} preset, {cfg.train.prompts_per_step} prompts x 8 rollouts per step ({regime}), {args.repeats} repeats x {args.steps} steps, localizer {args.localizer}, "
          f"overrides {common or 'none'} ({time.perf_counter() - t0:.0f} s)")
    keys = ("phase", "generation", "decode_steps", "model_calls", "prefill_tokens", "tokens")
    for name in names:
        total = {k: sum(s[k] for s in steps[name]) / args.repeats for k in keys}
        print(f"  {name:13s} per {args.steps}-step training: phase {total['phase']:.2f} s  generation {total['generation']:.2f} s  decode steps {total['decode_steps']:.0f}  "
              f"model calls {total['model_calls']:.0f}  prefill tokens {total['prefill_tokens']:.0f}  tokens {total['tokens']:.0f}")
    print(f"  {'SRPO/GRPO':16s} {'phase':>22s} {'generation':>22s} {'decode steps':>13s} {'model calls':>12s} {'prefill tok':>12s} {'tokens':>7s}   "
          f"(median [min, max] over the {len(steps['grpo'])} paired steps)")
    for name in names[1:]:
        ratios = {k: [s[k] / g[k] for s, g in zip(steps[name], steps["grpo"]) if g[k]] for k in keys}  # the counters are the HF engine's: none on vLLM
        cell = lambda v: f"{statistics.median(v):.2f}x [{min(v):.2f},{max(v):.2f}]"  # noqa: E731
        med = {k: f"{statistics.median(ratios[k]):.2f}x" if ratios[k] else "n/a" for k in keys}
        print(f"  {name.split('/')[1]:16s} {cell(ratios['phase']):>22s} {cell(ratios['generation']):>22s} {med['decode_steps']:>13s} {med['model_calls']:>12s} "
              f"{med['prefill_tokens']:>12s} {med['tokens']:>7s}")
    footer()


def footer() -> None:
    print(f"  {'paper (tables 7-8)':16s} {PAPER['phase']:>21.2f}x {PAPER['generation']:>21.2f}x")
    print(f"  {'goal':16s} {'<= %.2fx' % GOAL['phase']:>22s} {'<= %.2fx' % GOAL['generation']:>22s}")


def flow_training(args, method: dict, shards: int, workdir: Path) -> list[dict[str, float]]:
    """One training through flows/srpo_flow.py (Metaflow's Runner); per epoch step: phase,
    generation and wall seconds."""
    import os

    from srpo_core.metaflow_env import runner

    workdir.mkdir(parents=True)
    overrides = {**{k: v for k, v in (s.split("=", 1) for s in args.set)}, "resources.shards": str(shards), "eval.items_per_benchmark": "20", "eval.every_steps": "0"}
    env = {"SRPO_CONFIG": args.config, "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(workdir / "mf"), "SRPO_ARTIFACT_ROOT": str(workdir / "art"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}", "USERNAME": os.environ.get("USERNAME") or "srpo-bench"}
    os.environ.setdefault("METAFLOW_USER", env["USERNAME"])  # this process imports Metaflow too
    Runner = runner()
    with Runner(str(ROOT / "flows" / "srpo_flow.py"), show_output=False, env=env, cwd=str(workdir), file_read_timeout=600) as r:
        result = r.run(steps=args.flow_steps, set=" ".join(f"{k}={v}" for k, v in overrides.items()), **method)
        if result.run is None or not result.run.successful:
            sys.exit(f"the {method} flow failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        reports = result.run["end"].task.data.reports
    out = []
    for rep in reports:
        m = rep.metrics
        evaluation = rep.metrics.get("time/evaluation", 0.0)
        out.append({
            "phase": sum(m.get(f"time/{k}", 0.0) for k in ("generation", "verification", "localization", "suffix", "learner")),
            "generation": sum(m.get(f"time/{k}", 0.0) for k in ("generation", "localization", "suffix")),
            "wall": rep.wall_seconds - evaluation,
            "tokens": m.get("tokens/generated", 0.0),
        })
    return out


def through_flow(args) -> None:
    methods = {"grpo": {"method": "grpo", "localizer": ""}, "srpo": {"method": "srpo", "localizer": args.localizer}}
    t0 = time.perf_counter()
    table = {}
    with tempfile.TemporaryDirectory(prefix="srpo-bench-flow-") as tmp:
        for shards in args.flow_shards:
            for name, method in methods.items():
                steps = flow_training(args, {k: v for k, v in method.items() if v}, shards, Path(tmp) / f"{name}-{shards}")
                table[(name, shards)] = {k: statistics.median(s[k] for s in steps) for k in steps[0]}
    print(f"THROUGH THE FLOW: {args.config} preset, {args.flow_steps} epoch steps per training, localizer {args.localizer}, medians per epoch step ({time.perf_counter() - t0:.0f} s)")
    for (name, shards), med in table.items():
        print(f"  {name} {shards} shard(s): phase {med['phase']:.2f} s  generation {med['generation']:.2f} s  epoch step wall {med['wall']:.2f} s  tokens {med['tokens']:.0f}")
    print(f"  {'SRPO/GRPO':16s} {'phase':>22s} {'generation':>22s} {'epoch step wall':>16s}")
    for shards in args.flow_shards:
        s, g = table[("srpo", shards)], table[("grpo", shards)]
        print(f"  {f'{shards} shard(s)':16s} {s['phase'] / g['phase']:>21.2f}x {s['generation'] / g['generation']:>21.2f}x {s['wall'] / g['wall']:>15.2f}x")
    footer()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--steps", type=int, default=3, help="in process: steps per training")
    ap.add_argument("--repeats", type=int, default=3, help="in process: trainings per variant (0: skip the in-process section)")
    ap.add_argument("--localizer", default="self")
    ap.add_argument("--set", action="append", default=[], help="key=value config overrides for every variant")
    ap.add_argument("--prompts", type=int, nargs="+", default=[0, 128], help="in process: prompts per step to measure at (0: the config's; default also 128, 1024 rows: throughput-bound)")
    ap.add_argument("--flow-shards", type=int, nargs="*", default=[1], help="through the flow: shard counts to measure (none: skip the flow section)")
    ap.add_argument("--flow-steps", type=int, default=3, help="through the flow: epoch steps per training")
    args = ap.parse_args()

    import yaml

    common = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    if common.get("rollout.engine") == "vllm" and (args.repeats > 1 or len(args.prompts) > 1):
        sys.exit("with rollout.engine=vllm each variant holds a vLLM engine on the GPU for the whole process: use --repeats 1 and one --prompts value")
    if args.repeats:  # first: it imports torch and peft before Metaflow's Runner (metaflow#2462)
        for prompts in args.prompts:
            in_process(args, {**common, "train.prompts_per_step": prompts} if prompts else common)
    if args.flow_shards:
        through_flow(args)


if __name__ == "__main__":
    main()

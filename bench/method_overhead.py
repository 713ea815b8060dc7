"""What a reset method costs next to GRPO at an equal rollout budget (8 trained rollouts per
prompt), in one run, through the plain loop (in process): SRPO/GRPO ratios of

  phase time       the epoch step: rollout phases + verification + the learner update (time/step)
  generation time  all sampling: seed search, fills, localization and suffixes (time/generation +
                   time/localization + time/suffix; with events they overlap in time/generation)

before (`rollout.scheduler: batched`, three sequential batched decodes) and after (`events`,
srpo_core/scheduler.py), beside the paper's 1.31x total and 1.61x generation (tables 7-8).
Goal: phase <= 1.10, generation <= 1.15.

Every repeat trains each variant from the same initial policy for `--steps` steps (a fresh
session each), in a rotating order; the ratio of a repeat pairs SRPO with that repeat's GRPO, and
the script prints the median over repeats (the machine is shared and noisy). GRPO has no
event-driven path (its one generate call already is one batch), so one GRPO run per repeat
serves both ratios.

Not through the flow: the flow's phases are separate Metaflow steps exchanging the shard through
the store, so the in-memory scheduler does not apply there (its overlap would come from shards
running at once against one inference server), and one tiny-preset flow epoch step spends
~25 s in orchestration alone, which would drown the phase times being compared.

    python bench/method_overhead.py [--steps 3] [--repeats 3] [--localizer self] [--set rollout.temperature=0.4]
"""

from __future__ import annotations

import argparse
import statistics
import time

PAPER = {"phase": 1.31, "generation": 1.61}
GOAL = {"phase": 1.10, "generation": 1.15}


def measure(cfg, steps: int) -> dict[str, float]:
    from srpo_core import data_order
    from srpo_core.loop import open_session, train_step

    session = open_session(cfg)
    items = data_order.train_items(cfg)
    batches = data_order.batches_of(cfg, items)
    out = {"phase": 0.0, "generation": 0.0, "tokens": 0.0, "rollout_phases": 0.0}
    for k in range(steps):
        result = train_step(session, [items[i] for i in batches[k]], k)
        t = result.timings
        out["phase"] += t["step"]
        out["rollout_phases"] += t["step"] - t["learner"]
        out["generation"] += t.get("generation", 0.0) + t.get("localization", 0.0) + t.get("suffix", 0.0)
        out["tokens"] += result.metrics["tokens/generated"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--localizer", default="self")
    ap.add_argument("--set", action="append", default=[], help="key=value config overrides for every variant")
    args = ap.parse_args()

    import yaml

    from srpo_core.config import load_config

    common = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    variants = {
        "grpo": {"method.method": "grpo", "method.localizer": "", "rollout.scheduler": "batched"},
        "srpo/batched": {"method.method": "srpo", "method.localizer": args.localizer, "rollout.scheduler": "batched"},
        "srpo/events": {"method.method": "srpo", "method.localizer": args.localizer, "rollout.scheduler": "events"},
    }
    names = list(variants)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    t0 = time.perf_counter()
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotate the order
            runs[name].append(measure(load_config(args.config, {**common, **variants[name]}), args.steps))
    print(f"{args.config} preset, {args.steps} steps x {args.repeats} repeats, localizer {args.localizer}, overrides {common or 'none'} ({time.perf_counter() - t0:.0f} s)")
    for name in names:
        med = {k: statistics.median(run[k] for run in runs[name]) for k in runs[name][0]}
        print(f"  {name:13s} median: phase {med['phase']:.2f} s  rollout phases {med['rollout_phases']:.2f} s  generation {med['generation']:.2f} s  tokens {med['tokens']:.0f}")
    print(f"{'SRPO/GRPO':18s} {'phase':>16s} {'generation':>16s} {'rollout phases':>16s} {'tokens':>8s}")
    for name in names[1:]:
        ratios = {k: [s[k] / g[k] for s, g in zip(runs[name], runs["grpo"])] for k in ("phase", "generation", "rollout_phases", "tokens")}
        cells = {k: f"{statistics.median(v):.2f}x [" + ",".join(f"{x:.2f}" for x in v) + "]" for k, v in ratios.items()}
        print(f"{name.split('/')[1]:18s} {cells['phase']:>16s} {cells['generation']:>16s} {cells['rollout_phases']:>16s} {statistics.median(ratios['tokens']):>7.2f}x")
    print(f"{'paper (tables 7-8)':18s} {PAPER['phase']:>15.2f}x {PAPER['generation']:>15.2f}x")
    print(f"{'goal':18s} {'<= %.2fx' % GOAL['phase']:>16s} {'<= %.2fx' % GOAL['generation']:>16s}")


if __name__ == "__main__":
    main()

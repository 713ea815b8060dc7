"""`srpo theory ...`: exact, model-free checks of the paper's theory.

    srpo theory cpi   --out DIR [--quick] [--seed N]   Theorem 1: CPI-RR vs CPI-CARO scaling in p_pi
    srpo theory passk --out DIR [--quick] [--seed N]   Pass@k -> reachability on a random state graph
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path


def run_cpi(args: argparse.Namespace) -> int:
    from srpo_core.theory import experiment

    exp = dataclasses.replace(experiment.QUICK if args.quick else experiment.FULL, seed=args.seed)
    out = Path(args.out)
    start = time.perf_counter()
    summary = experiment.run_cpi_experiment(exp, progress=not args.no_progress)
    summary["wall_seconds"] = time.perf_counter() - start
    experiment.write_outputs(summary, out)
    logged = experiment.log_to_mlflow(summary, out, run_name="theory-cpi-quick" if args.quick else "theory-cpi")
    print(experiment.slopes_markdown(summary), end="")
    note = " (logged to MLflow)" if logged else ""
    print(f"wrote {out}/summary.json, table.csv, table.md, slopes.md, cpi_scaling.png{note}")
    return 0


def run_passk(args: argparse.Namespace) -> int:
    from srpo_core.theory import passk

    exp = dataclasses.replace(passk.QUICK if args.quick else passk.FULL, seed=args.seed)
    out = Path(args.out)
    summary = passk.run_passk_experiment(exp)
    passk.write_outputs(summary, out)
    print(json.dumps({k: v for k, v in summary.items() if k != "curve"}, indent=2))
    return 0


COMMANDS = {"cpi": run_cpi, "passk": run_passk}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("theory", help="exact small-MDP checks of Theorem 1 and of Pass@k reachability")
    sub = parser.add_subparsers(dest="theory_command", required=True, metavar="EXPERIMENT")
    helps = {
        "cpi": "CPI-RR vs CPI-CARO: sample size and per-iteration improvement against p_pi (Theorem 1)",
        "passk": "Pass@k on an explicit state graph and its k -> infinity reachability limit",
    }
    for name, func in COMMANDS.items():
        p = sub.add_parser(name, help=helps[name])
        p.add_argument("--out", required=True, help="output folder")
        p.add_argument("--quick", action="store_true", help="small settings (well under a minute)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        p.set_defaults(func=func)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="srpo")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

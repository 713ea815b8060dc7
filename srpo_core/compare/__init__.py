"""Compare methods across seeds: train GRPO, RRPO and SRPO (and any splits / localizers asked)
x seeds on one preset, evaluate on a benchmark suite, and write the paper's tables and curves.

    srpo compare --config tiny --seeds 0 1 --benchmarks commonsenseqa --eval-items 50 --out runs/compare
    srpo compare --config tiny --methods srpo --localizers self oracle divergence --seeds 0 42 420
    srpo compare --config paper --set model.name_or_path=/models/Qwen2.5-14B-Instruct   # GPU
    srpo compare --preset fidelity   # an experiment design (compare/experiment.py): arms, seeds, claims -> docs/fidelity.md

How it runs
    Every (method, split, localizer, seed) is one training, :func:`run_training`, with the plain
    in-process loop of ``srpo train`` (``train.open_session`` + ``train.run_steps``) and :func:`srpo_core.evaluate.evaluate_suite` before training, every
    ``--eval-every`` steps and after the last step. The CLI runs the trainings one after another in
    this process: that is the sequential equivalent of a Metaflow ``foreach`` fan-out, and
    ``flows/compare_flow.py`` is that fan-out (one task per training, calling the same
    :func:`run_training`, then :func:`finish_comparison` in its join), for clusters:
    ``python flows/compare_flow.py run --with kubernetes``.

What it writes (``--out DIR``)
    ``results.md`` / ``results.csv``   paper table 3: rows = methods (plus ``Base``: the step-0
        evaluation, seed-invariant), columns = benchmarks, final accuracy in percent, mean ± SD
        over seeds (sample SD, ddof=1; no SD with one seed), best method per column in bold
        (ties all bold; ``Base`` is not a candidate).
    ``efficiency.md`` / ``efficiency.csv``   paper tables 7/8, mean over seeds: ``train_h``
        (training-step wall clock: generation, localization, suffixes, verification, update),
        ``gen_h`` (engine sampling: base/seed-search + suffix + localization), ``val_h`` (all
        evaluations of the training), ``total_h = train_h + val_h``, ``tokens`` (tokens sampled in
        training steps: rollouts, dropped seed-search rollouts, localization), ``resp_mean``
        (mean response length over all rollouts, reset prefix included), ``gen_tok_s`` (tokens /
        gen time), ``rollouts`` (chains sampled in training steps, as consumed: every rollout record
        but SPO-Tree's segments, plus chains dropped by the seed search); then each divided by
        GRPO's (GRPO = 1.00).
    ``learning_curves.png``   accuracy vs training step per benchmark, mean ± SD band per method.
    ``accuracy_vs_rollouts.png``   the same against the rollouts consumed up to each evaluation.
    ``passk.md`` / ``passk.csv`` / ``passk_curves.png``   with ``--samples n`` > 1: pass@k of the
        final evaluation (and of the step-0 ``Base``) per method, benchmark and k (``--pass-k``,
        default powers of two up to n), mean over seeds with a 95% interval: the t interval over
        seeds, or with one seed (and for Base) the Wilson interval over the items (report.py,
        ``passk_interval``); the figure plots pass@k against k on a log2 axis, one panel per
        benchmark.
    ``runs.jsonl`` (one line per training, with its ``rollouts_per_step`` budget and
    ``rollouts_consumed``) and ``trainings/<training_id>/`` (config, per-step metrics and rollout
    records, evaluation outcomes, LoRA adapter).

Rollout budget (``--budget``)
    ``equal`` (default): every method samples the rollouts per step of the config's own method
    (prompts x ``Method.rollouts_per_prompt``); a method with fewer rollouts per prompt gets more
    prompts per step (srppo, 1 rollout, 8x grpo's prompts), its mini-batch and training set
    scaled alike so that the steps stay the same (plan.py). ``config``: each method as configured.
    The budgets are printed at plan time.

MLflow
    One parent run (experiment ``--experiment``, tag ``comparison_id``) holding the tables, the
    PNG and ``runs.jsonl`` as artifacts, and one nested child run per training (tag
    ``mlflow.parentRunId``) tagged ``method``, ``split``, ``localizer``, ``seed``,
    ``training_id``, ``comparison_id``, with the config and ``rollouts_per_step`` /
    ``rollouts_per_prompt`` as params, the per-step training metrics
    and ``eval/<benchmark>/accuracy`` (``/pass_at_<k>``, ``/n``, ...) at the training step (0 = before
    training, s = after s updates). Select the children in the UI and press Compare.
"""

from __future__ import annotations

import argparse
import time

from srpo_core.compare.plan import (  # noqa: F401
    BUDGETS,
    PAPER_SEEDS,
    ComparisonPlan,
    RunSpec,
    check_pass_k,
    default_ks,
    equal_budget,
    make_variants,
    plan_comparison,
    rollouts_per_step,
    total_steps_of,
    variant_labels,
)
from srpo_core.compare.report import (  # noqa: F401
    EFFICIENCY_COLUMNS,
    ComparisonOutput,
    EfficiencyTable,
    PassKTable,
    ResultsTable,
    efficiency_table,
    finish_comparison,
    mean_sd,
    open_parent_run,
    passk_interval,
    passk_table,
    plot_learning_curves,
    plot_passk_curves,
    results_table,
    short_name,
)
from srpo_core.compare.run import TrainingResult, consumed_rollouts, run_training  # noqa: F401
from srpo_core.config import LOCALIZERS, METHODS, SPLITS
from srpo_core.identity import eval_steps as eval_schedule  # noqa: F401
from srpo_core.methods.base import Variant  # noqa: F401

DEFAULT_EXPERIMENT = "srpo-compare"


def run_comparison(plan: ComparisonPlan, progress: bool = True):
    """The in-process fan-out: every spec in turn (what flows/compare_flow.py runs as a foreach);
    then the reports (report.finish_comparison). Returns (results, report.ComparisonOutput)."""
    from tqdm.auto import tqdm

    results: list[TrainingResult] = []
    status = "FAILED"
    try:
        bar = tqdm(plan.specs, desc=f"compare ({len(plan.specs)} trainings)", disable=not progress)
        for spec in bar:
            bar.set_postfix_str(f"{spec.label} seed {spec.seed}")
            results.append(run_training(spec))
        bar.close()
        status = "FINISHED"
    finally:
        if status != "FINISHED" and plan.parent_run_id:
            from srpo_core import tracking

            tracking.client(plan.tracking_uri).set_terminated(plan.parent_run_id, "FAILED")
    return results, finish_comparison(plan, results)


# ---- CLI -------------------------------------------------------------------------------------------


def register(subparsers) -> None:
    p = subparsers.add_parser("compare", help="train and evaluate grpo/rrpo/srpo x seeds; paper tables 3 and 7/8, curves, MLflow")
    p.add_argument("--preset", help="run the experiment this preset defines (compare/experiment.py: fidelity): its arms, seeds, steps, report and figures")
    p.add_argument("--report", help="with --preset: the report's path (default: the design's, docs/<preset>.md); its figures go to the folder of the same stem")
    p.add_argument("--report-from", metavar="DIR", help="with --preset: write the report from a finished run's --out DIR, no training")
    p.add_argument("--config", help="preset name (tiny, paper, paper_olmo) or a YAML file (default: tiny)")
    p.add_argument("--methods", nargs="+", choices=METHODS, help="methods to compare (default: every registered one; with --preset: the arms of these methods)")
    p.add_argument("--splits", nargs="+", choices=SPLITS, help="reset splits for rrpo/srpo (default: the config's)")
    p.add_argument("--localizers", nargs="+", choices=[loc for loc in LOCALIZERS if loc != "random"], help="srpo localizers (default: the config's, else self)")
    p.add_argument("--seeds", nargs="+", type=int, help="training seeds (default: the paper's 0 42 420; with --preset: the design's)")
    p.add_argument("--steps", type=int, help="training steps per run (default: train.max_steps, else all of train.epochs)")
    p.add_argument("--benchmarks", nargs="+", default=[], metavar="NAME[:N]", help="evaluate on these too, besides eval.benchmarks (task or benchmark names; :N = items for that one)")
    p.add_argument("--eval-items", type=int, help="items per benchmark without :N (default: eval.items_per_benchmark)")
    p.add_argument("--eval-every", type=int, help="evaluate every K steps too (default: eval.every_steps; 0: before and after)")
    p.add_argument("--samples", type=int, default=1, help="samples per item for pass@k (default 1: greedy accuracy only)")
    p.add_argument("--pass-k", type=int, nargs="*", default=[], help="k values of pass@k (each <= --samples; default with --samples n > 1: 1, 2, 4, ... up to n, and n)")
    p.add_argument("--budget", choices=BUDGETS, default="equal", help="rollouts per step: equal (default: the config's method's for every method; fewer per prompt -> more prompts) or config")
    p.add_argument("--long-prompts", choices=("truncate", "skip", "error"), default="truncate", help="prompts over rollout.max_prompt_tokens (default: truncate, counted)")
    p.add_argument("--set", action="extend", nargs="+", metavar="KEY=VALUE", help="override dotted config keys (several per flag, or repeat the flag)")
    p.add_argument("--out", help="output directory (default: runs/compare; with --preset: runs/<preset>)")
    p.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    p.add_argument("--no-mlflow", action="store_true", help="write the files only")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default; 1 is fastest for the tiny model on a busy machine)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from srpo_core import tracking
    from srpo_core.config import load_config, parse_overrides

    if args.preset:
        from srpo_core.compare.experiment import main as run_experiment

        return run_experiment(args)
    if args.report or args.report_from:
        raise SystemExit("--report and --report-from go with --preset")
    args.config, args.out = args.config or "tiny", args.out or "runs/compare"
    args.methods, args.seeds = args.methods or list(METHODS), args.seeds or list(PAPER_SEEDS)

    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    check_pass_k(args.samples, args.pass_k)
    cfg = load_config(args.config, parse_overrides(args.set or []))
    plan = plan_comparison(
        cfg,
        methods=args.methods,
        splits=args.splits,
        localizers=args.localizers,
        seeds=args.seeds,
        steps=args.steps,
        benchmarks=args.benchmarks,
        eval_items=args.eval_items,
        eval_every=args.eval_every,
        out_dir=args.out,
        long_prompts=args.long_prompts,
        samples=args.samples,
        ks=args.pass_k,
        progress=not args.quiet,
        budget=args.budget,
    )
    if not args.no_mlflow:
        plan = open_parent_run(plan, args.experiment, tracking.resolve_tracking_uri(args.tracking_uri))
    print(
        f"comparison {plan.comparison_id}: {len(plan.specs)} trainings ({', '.join(plan.labels)} x seeds {' '.join(map(str, args.seeds))}), "
        f"{plan.specs[0].steps if plan.specs else 0} steps each, benchmarks {', '.join(plan.benchmarks)}"
        + (f", pass@k for k = {' '.join(map(str, plan.specs[0].ks))} of {args.samples} samples" if plan.specs and plan.specs[0].ks else "")
    )
    print("\n".join(plan.budget_lines()))
    t0 = time.perf_counter()
    _, out = run_comparison(plan, progress=not args.quiet)
    print()
    print(out.results_md.read_text())
    print(out.efficiency_md.read_text())
    if out.passk_md is not None:
        print(out.passk_md.read_text())
    files = "results.md/.csv, efficiency.md/.csv, learning_curves.png, accuracy_vs_rollouts.png" + (", passk.md/.csv, passk_curves.png" if out.passk_md else "") + ", runs.jsonl"
    print(f"wall time {time.perf_counter() - t0:.0f}s; files in {args.out}: {files}")
    if plan.parent_run_id:
        print(f"MLflow: {plan.tracking_uri} experiment {args.experiment!r}, parent run {plan.parent_run_id} (children tagged comparison_id={plan.comparison_id})")
    return 0


if __name__ == "__main__":  # python -m srpo_core.compare ...
    import sys

    parser = argparse.ArgumentParser(prog="srpo")
    register(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args(["compare", *sys.argv[1:]])
    sys.exit(ns.func(ns))


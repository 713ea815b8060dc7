"""Compare GRPO, RRPO and SRPO across seeds as a Metaflow fan-out: one `train` task per
(method, split, localizer, seed), in parallel, then the paper's tables in `join`.

    python flows/compare_flow.py run --seeds 0,1 --benchmarks commonsenseqa --eval-items 50
    SRPO_CONFIG=paper python flows/compare_flow.py run --with kubernetes --max-workers 9
    python flows/compare_flow.py run --methods srpo --localizers self,oracle,divergence
    python flows/compare_flow.py run --preset fidelity --max-workers 11   # an experiment design, its report in docs/fidelity.md

`srpo compare` runs the same trainings one after another in one process; both call
srpo_core.compare.run_training per training and finish_comparison at the end, so the tables,
the learning-curve PNG and the MLflow parent/child runs are the same. With `--preset NAME` the
flow runs the experiment design NAME (srpo_core/compare/experiment.py: its preset, arms, seeds,
steps and claims; `--config`, `--splits`, `--localizers` are the design's) and the join writes its
report (`--report`, default docs/NAME.md) as `srpo compare --preset NAME` does. The train step's
`@resources` are read from SRPO_CONFIG when the flow starts, not from the design: on a cluster set
SRPO_CONFIG to the design's preset (`SRPO_CONFIG=fidelity ... --preset fidelity --with kubernetes`).
"""

import argparse
import shlex
import time

from metaflow import Config, FlowSpec, Parameter, current, resources, step

from srpo_core.flow_config import default_config_path, parse_config
from srpo_core.metaflow_env import ensure_metaflow_user

ensure_metaflow_user()


def _list(text: str) -> list[str]:
    return [x for x in text.replace(",", " ").split() if x]


class CompareFlow(FlowSpec):
    """Steps:

    start  resolve the config and flags, plan the trainings, open the MLflow parent run (foreach)
    train  one training: the plain loop with evaluations at steps, a nested MLflow child run  [GPU]
    join   gather the results; tables (paper 3, 7/8), learning curves, logged to the parent run
    end    where to look
    """

    config = Config("config", default=default_config_path, parser=parse_config)
    preset = Parameter("preset", default="", help="run this experiment design (compare/experiment.py: fidelity): its arms, seeds, steps, report")
    report = Parameter("report", default="", help="with --preset: the report's path (default: the design's, docs/<preset>.md)")
    methods = Parameter("methods", default="", help="comma-separated methods (default: every registered method, as srpo compare; with --preset: the arms of these methods)")
    seeds = Parameter("seeds", default="", help="comma-separated training seeds (default: the paper's 0,42,420; with --preset: the design's)")
    splits = Parameter("splits", default="", help="comma-separated splits for rrpo/srpo (default: the config's)")
    localizers = Parameter("localizers", default="", help="comma-separated srpo localizers (default: the config's, else self)")
    steps = Parameter("steps", default=0, type=int, help="training steps per run (0: the config's)")
    benchmarks = Parameter("benchmarks", default="", help="extra benchmarks besides eval.benchmarks, NAME or NAME:N (N items)")
    eval_items = Parameter("eval-items", default=0, type=int, help="items per benchmark (0: the config's)")
    eval_every = Parameter("eval-every", default=-1, type=int, help="evaluate every K steps (-1: the config's)")
    samples = Parameter("samples", default=1, type=int, help="samples per item for pass@k (1: greedy accuracy only)")
    pass_k = Parameter("pass-k", default="", help="comma-separated k of pass@k (default with samples n > 1: 1, 2, 4, ... up to n, and n)")
    budget = Parameter("budget", default="equal", help="rollouts per step: equal (every method the config's method's) or config (as configured)")
    overrides = Parameter("set", default="", help="space-separated key=value config overrides")
    out = Parameter("out", default="", help="output directory of the tables, on the join's machine (default: runs/compare; with --preset: runs/<preset>)")
    experiment = Parameter("experiment", default="srpo-compare", help="MLflow experiment")
    no_mlflow = Parameter("no-mlflow", default=False, type=bool, help="write the files only")

    @step
    def start(self):
        from dataclasses import asdict

        from srpo_core import compare, tracking
        from srpo_core.config import METHODS
        from srpo_core.flow_driver import apply_overrides

        self.experiment_info, self.report_path = None, ""
        if self.preset:
            from srpo_core.compare.experiment import start_experiment

            plan, self.experiment_info, report = start_experiment(self._experiment_args(), comparison_id=f"cmp-mf{current.run_id}", command=self._command())
            self.report_path = str(report)
        else:
            cfg = apply_overrides(self.config.to_dict(), "", "", "", -1, self.overrides, 0)
            plan = compare.plan_comparison(
                cfg, methods=_list(self.methods) or list(METHODS), splits=_list(self.splits) or None, localizers=_list(self.localizers) or None,
                seeds=[int(s) for s in _list(self.seeds)] or list(compare.PAPER_SEEDS), steps=self.steps or None, benchmarks=_list(self.benchmarks),
                eval_items=self.eval_items or None, eval_every=None if self.eval_every < 0 else self.eval_every,
                out_dir=self.out or "runs/compare", progress=False, comparison_id=f"cmp-mf{current.run_id}",
                samples=self.samples, ks=[int(k) for k in _list(self.pass_k)], budget=self.budget,
            )  # fmt: skip
            if not self.no_mlflow:
                plan = compare.open_parent_run(plan, self.experiment, tracking.resolve_tracking_uri())
        self.t0 = time.time()
        self.plan = asdict(plan)
        self.specs = self.plan["specs"]
        print(f"comparison {plan.comparison_id}: {len(self.specs)} trainings ({', '.join(plan.labels)}), benchmarks {', '.join(plan.benchmarks)}")
        print("\n".join(plan.budget_lines()))
        self.next(self.train, foreach="specs")

    def _command(self) -> str:
        """The command line that reproduces this run: the parameters that differ from their defaults."""
        defaults = {"steps": 0, "eval_items": 0, "eval_every": -1, "samples": 1, "budget": "equal", "experiment": "srpo-compare", "no_mlflow": False}  # the rest: ""
        parts = ["python", "flows/compare_flow.py", "run"]
        for name in ("preset", "report", "methods", "seeds", "steps", "benchmarks", "eval_items", "eval_every", "samples", "pass_k", "budget", "overrides", "out", "experiment", "no_mlflow"):
            if getattr(self, name) != defaults.get(name, ""):
                parts += ["--set" if name == "overrides" else "--" + name.replace("_", "-"), str(getattr(self, name))]
        return shlex.join(parts)

    def _experiment_args(self) -> argparse.Namespace:
        """This run's parameters as the `srpo compare --preset` options (compare.register; the
        design refuses --splits / --localizers itself)."""
        return argparse.Namespace(
            preset=self.preset, report=self.report or None, config=None, splits=_list(self.splits) or None, localizers=_list(self.localizers) or None,
            methods=_list(self.methods) or None, seeds=[int(s) for s in _list(self.seeds)] or None, steps=self.steps or None,
            benchmarks=_list(self.benchmarks), eval_items=self.eval_items or None, eval_every=None if self.eval_every < 0 else self.eval_every,
            long_prompts="truncate", samples=self.samples, pass_k=[int(k) for k in _list(self.pass_k)], budget=self.budget,
            set=self.overrides.split() or None, out=self.out or None, experiment=self.experiment, tracking_uri=None, no_mlflow=self.no_mlflow, quiet=True,
        )  # fmt: skip

    @resources(cpu=config.resources.learner.cpu, gpu=config.resources.learner.gpu, memory=config.resources.learner.memory)
    @step
    def train(self):
        from srpo_core.compare import run_training

        self.result = run_training(self.input).to_dict()
        self.next(self.join)

    @step
    def join(self, inputs):
        from srpo_core.compare import finish_comparison

        self.plan = inputs[0].plan
        self.results = [i.result for i in inputs]
        out = finish_comparison(self.plan, self.results)
        self.merge_artifacts(inputs, include=["experiment_info", "report_path", "t0"])
        self.report_md = ""
        if self.experiment_info:
            from srpo_core.compare.experiment import finish_experiment

            report = finish_experiment(self.plan["out_dir"], self.experiment_info, self.report_path, time.time() - self.t0)
            self.report_md = f"{report.summary}\nreport {report.markdown}, figures in {report.figures_dir}"
        self.results_md = out.results_md.read_text()
        self.efficiency_md = out.efficiency_md.read_text()
        self.passk_md = out.passk_md.read_text() if out.passk_md else ""
        self.next(self.end)

    @step
    def end(self):
        print(self.results_md)
        print(self.efficiency_md)
        print(self.passk_md)
        if self.report_md:
            print(self.report_md)
        print(f"files in {self.plan['out_dir']}; MLflow parent run {self.plan['parent_run_id']}")


if __name__ == "__main__":
    CompareFlow()

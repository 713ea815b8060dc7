"""Experiment designs: `srpo compare --preset NAME` runs the experiment a design names, as data.

A design (ExperimentDesign, registered in EXPERIMENTS) holds the preset it trains on, its arms
(one row each: a registered method with its split, localizer and config overrides), whether every
other registered method joins at its default variant, the seeds, steps and evaluation schedule,
where the report goes, and the paper's claims with the rule that decides each (verdicts.RULES).
Running it is a comparison (compare.run_comparison: one training per arm x seed, the plain loop,
MLflow parent and child runs, results.md and the rest in --out) followed by the report
(compare/experiment_report.py) written to the design's report path (docs/<name>.md) with its
figures in the folder of the same stem (docs/<name>/), and logged to the parent run.

    srpo compare --preset fidelity                         # the full experiment (README: runtime)
    srpo compare --preset fidelity --seeds 0 1 --steps 2 --methods grpo rrpo srpo --report /tmp/f.md
    srpo compare --preset fidelity --report-from runs/fidelity    # rewrite the report, no training

The rollout budget is `srpo compare --budget` (default `equal`: every arm samples the preset's
rollouts per step, compare.plan.equal_budget; `plan_options` of a design is passed on to
compare.plan.plan_comparison too); the report shows every arm's rollouts per step and flags budgets
that differ from the reference arm's.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from srpo_core import methods as method_registry
from srpo_core.compare.plan import ComparisonPlan, check_pass_k, plan_comparison
from srpo_core.compare.verdicts import RULES
from srpo_core.config import Config, ConfigError


@dataclass(frozen=True)
class Arm:
    """One row of an experiment: `method` (registered name) with its split and localizer ("":
    the method's own: the config's split, the method's default localizer) and extra dotted config
    overrides (`set`, e.g. {"loss.loss": "clip"})."""

    key: str  # file-name safe: the training ids are <comparison>-<key>-s<seed>
    label: str
    method: str
    split: str = ""
    localizer: str = ""
    set: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self):
        if not self.key or not all(c.isalnum() or c in "_-" for c in self.key):
            raise ValueError(f"arm key {self.key!r}: letters, digits, '_' and '-' only")


@dataclass(frozen=True)
class Claim:
    """A claim of the paper the experiment tests: `rule` (a verdicts.RULES name) over `arms`
    (for paired-difference rules the first arm is the reference: first - each other), its
    parameters, and the report section whose figure it sits beside."""

    key: str
    text: str  # "SRPO > GRPO"
    rule: str
    arms: tuple[str, ...]
    section: str  # one of SECTIONS
    source: str = ""  # where the paper makes it
    params: Mapping[str, object] = field(default_factory=dict)


SECTIONS = ("accuracy", "curves", "budget", "splits", "clip", "g_ratio", "audit")


@dataclass(frozen=True)
class ExperimentDesign:
    name: str
    preset: str  # the config preset the arms train on
    title: str
    question: str  # what the experiment asks, one paragraph
    arms: tuple[Arm, ...]
    claims: tuple[Claim, ...]
    other_methods: bool = True  # every registered method without an arm joins at its default variant
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    steps: int | None = None  # None: every epoch step of the preset
    eval_every: int | None = None  # None: the preset's eval.every_steps
    report: str = ""  # default report path ("": docs/<name>.md)
    reference: str = ""  # the arm other arms' budgets are held against ("": the first)
    split_ablation: tuple[str, ...] = ()  # arm keys of the split table and figure (reference split first)
    clip_ablation: tuple[str, ...] = ()  # arm keys of the loss ablation (the default loss first)
    plan_options: Mapping[str, object] = field(default_factory=dict)  # extra keyword arguments of plan_comparison

    def __post_init__(self):
        keys = [a.key for a in self.arms]
        if len(set(keys)) != len(keys):
            raise ValueError(f"experiment {self.name}: arm keys repeat: {keys}")
        for c in self.claims:
            if c.rule not in RULES:
                raise ValueError(f"experiment {self.name}: claim {c.key!r}: unknown rule {c.rule!r}; one of {', '.join(RULES)}")
            if c.section not in SECTIONS:
                raise ValueError(f"experiment {self.name}: claim {c.key!r}: unknown section {c.section!r}; one of {', '.join(SECTIONS)}")
            missing = [a for a in c.arms if a not in keys]
            if missing:
                raise ValueError(f"experiment {self.name}: claim {c.key!r} names arms {missing} that the design does not define")
        for name, group in (("split_ablation", self.split_ablation), ("clip_ablation", self.clip_ablation)):
            if any(a not in keys for a in group):
                raise ValueError(f"experiment {self.name}: {name} names arms outside the design: {[a for a in group if a not in keys]}")

    @property
    def report_path(self) -> str:
        return self.report or f"docs/{self.name}.md"

    def all_arms(self) -> list[Arm]:
        """The arms, then (other_methods) one arm per registered method without one: its own
        comparison variant (`Method.variants` for the preset's split), labelled by the method."""
        out = list(self.arms)
        if self.other_methods:
            have = {a.method for a in self.arms}
            for name in method_registry.names():
                if name not in have:
                    out.append(Arm(name.replace("_", "-"), "", name))
        return out


EXPERIMENTS: dict[str, ExperimentDesign] = {}


def register(design: ExperimentDesign) -> ExperimentDesign:
    EXPERIMENTS[design.name] = design
    return design


def get(name: str) -> ExperimentDesign:
    try:
        return EXPERIMENTS[name]
    except KeyError:
        raise ConfigError(f"--preset {name!r}: no experiment design of that name (designs: {', '.join(EXPERIMENTS) or 'none'}; srpo_core/compare/experiment.py)") from None


MARGIN = 0.03  # 3 accuracy points: "about equal" / "no worse", fixed before any run

register(
    ExperimentDesign(
        name="fidelity",
        preset="fidelity",
        title="Fidelity: do resets pay off where the theory says they should?",
        question=(
            "Issue 12, item 5. On long chains (10-16 operations, `synthetic_long`) whose failures carry one early wrong step followed by many right "
            "ones, theorem 1 predicts that a reset at the first wrong thought (SRPO) improves credit assignment over GRPO, and that random resets "
            "(RRPO) do not. Every registered method trains at its own configured rollouts per prompt on the same prompts, seeds and steps; "
            "the split and loss ablations and the diagnostics (gradient-signal ratio, localization audit) test the paper's mechanism."
        ),
        arms=(
            Arm("grpo", "GRPO", "grpo"),
            Arm("rrpo", "RRPO", "rrpo", "1x4"),
            Arm("srpo", "SRPO (self)", "srpo", "1x4", "self"),
            Arm("srpo-oracle", "SRPO (oracle)", "srpo", "1x4", "oracle"),
            Arm("srpo-2x4", "SRPO (2×4, self)", "srpo", "2x4", "self"),
            Arm("srpo-1x8", "SRPO (1×8, self)", "srpo", "1x8", "self"),
            Arm("srpo-clip", "SRPO (self, clip)", "srpo", "1x4", "self", {"loss.loss": "clip"}),
        ),
        claims=(
            Claim("srpo_gt_grpo", "SRPO > GRPO", "better", ("srpo", "grpo"), "accuracy", "table 3"),
            Claim("oracle_gt_grpo", "SRPO (oracle) > GRPO", "better", ("srpo-oracle", "grpo"), "accuracy", "theorem 1 (CPI-CARO: an exact localizer)"),
            Claim("rrpo_eq_grpo", "RRPO ≈ GRPO", "equivalent", ("rrpo", "grpo"), "curves", "table 3", {"margin": MARGIN}),
            Claim("srpo_gt_grpo_budget", "SRPO > GRPO at the rollouts consumed", "better_at_budget", ("srpo", "grpo"), "budget", "table 3: the same rollout budget"),
            Claim("split_1x4_best", "1×4 best", "best_of", ("srpo", "srpo-2x4", "srpo-1x8"), "splits", "table 4"),
            Claim("noclip_ge_clip", "no-clip ≥ clip", "not_worse", ("srpo", "srpo-clip"), "clip", "table 4", {"margin": MARGIN}),
            Claim("g_ratio_gt_1", "g ratio > 1 on most steps", "share_above", ("srpo",), "g_ratio", "app. 14.1", {"threshold": 0.5}),
            Claim("clean_2x", "clean prefixes correct ~2× as often", "ratio_in_band", ("srpo",), "audit", "app. 15 / fig. 4", {"band": (1.5, 3.0)}),
        ),
        seeds=(0, 1, 2, 3, 4),
        eval_every=4,
        report="docs/fidelity.md",
        reference="grpo",
        split_ablation=("srpo", "srpo-2x4", "srpo-1x8"),
        clip_ablation=("srpo", "srpo-clip"),
    )
)


# ---- planning ----------------------------------------------------------------------------------------


def select_arms(design: ExperimentDesign, methods: list[str] | None) -> list[Arm]:
    """The design's arms, restricted to `methods` (None: all); an unknown method fails."""
    arms = design.all_arms()
    if methods is None:
        return arms
    unknown = [m for m in methods if m not in method_registry.names()]
    if unknown:
        raise ConfigError(f"--methods: unknown {unknown}; registered: {', '.join(method_registry.names())}")
    kept = [a for a in arms if a.method in methods]
    if not kept:
        raise ConfigError(f"--methods {' '.join(methods)}: no arm of experiment {design.name!r} uses them")
    return kept


def plan_experiment(design: ExperimentDesign, cfg: Config, arms: list[Arm], *, out_dir, comparison_id: str | None = None, **plan_kwargs) -> tuple[ComparisonPlan, list[Arm], dict[str, str]]:
    """One comparison plan holding every arm x seed: compare.plan.plan_comparison per arm (its
    config overrides applied first), the specs relabelled with the arm's label and renamed
    `<comparison>-<arm key>-s<seed>` (two arms of one method differ in their keys). Returns the
    plan, the arms with their labels filled in, and each training id's arm key."""
    cid = comparison_id or f"{design.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    specs, labels, out_arms, benchmarks, arm_of = [], [], [], [], {}
    budget = {}
    for arm in arms:
        try:
            arm_cfg = cfg.override(**dict(arm.set)) if arm.set else cfg
        except ConfigError as exc:
            raise ConfigError(f"experiment {design.name}, arm {arm.key!r}: {exc}") from None
        split = arm.split or cfg.method.split
        localizer = arm.localizer or method_registry.get("srpo").default_localizer
        sub = plan_comparison(arm_cfg, methods=[arm.method], splits=[split], localizers=[localizer], out_dir=out_dir, comparison_id=cid, **{**dict(design.plan_options), **plan_kwargs})
        label = arm.label or sub.labels[0]
        for spec in sub.specs:
            spec.label = label
            spec.training_id = f"{cid}-{arm.key}-s{spec.seed}"
            spec.out_dir = str(Path(out_dir) / "trainings" / spec.training_id)
            arm_of[spec.training_id] = arm.key
        specs += sub.specs
        labels.append(label)
        benchmarks = sub.benchmarks
        budget = {"budget": sub.budget, "reference_rollouts": sub.reference_rollouts}
        out_arms.append(replace(arm, label=label))
    if len(set(labels)) != len(labels):
        raise ConfigError(f"experiment {design.name}: two arms share a label: {labels}")
    return ComparisonPlan(cid, cfg.to_dict(), benchmarks, labels, specs, str(out_dir), **budget), out_arms, arm_of


# ---- provenance ----------------------------------------------------------------------------------------


def code_version() -> str:
    """The commit of the code that runs (`git rev-parse HEAD` where the package lives), with
    `+dirty` when tracked files differ from it; "unknown" outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def command_line(args) -> str:
    """The `srpo compare` command that reproduces this run (the options the user set)."""
    parts = ["srpo", "compare", "--preset", args.preset]
    for flag, value in (
        ("--methods", args.methods),
        ("--seeds", args.seeds),
        ("--steps", args.steps),
        ("--benchmarks", args.benchmarks or None),
        ("--eval-items", args.eval_items),
        ("--eval-every", args.eval_every),
        ("--samples", args.samples if args.samples != 1 else None),
        ("--pass-k", args.pass_k or None),
        ("--set", args.set),
        ("--out", args.out),
        ("--report", args.report),
    ):
        if value is None:
            continue
        parts += [flag, *map(str, value)] if isinstance(value, list | tuple) else [flag, str(value)]
    if args.long_prompts != "truncate":
        parts += ["--long-prompts", args.long_prompts]
    if args.no_mlflow:
        parts.append("--no-mlflow")
    if args.threads:
        parts += ["--threads", str(args.threads)]
    return shlex.join(parts)


EXPERIMENT_FILE = "experiment.json"


def write_experiment_file(out_dir: Path, info: dict) -> Path:
    path = Path(out_dir) / EXPERIMENT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info, indent=1, default=list))
    return path


# ---- the command ---------------------------------------------------------------------------------------


def design_of(args) -> ExperimentDesign:
    """The design `args.preset` names; ConfigError for the options the design sets itself."""
    design = get(args.preset)
    for flag, value in (("--config", args.config), ("--splits", args.splits), ("--localizers", args.localizers)):
        if value:
            raise ConfigError(f"{flag}: not with --preset {design.name} (the design sets the preset, splits and localizers: srpo_core/compare/experiment.py)")
    return design


def start_experiment(args, comparison_id: str | None = None, command: str | None = None):
    """Plan the experiment `args.preset` names (args: the `srpo compare` options), open its MLflow
    parent run and write `experiment.json` into the output folder. Returns (plan, info, report
    path); `finish_experiment` completes it once the plan's trainings ran (in process: `main`; as a
    Metaflow fan-out: flows/compare_flow.py). `command` is what reproduces the run (default: the
    `srpo compare` line)."""
    from srpo_core import tracking
    from srpo_core.config import load_config, parse_overrides

    design = design_of(args)
    check_pass_k(args.samples, args.pass_k)
    report = Path(args.report or design.report_path)
    out_dir = Path(args.out or f"runs/{design.name}")
    seeds = list(args.seeds) if args.seeds else list(design.seeds)
    cfg = load_config(design.preset, parse_overrides(args.set or []))
    arms = select_arms(design, args.methods)
    plan, arms, arm_of = plan_experiment(
        design,
        cfg,
        arms,
        out_dir=out_dir,
        comparison_id=comparison_id,
        seeds=seeds,
        steps=args.steps if args.steps is not None else design.steps,
        benchmarks=args.benchmarks,
        eval_items=args.eval_items,
        eval_every=args.eval_every if args.eval_every is not None else design.eval_every,
        long_prompts=args.long_prompts,
        samples=args.samples,
        ks=args.pass_k,
        progress=not args.quiet,
        budget=args.budget,
    )
    print("\n".join(plan.budget_lines()))
    if not args.no_mlflow:
        from srpo_core.compare.report import open_parent_run

        plan = open_parent_run(plan, args.experiment, tracking.resolve_tracking_uri(args.tracking_uri))
        tracking.client(plan.tracking_uri).set_tag(plan.parent_run_id, "experiment", design.name)
    info = {
        "design": asdict(design),
        "arms": [asdict(a) for a in arms],
        "comparison_id": plan.comparison_id,
        "benchmarks": plan.benchmarks,
        "seeds": seeds,
        "steps": max((s.steps for s in plan.specs), default=0),
        "eval_steps": plan.specs[0].eval_steps if plan.specs else [],
        "eval_items": plan.specs[0].eval_items if plan.specs else {},
        "command": command or command_line(args),
        "commit": code_version(),
        "preset": design.preset,
        "model": cfg.model.name_or_path,
        "tracking_uri": plan.tracking_uri,
        "experiment": None if args.no_mlflow else args.experiment,
        "parent_run_id": plan.parent_run_id,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "trainings": {s.training_id: {"arm": arm_of[s.training_id], "seed": s.seed} for s in plan.specs},
    }
    write_experiment_file(out_dir, info)
    print(f"experiment {design.name} ({plan.comparison_id}): {len(plan.specs)} trainings ({', '.join(plan.labels)} x seeds {' '.join(map(str, seeds))}), {info['steps']} steps each")
    return plan, info, report


def finish_experiment(out_dir: Path, info: dict, report: Path, wall_s: float):
    """After the trainings and compare.finish_comparison: the wall time into `experiment.json`, the
    report and its figures written (experiment_report.write_report) and logged to the parent run."""
    from srpo_core.compare.experiment_report import log_report, write_report

    info = {**info, "wall_s": wall_s, "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    write_experiment_file(Path(out_dir), info)
    out = write_report(Path(out_dir), Path(report))
    if info.get("parent_run_id"):
        log_report(info["tracking_uri"], info["parent_run_id"], out)
    return out


def main(args) -> int:
    """`srpo compare --preset NAME` (compare.register adds the options)."""
    from srpo_core.compare import run_comparison
    from srpo_core.compare.experiment_report import write_report

    design = design_of(args)
    if args.report_from:
        out = write_report(Path(args.report_from), Path(args.report or design.report_path))
        print(f"report {out.markdown} ({len(out.figures)} figures in {out.figures_dir})")
        return 0
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    plan, info, report = start_experiment(args)
    t0 = time.perf_counter()
    run_comparison(plan, progress=not args.quiet)
    wall = time.perf_counter() - t0
    out = finish_experiment(Path(plan.out_dir), info, report, wall)
    print(out.summary)
    print(f"wall time {wall:.0f}s; report {out.markdown}, figures in {out.figures_dir}, comparison files in {plan.out_dir}")
    if plan.parent_run_id:
        print(f"MLflow: {plan.tracking_uri} experiment {args.experiment!r}, parent run {plan.parent_run_id}")
    return 0

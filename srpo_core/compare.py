"""Compare methods across seeds: train GRPO, RRPO and SRPO (and any splits / localizers asked)
x seeds on one preset, evaluate on a benchmark suite, and write the paper's tables and curves.

    srpo compare --config tiny --seeds 0 1 --benchmarks commonsenseqa --eval-items 50 --out runs/compare
    srpo compare --config tiny --methods srpo --localizers self oracle divergence --seeds 0 42 420
    srpo compare --config paper --set model.name_or_path=/models/Qwen2.5-14B-Instruct   # GPU

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
        gen time); then each divided by GRPO's (GRPO = 1.00).
    ``learning_curves.png``   accuracy vs training step per benchmark, mean ± SD band per method.
    ``runs.jsonl`` (one line per training) and ``trainings/<training_id>/`` (config, per-step
    metrics and rollout records, evaluation outcomes, LoRA adapter).

MLflow
    One parent run (experiment ``--experiment``, tag ``comparison_id``) holding the tables, the
    PNG and ``runs.jsonl`` as artifacts, and one nested child run per training (tag
    ``mlflow.parentRunId``) tagged ``method``, ``split``, ``localizer``, ``seed``,
    ``training_id``, ``comparison_id``, with the config as params, the per-step training metrics
    and ``eval/<benchmark>/accuracy`` (``/pass_at_<k>``, ``/n``, ...) at the training step (0 = before
    training, s = after s updates). Select the children in the UI and press Compare.
"""

from __future__ import annotations

import argparse
import csv
import gc
import io
import json
import math
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from srpo_core.config import DEFAULT_LOCALIZER, LOCALIZERS, METHODS, SPLITS, Config, from_dict

DEFAULT_EXPERIMENT = "srpo-compare"
PAPER_SEEDS = (0, 42, 420)
SHORT_NAMES = {
    "numinamath_olympiads": "oly", "hmmt_nov_2025": "hmmt", "math_level5": "lvl5", "strategyqa": "stra",
    "acereason_math": "ace", "sciknoweval_chemistry": "chem", "sciknoweval_biology": "bio",
    "commonsenseqa": "csqa", "sciknoweval_materials": "mat", "sciknoweval_physics": "phys",
    "livecodebench_medium": "lcbm", "synthetic": "synth", "math500": "m500", "aime24": "aime24", "gsm8k": "gsm8k",
}  # fmt: skip
EFFICIENCY_COLUMNS = ("train_h", "gen_h", "val_h", "total_h", "tokens", "resp_mean", "gen_tok_s")


# ---- what to run -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    method: str
    split: str  # "none" for grpo
    localizer: str  # "none" for grpo

    def overrides(self) -> dict:
        if self.method == "grpo":
            return {"method.method": "grpo", "method.localizer": ""}
        return {"method.method": self.method, "method.split": self.split, "method.localizer": self.localizer}

    @property
    def key(self) -> str:
        return self.method if self.method == "grpo" else f"{self.method}-{self.split}-{self.localizer}"


def make_variants(methods, splits, localizers) -> list[Variant]:
    """GRPO once; RRPO per split (random resets); SRPO per split x localizer (not ``random``)."""
    out: list[Variant] = []
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; one of {METHODS}")
        if m == "grpo":
            out.append(Variant("grpo", "none", "none"))
        elif m == "rrpo":
            out += [Variant("rrpo", s, "random") for s in splits]
        else:
            locs = [loc for loc in localizers if loc != "random"]
            if not locs:
                raise ValueError("srpo needs a localizer other than 'random' (random resets are rrpo)")
            out += [Variant("srpo", s, loc) for s in splits for loc in locs]
    for s in splits:
        if s not in SPLITS:
            raise ValueError(f"unknown split {s!r}; one of {SPLITS}")
    for loc in localizers:
        if loc not in LOCALIZERS:
            raise ValueError(f"unknown localizer {loc!r}; one of {LOCALIZERS}")
    return list(dict.fromkeys(out))


def variant_labels(variants: list[Variant]) -> dict[Variant, str]:
    """Row labels as in the paper: ``GRPO``, ``RRPO``, ``SRPO``; the split and localizer are added
    only where the comparison has several of them."""
    splits = {v.split for v in variants if v.method != "grpo"}
    locs = {v.localizer for v in variants if v.method == "srpo"}
    labels = {}
    for v in variants:
        extra = []
        if v.method != "grpo" and len(splits) > 1:
            extra.append(v.split.replace("x", "×"))
        if v.method == "srpo" and len(locs) > 1:
            extra.append(v.localizer)
        labels[v] = v.method.upper() + (f" ({', '.join(extra)})" if extra else "")
    return labels


@dataclass
class RunSpec:
    """One training of a comparison (JSON-able: it travels as a Metaflow foreach item)."""

    comparison_id: str
    training_id: str
    label: str
    method: str
    split: str
    localizer: str
    seed: int
    config: dict
    benchmarks: list[str]
    eval_items: dict[str, int]  # items per benchmark
    eval_steps: list[int]  # evaluate after these many updates (0 = before training)
    steps: int
    out_dir: str
    tracking_uri: str | None = None  # None: no MLflow
    experiment_id: str | None = None
    parent_run_id: str | None = None
    long_prompts: str = "truncate"
    samples: int = 1
    ks: list[int] = field(default_factory=list)
    progress: bool = True


@dataclass
class ComparisonPlan:
    comparison_id: str
    config: dict
    benchmarks: list[str]
    labels: list[str]  # row order
    specs: list[RunSpec]
    out_dir: str
    tracking_uri: str | None = None
    experiment_id: str | None = None
    parent_run_id: str | None = None


def eval_schedule(total_steps: int, every: int) -> list[int]:
    """0 (before training), every ``every`` updates, and after the last step."""
    at = {0, total_steps}
    if every > 0:
        at |= set(range(every, total_steps, every))
    return sorted(at)


def total_steps_of(cfg: Config, max_steps: int | None) -> int:
    from srpo_core import pipeline
    from srpo_core.epoch import train_items

    n = len(train_items(cfg))
    batches = len(pipeline.step_batches(n, cfg.train.prompts_per_step, cfg.train.epochs, cfg.train.seed))
    if batches == 0:
        raise ValueError(f"data.task {cfg.data.task!r} has {n} training items < train.prompts_per_step={cfg.train.prompts_per_step}")
    limit = max_steps if max_steps is not None else (cfg.train.max_steps or batches)
    return min(limit, batches)


def plan_comparison(
    cfg: Config,
    *,
    methods=METHODS,
    splits=None,
    localizers=None,
    seeds=PAPER_SEEDS,
    steps: int | None = None,
    benchmarks=(),
    eval_items: int | None = None,
    eval_every: int | None = None,
    out_dir: str | os.PathLike = "runs/compare",
    long_prompts: str = "truncate",
    samples: int = 1,
    ks=(),
    progress: bool = True,
    comparison_id: str | None = None,
) -> ComparisonPlan:
    """The trainings of a comparison (no model loaded, no MLflow yet)."""
    splits = list(splits or [cfg.method.split])
    localizers = list(localizers or [cfg.method.resolved_localizer if cfg.method.method == "srpo" else DEFAULT_LOCALIZER["srpo"]])
    variants = make_variants(methods, splits, localizers)
    labels = variant_labels(variants)
    cid = comparison_id or f"cmp-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    counts: dict[str, int] = {}
    extra = []
    for spec in benchmarks:  # NAME or NAME:N
        name, _, n = str(spec).partition(":")
        if n:
            if not n.isdigit() or int(n) < 1:
                raise ValueError(f"benchmark {spec!r}: expected NAME or NAME:N with N >= 1")
            counts[name] = int(n)
        extra.append(name)
    bench = list(dict.fromkeys([*cfg.eval.benchmarks, *extra]))
    from srpo_core.tasks import get_task

    for name in bench:
        get_task(name)  # an unknown name fails here, before any training
    default_n = eval_items or cfg.eval.items_per_benchmark
    per_bench = {b: counts.get(b, default_n) for b in bench}
    specs = []
    for v in variants:
        for seed in seeds:
            c = cfg.override(**v.overrides(), **{"train.seed": int(seed)})
            n_steps = total_steps_of(c, steps)
            every = cfg.eval.every_steps if eval_every is None else eval_every
            tid = f"{cid}-{v.key}-s{seed}"
            specs.append(RunSpec(cid, tid, labels[v], v.method, v.split, v.localizer, int(seed), c.to_dict(), bench, per_bench, eval_schedule(n_steps, every), n_steps, str(Path(out_dir) / "trainings" / tid), long_prompts=long_prompts, samples=samples, ks=list(ks), progress=progress))
    return ComparisonPlan(cid, cfg.to_dict(), bench, list(dict.fromkeys(labels[v] for v in variants)), specs, str(out_dir))


# ---- one training --------------------------------------------------------------------------------------


@dataclass
class TrainingResult:
    training_id: str
    label: str
    method: str
    split: str
    localizer: str
    seed: int
    steps: int
    run_id: str | None
    curves: dict[str, list[list[float]]]  # benchmark -> [[step, accuracy], ...]
    n: dict[str, int]  # items scored per benchmark (final evaluation)
    pass_at: dict[str, dict[str, float]]  # benchmark -> {"k": value} (final evaluation)
    train_s: float = 0.0
    gen_s: float = 0.0
    val_s: float = 0.0
    tokens: float = 0.0
    resp_tokens: float = 0.0
    rollouts: int = 0
    wall_s: float = 0.0

    @property
    def final(self) -> dict[str, float]:
        return {b: pts[-1][1] for b, pts in self.curves.items() if pts}

    @property
    def base(self) -> dict[str, float]:
        return {b: pts[0][1] for b, pts in self.curves.items() if pts and pts[0][0] == 0}

    @property
    def resp_mean(self) -> float:
        return self.resp_tokens / self.rollouts if self.rollouts else float("nan")

    def efficiency(self) -> dict[str, float]:
        h = 3600.0
        return {
            "train_h": self.train_s / h, "gen_h": self.gen_s / h, "val_h": self.val_s / h,
            "total_h": (self.train_s + self.val_s) / h, "tokens": self.tokens, "resp_mean": self.resp_mean,
            "gen_tok_s": self.tokens / self.gen_s if self.gen_s > 0 else float("nan"),
        }  # fmt: skip

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainingResult":
        return cls(**d)


def _start_child(spec: RunSpec, cfg: Config) -> str:
    from srpo_core import tracking

    client = tracking.client(spec.tracking_uri)
    tags = {
        "mlflow.parentRunId": spec.parent_run_id or "", "method": spec.method, "split": spec.split,
        "localizer": spec.localizer, "seed": str(spec.seed), "training_id": spec.training_id,
        "comparison_id": spec.comparison_id, "label": spec.label, "model": cfg.model.name_or_path,
        "task": cfg.data.task,
    }  # fmt: skip
    if not spec.parent_run_id:
        tags.pop("mlflow.parentRunId")
    run = client.create_run(spec.experiment_id, run_name=f"{spec.label} seed {spec.seed}", tags=tags)
    tracking.log_params(client, run.info.run_id, tracking.flatten_config(cfg.to_dict()))
    return run.info.run_id


def run_training(spec: RunSpec | dict) -> TrainingResult:
    """Train one (method, split, localizer, seed) with the plain loop and evaluate it on the
    comparison's benchmarks at ``spec.eval_steps``; logs into a nested MLflow child run."""
    from tqdm.auto import tqdm

    from srpo_core import tracking
    from srpo_core.evaluate import evaluate_suite
    from srpo_core.train import open_session, run_steps

    if isinstance(spec, dict):
        spec = RunSpec(**spec)
    t0 = time.perf_counter()
    cfg = from_dict(spec.config)
    out = Path(spec.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(spec.config, indent=1, default=list))
    run_id = _start_child(spec, cfg) if spec.tracking_uri else None
    client = tracking.client(spec.tracking_uri) if run_id else None
    result = TrainingResult(spec.training_id, spec.label, spec.method, spec.split, spec.localizer, spec.seed, spec.steps, run_id, {b: [] for b in spec.benchmarks}, {}, {})
    status = "FAILED"
    try:
        session = open_session(cfg)

        def evaluate_at(step: int) -> None:
            suite = evaluate_suite(session.engine, cfg, spec.benchmarks, step, run_id=run_id, items_per_benchmark=spec.eval_items, samples=spec.samples, ks=tuple(spec.ks), long_prompts=spec.long_prompts, progress=spec.progress, out_dir=out, log_to_mlflow=run_id is not None, tracking_uri=spec.tracking_uri)
            result.val_s += suite.seconds
            for b, r in suite.results.items():
                result.curves[b].append([step, r.accuracy])
                result.n[b] = r.n
                result.pass_at[b] = {str(k): v for k, v in r.pass_at.items()}

        if 0 in spec.eval_steps:
            evaluate_at(0)
        bar = tqdm(run_steps(session, out, spec.steps), total=spec.steps, desc=f"train {spec.label} seed {spec.seed}", disable=not spec.progress, leave=False)
        for step, res in bar:
            m = res.metrics
            result.train_s += m.get("time/step", 0.0)
            result.gen_s += sum(m.get(f"time/{k}", 0.0) for k in ("generation", "suffix", "localization"))
            result.tokens += m.get("tokens/generated", 0.0) + m.get("tokens/localization", 0.0)
            result.resp_tokens += sum(len(r.rollout.response_ids) for r in res.records)
            result.rollouts += len(res.records)
            m["response/mean_tokens"] = _mean([len(r.rollout.response_ids) for r in res.records])  # also lands in metrics.jsonl
            if run_id is not None:
                tracking.log_step_metrics(m, step, run_id=run_id, mlflow_client=client)
            bar.set_postfix(reward=f"{m.get('reward/base/mean', float('nan')):.2f}")
            if step + 1 in spec.eval_steps:
                evaluate_at(step + 1)
        bar.close()
        session.learner.save_adapter(out / "adapter")
        status = "FINISHED"
    finally:
        result.wall_s = time.perf_counter() - t0
        (out / "result.json").write_text(json.dumps(result.to_dict(), indent=1))
        if run_id is not None:
            if status == "FINISHED":
                tracking.log_step_metrics({f"efficiency/{k}": v for k, v in result.efficiency().items()} | {"efficiency/wall_s": result.wall_s}, spec.steps, run_id=run_id, mlflow_client=client)
            client.set_terminated(run_id, status)
        session = None  # noqa: F841 - free the model before the next training
        gc.collect()
    return result


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


# ---- tables ----------------------------------------------------------------------------------------


def mean_sd(values) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof=1; None for fewer than two values)."""
    xs = [float(v) for v in values]
    if not xs:
        return float("nan"), None
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def short_name(benchmark: str) -> str:
    return SHORT_NAMES.get(benchmark, benchmark)


@dataclass
class ResultsTable:
    """Paper table 3: rows = methods, columns = benchmarks, accuracy (fractions) per seed."""

    benchmarks: list[str]
    rows: dict[str, dict[str, list[float]]]  # label -> benchmark -> per-seed accuracies
    base: dict[str, float] | None = None  # step-0 accuracy (seed-invariant), shown as "Base"

    def cell(self, label: str, benchmark: str) -> tuple[float, float | None]:
        m, sd = mean_sd(self.rows[label].get(benchmark, []))
        return 100 * m, None if sd is None else 100 * sd

    def best(self, benchmark: str) -> set[str]:
        """Labels with the highest mean in the column (all of them on a tie; NaN never best)."""
        means = {lab: self.cell(lab, benchmark)[0] for lab in self.rows}
        finite = [v for v in means.values() if math.isfinite(v)]
        if not finite:
            return set()
        top = max(finite)
        return {lab for lab, v in means.items() if math.isfinite(v) and math.isclose(v, top, rel_tol=0, abs_tol=1e-9)}

    @staticmethod
    def fmt(mean: float, sd: float | None, bold: bool = False) -> str:
        if not math.isfinite(mean):
            return "–"
        text = f"{mean:.1f}" if sd is None else f"{mean:.1f} ± {sd:.1f}"
        return f"**{text}**" if bold else text

    def markdown(self) -> str:
        head = ["Method", *(short_name(b) for b in self.benchmarks)]
        lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * len(self.benchmarks)]
        if self.base:
            lines.append("| Base | " + " | ".join(self.fmt(100 * self.base[b], None) if b in self.base else "–" for b in self.benchmarks) + " |")
        best = {b: self.best(b) for b in self.benchmarks}
        for lab in self.rows:
            lines.append(f"| {lab} | " + " | ".join(self.fmt(*self.cell(lab, b), bold=lab in best[b]) for b in self.benchmarks) + " |")
        seeds = sorted({len(v) for r in self.rows.values() for v in r.values() if v})
        legend = ", ".join(f"{short_name(b)} = {b}" for b in self.benchmarks if short_name(b) != b)
        note = f"\nAccuracy (%) after training, mean ± SD over {_seeds_text(seeds)} (sample SD); best method per column in bold; Base = before training."
        return "\n".join(lines) + "\n" + note + (f" {legend}." if legend else "") + "\n"

    def csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["method", "seeds", *(f"{b}_{s}" for b in self.benchmarks for s in ("mean", "sd", "best"))])
        if self.base:
            w.writerow(["Base", 1, *(x for b in self.benchmarks for x in (_num(100 * self.base.get(b, float("nan"))), "", ""))])
        best = {b: self.best(b) for b in self.benchmarks}
        for lab, per in self.rows.items():
            seeds = max((len(v) for v in per.values()), default=0)
            cells = []
            for b in self.benchmarks:
                m, sd = self.cell(lab, b)
                cells += [_num(m), "" if sd is None else _num(sd), int(lab in best[b])]
            w.writerow([lab, seeds, *cells])
        return buf.getvalue()


def _seeds_text(counts: list[int]) -> str:
    return f"{'/'.join(map(str, counts)) or 0} seed{'' if counts == [1] else 's'}"


def _num(x: float) -> str:
    return "" if not math.isfinite(x) else f"{x:.6g}"


def _human_tokens(x: float) -> str:
    if not math.isfinite(x):
        return "–"
    if x >= 1e6:
        return f"{x / 1e6:.2f} M"
    if x >= 1e4:
        return f"{x / 1e3:.1f} k"
    return f"{x:.0f}"


@dataclass
class EfficiencyTable:
    """Paper tables 7 (raw) and 8 (normalised to GRPO): per method, mean over seeds."""

    rows: dict[str, dict[str, list[float]]]  # label -> column -> per-seed values
    reference: str | None = "GRPO"

    def value(self, label: str, column: str) -> float:
        return mean_sd(self.rows[label].get(column, []))[0]

    def normalised(self, label: str, column: str) -> float:
        if self.reference is None or self.reference not in self.rows:
            return float("nan")
        ref = self.value(self.reference, column)
        v = self.value(label, column)
        return v / ref if ref and math.isfinite(ref) and math.isfinite(v) else float("nan")

    @staticmethod
    def fmt(column: str, v: float) -> str:
        if not math.isfinite(v):
            return "–"
        if column.endswith("_h"):
            return f"{v:.3g}"
        if column == "tokens":
            return _human_tokens(v)
        return f"{v:.0f}"

    def markdown(self) -> str:
        head = ["Method", *EFFICIENCY_COLUMNS]
        seeds = sorted({len(v) for r in self.rows.values() for v in r.values() if v})
        lines = [f"Compute per method (paper table 7), mean over {_seeds_text(seeds)}:", "", "| " + " | ".join(head) + " |", "|---|" + "---:|" * len(EFFICIENCY_COLUMNS)]
        for lab in self.rows:
            lines.append(f"| {lab} | " + " | ".join(self.fmt(c, self.value(lab, c)) for c in EFFICIENCY_COLUMNS) + " |")
        lines += ["", "train_h: training-step wall clock (generation, localization, suffixes, verification, update); gen_h: engine sampling (rollouts, suffixes, localization); val_h: all evaluations; total_h = train_h + val_h; tokens: tokens sampled in training steps; resp_mean: mean response length over rollouts (reset prefix included); gen_tok_s = tokens / gen time.", ""]
        if self.reference in self.rows:
            lines += [f"Normalised to {self.reference} (paper table 8, {self.reference} = 1.00):", "", "| " + " | ".join(head) + " |", "|---|" + "---:|" * len(EFFICIENCY_COLUMNS)]
            for lab in self.rows:
                lines.append(f"| {lab} | " + " | ".join(_fmt2(self.normalised(lab, c)) for c in EFFICIENCY_COLUMNS) + " |")
        else:
            lines.append(f"(no {self.reference} row: nothing to normalise to)")
        return "\n".join(lines) + "\n"

    def csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        norm = self.reference in self.rows
        w.writerow(["method", "seeds", *EFFICIENCY_COLUMNS, *((f"{c}_vs_{self.reference.lower()}" for c in EFFICIENCY_COLUMNS) if norm else ())])
        for lab, per in self.rows.items():
            seeds = max((len(v) for v in per.values()), default=0)
            row = [lab, seeds, *(_num(self.value(lab, c)) for c in EFFICIENCY_COLUMNS)]
            if norm:
                row += [_num(self.normalised(lab, c)) for c in EFFICIENCY_COLUMNS]
            w.writerow(row)
        return buf.getvalue()


def _fmt2(v: float) -> str:
    return f"{v:.2f}" if math.isfinite(v) else "–"


def results_table(labels: list[str], benchmarks: list[str], results: list[TrainingResult]) -> ResultsTable:
    rows = {lab: {b: [] for b in benchmarks} for lab in labels}
    for r in sorted(results, key=lambda r: r.seed):
        for b, acc in r.final.items():
            if b in rows[r.label]:
                rows[r.label][b].append(acc)
    base: dict[str, float] = {}
    for b in benchmarks:
        vals = [r.base[b] for r in results if b in r.base]
        if vals:
            base[b] = _mean(vals)
    return ResultsTable(benchmarks, rows, base or None)


def efficiency_table(labels: list[str], results: list[TrainingResult]) -> EfficiencyTable:
    rows = {lab: {c: [] for c in EFFICIENCY_COLUMNS} for lab in labels}
    for r in results:
        for c, v in r.efficiency().items():
            rows[r.label][c].append(v)
    return EfficiencyTable(rows, "GRPO" if "GRPO" in rows else None)


def plot_learning_curves(labels: list[str], benchmarks: list[str], results: list[TrainingResult], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    cols = min(len(benchmarks), 4) or 1
    nrows = math.ceil(len(benchmarks) / cols) or 1
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.3 * nrows), squeeze=False)
    for ax, b in zip(axes.flat, benchmarks):
        for lab in labels:
            by_step: dict[int, list[float]] = {}
            for r in results:
                if r.label == lab:
                    for s, acc in r.curves.get(b, []):
                        by_step.setdefault(int(s), []).append(100 * acc)
            if not by_step:
                continue
            steps = sorted(by_step)
            stats = [mean_sd(by_step[s]) for s in steps]
            mean = [m for m, _ in stats]
            sd = [s or 0.0 for _, s in stats]
            (line,) = ax.plot(steps, mean, marker="o", label=lab)
            ax.fill_between(steps, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)], color=line.get_color(), alpha=0.15)
        lo, hi = ax.get_ylim()
        lo, hi = max(0.0, lo), min(100.0, hi)
        if hi - lo < 10:  # flat curves (e.g. all 0%): a readable band around them
            mid = (lo + hi) / 2
            lo, hi = max(0.0, mid - 5), min(100.0, max(0.0, mid - 5) + 10)
        ax.set_ylim(lo - 1, hi + 1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(b)
        ax.set_xlabel("training step")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(benchmarks) :]:
        ax.axis("off")
    handles, names = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, names, loc="lower center", ncol=len(names), bbox_to_anchor=(0.5, -0.02))
    fig.suptitle("Accuracy vs training step (mean ± SD over seeds)")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---- the comparison --------------------------------------------------------------------------------


def open_parent_run(plan: ComparisonPlan, experiment: str, tracking_uri: str) -> ComparisonPlan:
    """Create the parent MLflow run and point every spec at it (nothing stays active)."""
    from srpo_core import tracking

    uri = tracking.check_tracking_reachable(tracking_uri)
    client = tracking.client(uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(experiment)
    cfg = from_dict(plan.config)
    tags = {"comparison_id": plan.comparison_id, "kind": "comparison", "model": cfg.model.name_or_path, "task": cfg.data.task, "preset": cfg.name}
    run = client.create_run(exp_id, run_name=f"compare {plan.comparison_id}", tags=tags)
    seeds = sorted({s.seed for s in plan.specs})
    params = {"compare.methods": json.dumps(plan.labels), "compare.seeds": json.dumps(seeds), "compare.benchmarks": json.dumps(plan.benchmarks), "compare.steps": str(max((s.steps for s in plan.specs), default=0)), "compare.eval_items": json.dumps(plan.specs[0].eval_items if plan.specs else {})}
    params.update(tracking.flatten_config(plan.config))
    tracking.log_params(client, run.info.run_id, {k: tracking.truncate_value(v) for k, v in params.items()})
    plan.tracking_uri, plan.experiment_id, plan.parent_run_id = uri, exp_id, run.info.run_id
    for s in plan.specs:
        s.tracking_uri, s.experiment_id, s.parent_run_id = uri, exp_id, run.info.run_id
    return plan


@dataclass
class ComparisonOutput:
    results_md: Path
    results_csv: Path
    efficiency_md: Path
    efficiency_csv: Path
    curves_png: Path
    runs_jsonl: Path
    results: ResultsTable
    efficiency: EfficiencyTable


def finish_comparison(plan: ComparisonPlan | dict, results: list[TrainingResult | dict], status: str = "FINISHED") -> ComparisonOutput:
    """Tables, curves and ``runs.jsonl`` into ``plan.out_dir``, logged to the parent run."""
    if isinstance(plan, dict):
        plan = ComparisonPlan(**{**plan, "specs": [RunSpec(**s) if isinstance(s, dict) else s for s in plan["specs"]]})
    results = [TrainingResult.from_dict(r) if isinstance(r, dict) else r for r in results]
    out = Path(plan.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rt = results_table(plan.labels, plan.benchmarks, results)
    et = efficiency_table(plan.labels, results)
    paths = ComparisonOutput(out / "results.md", out / "results.csv", out / "efficiency.md", out / "efficiency.csv", out / "learning_curves.png", out / "runs.jsonl", rt, et)
    paths.results_md.write_text(f"# Comparison {plan.comparison_id}\n\n" + rt.markdown())
    paths.results_csv.write_text(rt.csv())
    paths.efficiency_md.write_text(f"# Efficiency {plan.comparison_id}\n\n" + et.markdown())
    paths.efficiency_csv.write_text(et.csv())
    plot_learning_curves(plan.labels, plan.benchmarks, results, paths.curves_png)
    paths.runs_jsonl.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in results))
    (out / "comparison.json").write_text(json.dumps({"comparison_id": plan.comparison_id, "labels": plan.labels, "benchmarks": plan.benchmarks, "parent_run_id": plan.parent_run_id, "tracking_uri": plan.tracking_uri, "trainings": [s.training_id for s in plan.specs]}, indent=1))
    if plan.parent_run_id:
        from srpo_core import tracking

        client = tracking.client(plan.tracking_uri)
        for p in (paths.results_md, paths.results_csv, paths.efficiency_md, paths.efficiency_csv):
            client.log_artifact(plan.parent_run_id, str(p), artifact_path="tables")
        client.log_artifact(plan.parent_run_id, str(paths.curves_png), artifact_path="figures")
        client.log_artifact(plan.parent_run_id, str(paths.runs_jsonl))
        client.set_terminated(plan.parent_run_id, status)
    return paths


def run_comparison(plan: ComparisonPlan, progress: bool = True) -> tuple[list[TrainingResult], ComparisonOutput]:
    """The in-process fan-out: every spec in turn (what flows/compare_flow.py runs as a foreach)."""
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
    p.add_argument("--config", default="tiny", help="preset name (tiny, paper, paper_olmo) or a YAML file")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--splits", nargs="+", choices=SPLITS, help="reset splits for rrpo/srpo (default: the config's)")
    p.add_argument("--localizers", nargs="+", choices=[loc for loc in LOCALIZERS if loc != "random"], help="srpo localizers (default: the config's, else self)")
    p.add_argument("--seeds", nargs="+", type=int, default=list(PAPER_SEEDS), help="training seeds (default: the paper's 0 42 420)")
    p.add_argument("--steps", type=int, help="training steps per run (default: train.max_steps, else all of train.epochs)")
    p.add_argument("--benchmarks", nargs="+", default=[], metavar="NAME[:N]", help="evaluate on these too, besides eval.benchmarks (task or benchmark names; :N = items for that one)")
    p.add_argument("--eval-items", type=int, help="items per benchmark without :N (default: eval.items_per_benchmark)")
    p.add_argument("--eval-every", type=int, help="evaluate every K steps too (default: eval.every_steps; 0: before and after)")
    p.add_argument("--samples", type=int, default=1, help="samples per item for pass@k (default 1: greedy accuracy only)")
    p.add_argument("--pass-k", type=int, nargs="*", default=[], help="k values of pass@k (each <= --samples)")
    p.add_argument("--long-prompts", choices=("truncate", "skip", "error"), default="truncate", help="prompts over rollout.max_prompt_tokens (default: truncate, counted)")
    p.add_argument("--set", action="extend", nargs="+", metavar="KEY=VALUE", help="override dotted config keys (several per flag, or repeat the flag)")
    p.add_argument("--out", default="runs/compare", help="output directory")
    p.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    p.add_argument("--no-mlflow", action="store_true", help="write the files only")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default; 1 is fastest for the tiny model on a busy machine)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from srpo_core import tracking
    from srpo_core.config import load_config
    from srpo_core.config import parse_overrides

    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    bad_k = [k for k in args.pass_k if k < 1 or k > args.samples]
    if bad_k:
        raise SystemExit(f"--pass-k {bad_k}: each k must be in 1..--samples ({args.samples})")
    cfg = load_config(args.config, parse_overrides(args.set or []))
    plan = plan_comparison(cfg, methods=args.methods, splits=args.splits, localizers=args.localizers, seeds=args.seeds, steps=args.steps, benchmarks=args.benchmarks, eval_items=args.eval_items, eval_every=args.eval_every, out_dir=args.out, long_prompts=args.long_prompts, samples=args.samples, ks=args.pass_k, progress=not args.quiet)
    if not args.no_mlflow:
        plan = open_parent_run(plan, args.experiment, tracking.resolve_tracking_uri(args.tracking_uri))
    print(f"comparison {plan.comparison_id}: {len(plan.specs)} trainings ({', '.join(plan.labels)} x seeds {' '.join(map(str, args.seeds))}), {plan.specs[0].steps if plan.specs else 0} steps each, benchmarks {', '.join(plan.benchmarks)}")
    t0 = time.perf_counter()
    _, out = run_comparison(plan, progress=not args.quiet)
    print()
    print(out.results_md.read_text())
    print(out.efficiency_md.read_text())
    print(f"wall time {time.perf_counter() - t0:.0f}s; files in {args.out}: results.md/.csv, efficiency.md/.csv, learning_curves.png, runs.jsonl")
    if plan.parent_run_id:
        print(f"MLflow: {plan.tracking_uri} experiment {args.experiment!r}, parent run {plan.parent_run_id} (children tagged comparison_id={plan.comparison_id})")
    return 0


if __name__ == "__main__":  # python -m srpo_core.compare ...
    import sys

    parser = argparse.ArgumentParser(prog="srpo")
    register(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args(["compare", *sys.argv[1:]])
    sys.exit(ns.func(ns))

"""The comparison's reports: paper table 3 (methods x benchmarks, mean ± SD over seeds), tables
7/8 (efficiency), learning curves (accuracy vs step and vs rollouts consumed), pass@k curves and
table, and the MLflow parent run that holds them."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from srpo_core.compare.plan import ComparisonPlan, RunSpec
from srpo_core.compare.run import TrainingResult, _mean
from srpo_core.config import from_dict

SHORT_NAMES = {
    "numinamath_olympiads": "oly", "hmmt_nov_2025": "hmmt", "math_level5": "lvl5", "strategyqa": "stra",
    "acereason_math": "ace", "sciknoweval_chemistry": "chem", "sciknoweval_biology": "bio",
    "commonsenseqa": "csqa", "sciknoweval_materials": "mat", "sciknoweval_physics": "phys",
    "livecodebench_medium": "lcbm", "synthetic": "synth", "synthetic_long": "synthL", "math500": "m500", "aime24": "aime24", "gsm8k": "gsm8k",
}  # fmt: skip
EFFICIENCY_COLUMNS = ("train_h", "gen_h", "val_h", "total_h", "tokens", "rollouts", "resp_mean", "gen_tok_s")
EFFICIENCY_LEGEND = (
    "train_h: training-step wall clock (generation, localization, suffixes, verification, update); gen_h: engine sampling "
    "(rollouts, suffixes, localization); val_h: all evaluations; total_h = train_h + val_h; tokens: every token the policy "
    "generated in training steps = trained rollouts (tokens/trained: base, shared-prefix suffixes without their copied prefix, "
    "fallback) + seeds (tokens/seed) + chains dropped by the seed search (tokens/dropped) + localization answers "
    "(tokens/localization); an audit judge model's tokens and evaluation tokens are not counted; rollouts: chains the policy "
    "sampled in training steps, as consumed (every rollout record: trained, seeds, suffixes, refinements, second attempts; "
    "SPO-Tree segments are counted in their leaves; plus chains dropped by the seed search), not the nominal budget; "
    "resp_mean: mean response length over rollouts (reset prefix included); gen_tok_s = tokens / gen time."
)


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
        if column in ("tokens", "rollouts"):
            return _human_tokens(v)
        return f"{v:.0f}"

    def markdown(self) -> str:
        head = ["Method", *EFFICIENCY_COLUMNS]
        seeds = sorted({len(v) for r in self.rows.values() for v in r.values() if v})
        lines = [f"Compute per method (paper table 7), mean over {_seeds_text(seeds)}:", "", "| " + " | ".join(head) + " |", "|---|" + "---:|" * len(EFFICIENCY_COLUMNS)]
        for lab in self.rows:
            lines.append(f"| {lab} | " + " | ".join(self.fmt(c, self.value(lab, c)) for c in EFFICIENCY_COLUMNS) + " |")
        lines += ["", EFFICIENCY_LEGEND, ""]
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


def _curve_band(values: list[float], n_items: int) -> tuple[float, float, float]:
    """(mean, low, high) in %: mean ± SD over seeds when there are several, else the Wilson 95%
    interval of one accuracy over its `n_items` evaluation items (no band without them)."""
    from srpo_core.audit import wilson

    m, sd = mean_sd(values)
    if sd is not None:
        return m, m - sd, m + sd
    if n_items > 0:
        lo, hi = wilson(round(m / 100 * n_items), n_items)
        return m, 100 * lo, 100 * hi
    return m, m, m


def legend_below(fig, ax, ncol: int = 3, fontsize: int = 8) -> None:
    """One legend of `ax`'s lines below the figure's panels, at most `ncol` columns."""
    handles, names = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, names, loc="outside lower center", ncol=min(len(names), ncol), fontsize=fontsize)


def save_figure(fig, path: Path, pad_inches: float = 0.1) -> Path:
    """`path` written with a tight bounding box (its folder made) and the figure closed."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight", pad_inches=pad_inches)
    plt.close(fig)
    return path


def _finish_panels(fig, axes, n_panels: int, legend_cols: int, title: str, path: Path) -> Path:
    """The common end of a per-benchmark panel figure: the unused panels hidden, the first panel's
    legend below the panels, the title above, saved."""
    for ax in list(axes.flat)[n_panels:]:
        ax.axis("off")
    legend_below(fig, axes.flat[0], legend_cols, fontsize=9)
    fig.suptitle(title, fontsize=11)
    return save_figure(fig, path)


def plot_learning_curves(labels: list[str], benchmarks: list[str], results: list[TrainingResult], path: Path, x: str = "step") -> Path:
    """Accuracy against training step (`x="step"`) or against the rollouts consumed in training
    up to the evaluation (`x="rollouts"`, TrainingResult.rollouts_at: the actual count, mean over
    seeds) per benchmark, one line per method with its interval band (mean ± SD over seeds; a
    single seed: Wilson 95% over the evaluation items). Every text stays inside the saved figure
    (constrained layout, legend below the panels, tight bounding box)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if x not in ("step", "rollouts"):
        raise ValueError(f"x must be 'step' or 'rollouts', got {x!r}")
    cols = min(len(benchmarks), 4) or 1
    nrows = math.ceil(len(benchmarks) / cols) or 1
    fig, axes = plt.subplots(nrows, cols, figsize=(4.4 * cols, 3.4 * nrows + 0.8), squeeze=False, layout="constrained")
    seeds_per_label = {lab: len({r.seed for r in results if r.label == lab}) for lab in labels}
    for ax, b in zip(axes.flat, benchmarks):
        for lab in labels:
            by_step: dict[int, list[float]] = {}
            at_step: dict[int, list[float]] = {}  # rollouts consumed up to the step, per seed
            n_items = 0
            for r in results:
                if r.label == lab:
                    n_items = max(n_items, int(r.n.get(b, 0)))
                    consumed = {int(s): c for s, c in r.rollouts_at}
                    for s, acc in r.curves.get(b, []):
                        if x == "rollouts" and int(s) not in consumed:
                            continue
                        by_step.setdefault(int(s), []).append(100 * acc)
                        at_step.setdefault(int(s), []).append(consumed.get(int(s), s))
            if not by_step:
                continue
            steps = sorted(by_step)
            xs = steps if x == "step" else [_mean(at_step[s]) for s in steps]
            bands = [_curve_band(by_step[s], n_items) for s in steps]
            (line,) = ax.plot(xs, [m for m, _, _ in bands], marker="o", label=lab)
            ax.fill_between(xs, [lo for _, lo, _ in bands], [hi for _, _, hi in bands], color=line.get_color(), alpha=0.15)
        lo, hi = ax.get_ylim()
        lo, hi = max(0.0, lo), min(100.0, hi)
        if hi - lo < 10:  # flat curves (e.g. all 0%): a readable band around them
            mid = (lo + hi) / 2
            lo, hi = max(0.0, mid - 5), min(100.0, max(0.0, mid - 5) + 10)
        ax.set_ylim(lo - 1, hi + 1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=5))
        ax.set_title(b, fontsize=10)
        ax.set_xlabel("training step" if x == "step" else "rollouts consumed in training")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    several = [lab for lab, k in seeds_per_label.items() if k > 1]
    band = "mean ± SD over seeds" if len(several) == len(labels) else ("Wilson 95% over items (one seed)" if not several else "± SD over seeds; one seed: Wilson 95%")
    return _finish_panels(fig, axes, len(benchmarks), 4, f"Accuracy vs {'training step' if x == 'step' else 'rollouts consumed'} ({band})", path)


# ---- pass@k ----------------------------------------------------------------------------------------

T95 = "t95 over seeds"
WILSON95 = "Wilson 95% over items"


def t_interval(values) -> tuple[float, float, float]:
    """(mean, low, high) of the 95% Student t interval of the mean over >= 2 values:
    mean ± t_{0.975, S-1} SD / sqrt(S) (sample SD)."""
    from scipy.stats import t

    xs = [float(v) for v in values]
    m, sd = mean_sd(xs)
    if sd is None:
        raise ValueError(f"a t interval needs >= 2 values, got {len(xs)}")
    half = float(t.ppf(0.975, len(xs) - 1)) * sd / math.sqrt(len(xs))
    return m, m - half, m + half


def passk_interval(values: list[float], n_items: int) -> tuple[float, float, float, str]:
    """(mean, low, high, kind) of pass@k values (fractions), clipped to [0, 1].

    Several seeds: the 95% t interval over the seeds' pass@k (T95). One value: the Wilson 95%
    score interval over the `n_items` items at p = pass@k (WILSON95; an item's unbiased pass@k
    lies in [0, 1] with mean p, so its variance is at most p (1 - p), the Bernoulli one: the
    interval is conservative, and matches the learning curves' one-seed band)."""
    from srpo_core.audit import wilson

    if not values:
        return float("nan"), float("nan"), float("nan"), ""
    if len(values) >= 2:
        m, lo, hi = t_interval(values)
        return m, max(0.0, lo), min(1.0, hi), T95
    m = float(values[0])
    lo, hi = wilson(m * n_items, n_items) if n_items > 0 else (float("nan"), float("nan"))
    return m, lo, hi, WILSON95


@dataclass
class PassKTable:
    """pass@k per method (and `Base`: the step-0 evaluation, seed-invariant), benchmark and k,
    final evaluation, with a 95% interval (:func:`passk_interval`)."""

    benchmarks: list[str]
    ks: list[int]
    rows: dict[str, dict[str, dict[int, list[float]]]]  # label -> benchmark -> k -> per-seed pass@k (fractions)
    n_items: dict[str, int]  # items per benchmark
    base: dict[str, dict[int, float]] | None = None  # benchmark -> k -> step-0 pass@k

    def labels(self) -> list[str]:
        return (["Base"] if self.base else []) + list(self.rows)

    def cell(self, label: str, benchmark: str, k: int) -> tuple[float, float, float, str]:
        """(mean, low, high, interval kind), fractions."""
        if label == "Base":
            v = (self.base or {}).get(benchmark, {}).get(k)
            return passk_interval([] if v is None else [v], self.n_items.get(benchmark, 0))
        return passk_interval(self.rows[label].get(benchmark, {}).get(k, []), self.n_items.get(benchmark, 0))

    def seeds(self, label: str) -> int:
        return 1 if label == "Base" else max((len(v) for per in self.rows[label].values() for v in per.values()), default=0)

    @staticmethod
    def fmt(m: float, lo: float, hi: float) -> str:
        if not math.isfinite(m):
            return "–"
        return f"{100 * m:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]" if math.isfinite(lo) else f"{100 * m:.1f}"

    def markdown(self) -> str:
        lines = []
        for b in self.benchmarks:
            lines += [f"### {b} ({self.n_items.get(b, 0)} items)", "", "| Method | " + " | ".join(f"pass@{k}" for k in self.ks) + " |", "|---|" + "---:|" * len(self.ks)]
            for lab in self.labels():
                lines.append(f"| {lab} | " + " | ".join(self.fmt(*self.cell(lab, b, k)[:3]) for k in self.ks) + " |")
            lines.append("")
        seeds = sorted({self.seeds(lab) for lab in self.rows})
        lines.append(
            f"pass@k (%) after training, unbiased estimator over the samples of each item, mean over {_seeds_text(seeds)} "
            f"[95% interval: with several seeds the t interval over seeds; with one seed, and for Base (the step-0 model, the same "
            f"for every seed), the Wilson score interval over the items at p = pass@k, conservative for per-item values in [0, 1]]."
        )
        return "\n".join(lines) + "\n"

    def csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["benchmark", "method", "k", "seeds", "items", "mean", "ci_low", "ci_high", "interval"])
        for b in self.benchmarks:
            for lab in self.labels():
                for k in self.ks:
                    m, lo, hi, kind = self.cell(lab, b, k)
                    w.writerow([b, lab, k, self.seeds(lab), self.n_items.get(b, 0), _num(100 * m), _num(100 * lo), _num(100 * hi), kind])
        return buf.getvalue()


def passk_table(labels: list[str], benchmarks: list[str], results: list[TrainingResult]) -> PassKTable | None:
    """The pass@k table of the final evaluations (None when no training has pass@k)."""
    ks = sorted({int(k) for r in results for per in r.pass_at.values() for k in per})
    if not ks:
        return None
    rows: dict[str, dict[str, dict[int, list[float]]]] = {lab: {b: {k: [] for k in ks} for b in benchmarks} for lab in labels}
    n_items: dict[str, int] = {}
    base_vals: dict[str, dict[int, list[float]]] = {}
    for r in sorted(results, key=lambda r: r.seed):
        for b, per in r.pass_at.items():
            if b in rows[r.label]:
                n_items[b] = max(n_items.get(b, 0), int(r.n.get(b, 0)))
                for k, v in per.items():
                    rows[r.label][b][int(k)].append(float(v))
        for b, per in r.base_pass_at.items():
            for k, v in per.items():
                base_vals.setdefault(b, {}).setdefault(int(k), []).append(float(v))
    base = {b: {k: _mean(v) for k, v in per.items()} for b, per in base_vals.items()}
    return PassKTable(list(benchmarks), ks, rows, n_items, base or None)


def plot_passk_curves(table: PassKTable, path: Path) -> Path:
    """pass@k against k (log2 axis) per benchmark, one line per method with its 95% band
    (PassKTable.cell) and the step-0 Base curve dashed. Texts stay inside the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    bench = table.benchmarks
    cols = min(len(bench), 4) or 1
    nrows = math.ceil(len(bench) / cols) or 1
    fig, axes = plt.subplots(nrows, cols, figsize=(4.4 * cols, 3.4 * nrows + 0.8), squeeze=False, layout="constrained")
    kinds = set()
    for ax, b in zip(axes.flat, bench):
        for lab in table.labels():
            cells = [table.cell(lab, b, k) for k in table.ks]
            pts = [(k, c) for k, c in zip(table.ks, cells) if math.isfinite(c[0])]
            if not pts:
                continue
            ks = [k for k, _ in pts]
            style = {"color": "0.4", "linestyle": "--", "marker": "s"} if lab == "Base" else {"marker": "o"}
            (line,) = ax.plot(ks, [100 * c[0] for _, c in pts], label=lab, **style)
            if all(math.isfinite(c[1]) for _, c in pts):
                ax.fill_between(ks, [100 * c[1] for _, c in pts], [100 * c[2] for _, c in pts], color=line.get_color(), alpha=0.12)
            kinds |= {c[3] for _, c in pts if lab != "Base"}
        ax.set_xscale("log", base=2)
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticks(table.ks, [str(k) for k in table.ks], fontsize=8 if len(table.ks) <= 8 else 7)
        lo, hi = ax.get_ylim()
        ax.set_ylim(max(0.0, lo) - 1, min(100.0, max(hi, lo + 10)) + 1)
        ax.set_title(b, fontsize=10)
        ax.set_xlabel("k (samples per item)")
        ax.set_ylabel("pass@k (%)")
        ax.grid(alpha=0.3)
    band = " / ".join(sorted(kinds)) or WILSON95
    return _finish_panels(fig, axes, len(bench), 5, f"pass@k after training (band: {band}; Base: step 0, dashed)", path)


def plot_audits(labels: list[str], specs: list[RunSpec], out: Path) -> list[Path]:
    """The localization audit figure (srpo_core/audit.plot_audit) of each method row, from the
    rollouts.jsonl of its trainings (all seeds and steps); rows without judged seeds get none."""
    from srpo_core import audit

    paths = []
    for lab in labels:
        records = []
        for s in specs:
            if s.label == lab:
                for f in sorted(Path(s.out_dir).glob("steps/*/rollouts.jsonl")):
                    records += audit.read_records(f.read_text())
        slug = "".join(c if c.isalnum() else "_" for c in lab).strip("_").lower()
        path = out / f"audit_{slug}.png"
        if audit.plot_audit(records, path, title=f"Localization audit: {lab}") is not None:
            paths.append(path)
    return paths


# ---- the comparison --------------------------------------------------------------------------------


def open_parent_run(plan: ComparisonPlan, experiment: str, tracking_uri: str) -> ComparisonPlan:
    """Create the parent MLflow run and point every spec at it (nothing stays active)."""
    from srpo_core import tracking

    uri = tracking.check_tracking_reachable(tracking_uri)
    client = tracking.client(uri)
    exp_id = tracking.ensure_experiment(client, experiment)
    cfg = from_dict(plan.config)
    tags = {"comparison_id": plan.comparison_id, "kind": "comparison", "model": cfg.model.name_or_path, "task": cfg.data.task, "preset": cfg.name}
    run = client.create_run(exp_id, run_name=f"compare {plan.comparison_id}", tags=tags)
    seeds = sorted({s.seed for s in plan.specs})
    params = {
        "compare.methods": json.dumps(plan.labels),
        "compare.seeds": json.dumps(seeds),
        "compare.benchmarks": json.dumps(plan.benchmarks),
        "compare.steps": str(max((s.steps for s in plan.specs), default=0)),
        "compare.eval_items": json.dumps(plan.specs[0].eval_items if plan.specs else {}),
        "compare.budget": plan.budget,
        "compare.rollouts_per_step": json.dumps({s.label: s.rollouts_per_step for s in plan.specs}),
        "compare.samples": str(plan.specs[0].samples if plan.specs else 1),
        "compare.pass_k": json.dumps(plan.specs[0].ks if plan.specs else []),
    }
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
    audit_pngs: list[Path] = field(default_factory=list)  # localization audit figures, one per method row with judged seeds
    rollouts_png: Path | None = None  # accuracy vs rollouts consumed
    passk: PassKTable | None = None  # with --samples > 1: pass@k table and curves
    passk_md: Path | None = None
    passk_csv: Path | None = None
    passk_png: Path | None = None


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
    paths.rollouts_png = plot_learning_curves(plan.labels, plan.benchmarks, results, out / "accuracy_vs_rollouts.png", x="rollouts")
    paths.passk = passk_table(plan.labels, plan.benchmarks, results)
    if paths.passk is not None:
        paths.passk_md, paths.passk_csv, paths.passk_png = out / "passk.md", out / "passk.csv", out / "passk_curves.png"
        paths.passk_md.write_text(f"# pass@k {plan.comparison_id}\n\n" + paths.passk.markdown())
        paths.passk_csv.write_text(paths.passk.csv())
        plot_passk_curves(paths.passk, paths.passk_png)
    paths.audit_pngs = plot_audits(plan.labels, plan.specs, out)
    paths.runs_jsonl.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in results))
    (out / "comparison.json").write_text(
        json.dumps(
            {
                "comparison_id": plan.comparison_id,
                "labels": plan.labels,
                "benchmarks": plan.benchmarks,
                "parent_run_id": plan.parent_run_id,
                "tracking_uri": plan.tracking_uri,
                "trainings": [s.training_id for s in plan.specs],
            },
            indent=1,
        )
    )
    if plan.parent_run_id:
        from srpo_core import tracking

        client = tracking.client(plan.tracking_uri)
        for p in (paths.results_md, paths.results_csv, paths.efficiency_md, paths.efficiency_csv, paths.passk_md, paths.passk_csv):
            if p is not None:
                client.log_artifact(plan.parent_run_id, str(p), artifact_path="tables")
        for fig in (paths.curves_png, paths.rollouts_png, paths.passk_png, *paths.audit_pngs):
            if fig is not None:
                client.log_artifact(plan.parent_run_id, str(fig), artifact_path="figures")
        client.log_artifact(plan.parent_run_id, str(paths.runs_jsonl))
        client.set_terminated(plan.parent_run_id, status)
    return paths


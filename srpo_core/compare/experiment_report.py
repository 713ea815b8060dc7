"""The report of an experiment (compare/experiment.py): a pure function of the comparison's files
(experiment.json, runs.jsonl, and per training metrics.jsonl, eval/step_*/outcomes.jsonl and
steps/*/rollouts.jsonl) to one markdown file and its figures.

    write_report(Path("runs/fidelity"), Path("docs/fidelity.md"))   # figures in docs/fidelity/

Sections: provenance (command, commit, seeds, steps, items, wall time, MLflow run), every claim
with its verdict (verdicts.RULES, decided from the data), the decision rules, then accuracy
before/after, learning curves, accuracy against rollouts consumed, the split and loss ablations,
the gradient-signal ratio per step, the clean vs erroneous correction rates, diagnostics and
compute; each figure with the claims it tests beside it. Accuracy intervals are paired over
seeds and items (verdicts module doc); rates pooled over steps and seeds carry Wilson intervals.
The claims are decided on the first benchmark (eval.benchmarks[0] of the preset); the accuracy
table shows every benchmark.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from srpo_core.compare.report import legend_below, save_figure
from srpo_core.compare.run import TrainingResult
from srpo_core.compare.verdicts import (
    HELD,
    INCONCLUSIVE,
    NOT_HELD,
    NOT_RUN,
    RULES,
    Decision,
    Interval,
    RatioInterval,
    paired_interval,
    t975,
    wilson,
)

ROLLOUT_KINDS = ("base", "shared_prefix", "fallback", "seed", "dropped")  # metrics rollouts/<kind>/count: every chain a training step sampled
BUDGET_TOLERANCE = 0.10  # rollouts per step within 10% of the reference arm's count as the same budget
SECTION_TITLES = {
    "accuracy": "1. Accuracy before and after training",
    "curves": "2. Learning curves",
    "budget": "3. Accuracy against rollouts consumed",
    "splits": "4. Split ablation",
    "clip": "5. Loss ablation (clip)",
    "g_ratio": "6. Gradient-signal ratio per step",
    "audit": "7. Clean vs erroneous prefixes",
}


# ---- the data ----------------------------------------------------------------------------------------


@dataclass
class ArmData:
    """One arm's trainings (one per seed) and what the report reads of them."""

    key: str
    label: str
    method: str
    results: dict[int, TrainingResult] = field(default_factory=dict)  # seed -> result
    outcomes: dict[int, dict[int, dict[str, float]]] = field(default_factory=dict)  # seed -> eval step -> item id -> 1/0 (first benchmark)
    metrics: dict[int, list[dict]] = field(default_factory=dict)  # seed -> per-step training metrics
    audit: list = field(default_factory=list)  # audit.AuditRow, pooled over seeds and steps

    @property
    def seeds(self) -> list[int]:
        return sorted(self.results)

    @property
    def eval_steps(self) -> list[int]:
        """Evaluation steps every seed has."""
        common = None
        for per in self.outcomes.values():
            common = set(per) if common is None else common & set(per)
        return sorted(common or ())

    @property
    def final_step(self) -> int | None:
        steps = self.eval_steps
        return steps[-1] if steps else None

    def rollouts_by_step(self, seed: int) -> list[float]:
        """Chains sampled in each training step of `seed` (trained, seeds, dropped by the seed search)."""
        return [sum(float(m.get(f"rollouts/{k}/count", 0.0)) for k in ROLLOUT_KINDS) for m in self.metrics.get(seed, [])]

    def consumed_at(self, step: int) -> float:
        """Mean over seeds of the rollouts consumed before evaluation step `step` (after `step` updates)."""
        vals = [sum(self.rollouts_by_step(s)[:step]) for s in self.seeds]
        return sum(vals) / len(vals) if vals else float("nan")

    @property
    def rollouts_per_step(self) -> float:
        per = [x for s in self.seeds for x in self.rollouts_by_step(s)]
        return sum(per) / len(per) if per else float("nan")

    def metric_values(self, key: str) -> list[float]:
        return [float(m[key]) for s in self.seeds for m in self.metrics.get(s, []) if key in m and _finite(m[key])]


@dataclass
class ExperimentData:
    info: dict
    benchmark: str
    arms: dict[str, ArmData]  # key -> data, in the design's order (arms without trainings left out)
    out_dir: Path

    @property
    def design(self) -> dict:
        return self.info["design"]


def _finite(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def _jsonl(path: Path) -> list[dict]:
    from srpo_core.audit import read_records

    return read_records(path.read_text(), str(path)) if path.exists() else []


def load(out_dir: Path) -> ExperimentData:
    """Read a finished experiment's directory (the --out of `srpo compare --preset`)."""
    from srpo_core import audit

    out_dir = Path(out_dir)
    info_path = out_dir / "experiment.json"
    if not info_path.exists():
        raise FileNotFoundError(f"{info_path}: not an experiment's output (written by `srpo compare --preset NAME`)")
    info = json.loads(info_path.read_text())
    runs = _jsonl(out_dir / "runs.jsonl")
    if not runs:
        raise FileNotFoundError(f"{out_dir / 'runs.jsonl'}: missing or empty (the comparison did not finish)")
    benchmark = info["benchmarks"][0]
    arm_of = {tid: v["arm"] for tid, v in info["trainings"].items()}
    arms = {a["key"]: ArmData(a["key"], a["label"], a["method"]) for a in info["arms"]}
    for row in runs:
        r = TrainingResult.from_dict(row)
        key = arm_of.get(r.training_id)
        if key is None:
            raise ValueError(f"{out_dir / 'runs.jsonl'}: training {r.training_id} is not in experiment.json")
        arm = arms[key]
        arm.results[r.seed] = r
        tdir = out_dir / "trainings" / r.training_id
        arm.metrics[r.seed] = _jsonl(tdir / "metrics.jsonl")
        per_step: dict[int, dict[str, float]] = {}
        for f in sorted(tdir.glob("eval/step_*/outcomes.jsonl")):
            step = int(f.parent.name.removeprefix("step_"))
            per_step[step] = {str(o["id"]): float(bool(o.get("correct"))) for o in _jsonl(f) if o.get("benchmark") == benchmark and not o.get("skipped")}
        arm.outcomes[r.seed] = per_step
        for f in sorted(tdir.glob("steps/*/rollouts.jsonl")):
            arm.audit += audit.audit_rows(audit.read_records(f.read_text()))
    return ExperimentData(info, benchmark, {k: a for k, a in arms.items() if a.results}, out_dir)


# ---- numbers -----------------------------------------------------------------------------------------


def accuracy_interval(arm: ArmData, step: int, base: ArmData | None = None, base_step: int | None = None) -> Interval:
    """Accuracy of `arm` after `step` updates (paired over seeds x items), or with `base` the
    paired difference arm(step) - base(base_step, default `step`) on the seeds and items both have."""
    seeds = [s for s in arm.seeds if step in arm.outcomes.get(s, {})]
    if base is not None:
        bstep = step if base_step is None else base_step
        seeds = [s for s in seeds if bstep in base.outcomes.get(s, {})]
    if not seeds:
        return paired_interval([])
    items = set.intersection(*(set(arm.outcomes[s][step]) for s in seeds))
    if base is not None:
        items &= set.intersection(*(set(base.outcomes[s][bstep]) for s in seeds))
    items = sorted(items)
    rows = []
    for s in seeds:
        a = arm.outcomes[s][step]
        rows.append([a[i] - base.outcomes[s][bstep][i] for i in items] if base is not None else [a[i] for i in items])
    return paired_interval(rows, (-1.0, 1.0) if base is not None else (0.0, 1.0))


def identical_outcomes(a: ArmData, b: ArmData) -> bool:
    """Whether two arms scored the same on every item at every evaluation of every seed they
    share, after training (an ablation that changed nothing: its verdict says so, not "held")."""
    seeds = sorted(set(a.outcomes) & set(b.outcomes))
    trained = [(s, step) for s in seeds for step in set(a.outcomes[s]) & set(b.outcomes[s]) if step > 0]
    return bool(trained) and all(a.outcomes[s][step] == b.outcomes[s][step] for s, step in trained)


IDENTICAL = (
    "the arms scored the same on every item at every evaluation of every seed: the ablation changed nothing here (a clip never acts "
    "when each training step takes one optimizer step on freshly sampled rollouts: the importance ratio is 1), so it tests nothing"
)


def gain_interval(arm: ArmData) -> Interval:
    """After minus before, per seed and item (the same model before training for every seed)."""
    steps = arm.eval_steps
    if len(steps) < 2 or steps[0] != 0:
        return paired_interval([])
    return accuracy_interval(arm, steps[-1], arm, 0)


def budget_step(arm: ArmData, budget: float) -> int | None:
    """The last evaluation step of `arm` whose rollouts consumed do not exceed `budget`."""
    ok = [s for s in arm.eval_steps if arm.consumed_at(s) <= budget * (1 + 1e-9)]
    return ok[-1] if ok else None


def g_ratio_counts(arm: ArmData) -> tuple[int, int]:
    """(steps with g ratio > 1, steps where it is defined), pooled over seeds."""
    vals = arm.metric_values("grad_signal/ratio")
    return sum(v > 1 for v in vals), len(vals)


def correction_ratio(arm: ArmData) -> tuple[dict, RatioInterval]:
    from srpo_core import audit

    rates = audit.correction_rates(arm.audit)
    c, e = rates["clean"]["suffix"], rates["erroneous"]["suffix"]
    return rates, RatioInterval(c.k, c.n, e.k, e.n)


# ---- verdicts ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    key: str
    text: str
    source: str
    section: str
    status: str
    reason: str
    evidence: str


def _pct(x: float, signed: bool = False) -> str:
    if not _finite(x):
        return "–"
    return f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"


def decide_claim(claim: dict, data: ExperimentData) -> Verdict:
    """The verdict of one claim of the design (experiment.Claim as a dict) from the data."""
    rule = RULES[claim["rule"]]
    params = claim.get("params") or {}
    missing = [a for a in claim["arms"] if a not in data.arms]
    base = dict(key=claim["key"], text=claim["text"], source=claim.get("source", ""), section=claim["section"])
    if missing:
        return Verdict(**base, status=NOT_RUN, reason=f"arm{'s' if len(missing) > 1 else ''} {', '.join(missing)} not run", evidence="–")
    arms = [data.arms[a] for a in claim["arms"]]
    if rule.evidence in ("diff", "diff_budget"):
        first, others = arms[0], arms[1:]
        diffs, parts = [], []
        for other in others:
            if rule.evidence == "diff_budget":
                budget = min(first.consumed_at(first.final_step), other.consumed_at(other.final_step)) if first.final_step is not None and other.final_step is not None else float("nan")
                s1, s2 = budget_step(first, budget), budget_step(other, budget)
                d = accuracy_interval(first, s1, other, s2) if s1 is not None and s2 is not None else paired_interval([])
                where = f" at ≤ {budget:,.0f} rollouts (steps {s1} and {s2})"
            else:
                d = accuracy_interval(first, first.final_step, other, other.final_step) if first.final_step is not None and other.final_step is not None else paired_interval([])
                where = ""
            diffs.append(d)
            parts.append(f"{first.label} − {other.label}{where}: {d.points(signed=True)} points")
        if rule.evidence == "diff" and all(identical_outcomes(first, other) for other in others):
            decision = Decision(INCONCLUSIVE, IDENTICAL)
        elif claim["rule"] == "best_of":
            decision = rule.decide(diffs)
        elif "margin" in params:
            decision = rule.decide(diffs[0], float(params["margin"]))
        else:
            decision = rule.decide(diffs[0])
        evidence = "; ".join(parts)
    elif rule.evidence == "g_ratio":
        k, n = g_ratio_counts(arms[0])
        threshold = float(params.get("threshold", 0.5))
        decision = rule.decide(k, n, threshold)
        lo, hi = wilson(k, n)
        evidence = f"{arms[0].label}: g > 1 on {k} of {n} (seed, step) pairs, {_pct(k / n) if n else '–'}% [{_pct(lo)}, {_pct(hi)}]"
    elif rule.evidence == "correction":
        rates, ratio = correction_ratio(arms[0])
        band = tuple(float(x) for x in params.get("band", (1.5, 3.0)))
        decision = rule.decide(ratio, band)
        lo, hi = ratio.interval
        c, e = rates["clean"]["suffix"], rates["erroneous"]["suffix"]
        evidence = f"{arms[0].label}: clean {c.k}/{c.n}, erroneous {e.k}/{e.n}; ratio {ratio.ratio:.2f} [{lo:.2f}, {hi:.2f}]" + (" (0.5 added to each cell)" if ratio.corrected else "")
    else:  # pragma: no cover - RULES and this function change together
        raise ValueError(f"claim {claim['key']}: rule {claim['rule']!r} reads unknown evidence {rule.evidence!r}")
    assert isinstance(decision, Decision)
    return Verdict(**base, status=decision.status, reason=decision.reason, evidence=evidence)


# ---- figures -----------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _curve_points(arm: ArmData, x_of) -> tuple[list[float], list[float], list[float], list[float]]:
    xs, ms, los, his = [], [], [], []
    for s in arm.eval_steps:
        iv = accuracy_interval(arm, s)
        if iv.defined:
            xs.append(x_of(s))
            ms.append(100 * iv.mean)
            los.append(100 * iv.lo)
            his.append(100 * iv.hi)
    return xs, ms, los, his


def plot_curves(arms: list[ArmData], path: Path, title: str, x: str = "step") -> Path:
    """Accuracy (95% band, paired over seeds x items) against the training step, or against the
    rollouts consumed (`x="rollouts"`), one line per arm."""
    from matplotlib.ticker import MaxNLocator

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.6), layout="constrained")
    for arm in arms:
        xs, ms, los, his = _curve_points(arm, (lambda s: s) if x == "step" else arm.consumed_at)
        if not xs:
            continue
        (line,) = ax.plot(xs, ms, marker="o", ms=3, label=arm.label)
        ax.fill_between(xs, los, his, color=line.get_color(), alpha=0.12)
    if x == "step":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="training step" if x == "step" else "rollouts consumed (chains sampled in training)", ylabel="accuracy (%)")
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    legend_below(fig, ax, ncol=4)
    return save_figure(fig, path, pad_inches=0.15)


def plot_bars(arms: list[ArmData], path: Path, title: str, reference: ArmData | None = None) -> Path:
    """Final accuracy per arm with its 95% interval; the reference arm's as a dashed line."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.2), layout="constrained")
    names, vals, errs = [], [], [[], []]
    for arm in arms:
        iv = accuracy_interval(arm, arm.final_step) if arm.final_step is not None else paired_interval([])
        names.append(arm.label)
        v = 100 * iv.mean if iv.defined else 0.0
        vals.append(v)
        errs[0].append(v - 100 * iv.lo if iv.defined else 0.0)
        errs[1].append(100 * iv.hi - v if iv.defined else 0.0)
    ax.bar(range(len(names)), vals, yerr=errs, capsize=5, color="tab:blue", alpha=0.75)
    ax.set_xticks(range(len(names)), names, fontsize=8)
    if reference is not None and reference.final_step is not None:
        iv = accuracy_interval(reference, reference.final_step)
        if iv.defined:
            ax.axhline(100 * iv.mean, color="gray", ls="--", lw=1, label=f"{reference.label} {100 * iv.mean:.1f}%")
            ax.legend(fontsize=8, loc="lower right")
    ax.set(ylabel="accuracy after training (%)")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title, fontsize=10)
    return save_figure(fig, path, pad_inches=0.15)


def plot_g_ratio(arms: list[ArmData], path: Path) -> Path:
    """Per step: the gradient-signal ratio (mean over seeds where defined, log scale, each seed as
    a dot) and the share of prompts where both groups carry signal."""
    plt = _plt()
    fig, (ax_g, ax_s) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    for arm in arms:
        by_step: dict[int, list[float]] = {}
        share: dict[int, list[float]] = {}
        for s in arm.seeds:
            for m in arm.metrics.get(s, []):
                if _finite(m.get("grad_signal/ratio")) and m["grad_signal/ratio"] > 0:
                    by_step.setdefault(int(m["step"]), []).append(float(m["grad_signal/ratio"]))
                if _finite(m.get("grad_signal/both_groups_share")):
                    share.setdefault(int(m["step"]), []).append(float(m["grad_signal/both_groups_share"]))
        if by_step:
            steps = sorted(by_step)
            (line,) = ax_g.plot(steps, [math.exp(sum(map(math.log, by_step[s])) / len(by_step[s])) for s in steps], marker="o", ms=3, label=arm.label)
            for s in steps:
                ax_g.scatter([s] * len(by_step[s]), by_step[s], s=6, color=line.get_color(), alpha=0.35)
        if share:
            steps = sorted(share)
            ax_s.plot(steps, [100 * sum(share[s]) / len(share[s]) for s in steps], marker="o", ms=3, label=arm.label)
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_g, ax_s):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_g.axhline(1.0, color="gray", ls="--", lw=1)
    ax_g.set_yscale("log")
    ax_g.set(xlabel="training step", ylabel="g ratio (shared prefix / base)", title="(a) g ratio: geometric mean over seeds; dots: seeds")
    ax_s.set(xlabel="training step", ylabel="prompts (%)", title="(b) prompts where both groups carry signal")
    ax_s.set_ylim(0, 100)
    for ax in (ax_g, ax_s):
        ax.grid(alpha=0.3)
        ax.title.set_fontsize(10)
    legend_below(fig, ax_s if ax_s.get_legend_handles_labels()[0] else ax_g, ncol=4)
    return save_figure(fig, path, pad_inches=0.15)


def plot_correction(arms: list[ArmData], path: Path) -> Path:
    """Correction rate of suffixes from clean vs erroneous prefixes per arm (pooled over steps and
    seeds, Wilson 95%)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(arms) + 2), 4.2), layout="constrained")
    width = 0.38
    for j, (name, color) in enumerate((("clean", "tab:green"), ("erroneous", "tab:red"))):
        vals, errs = [], [[], []]
        for arm in arms:
            rate = correction_ratio(arm)[0][name]["suffix"]
            lo, hi = rate.interval
            v = rate.value if rate.n else 0.0
            vals.append(100 * v)
            errs[0].append(100 * (v - lo) if rate.n else 0.0)
            errs[1].append(100 * (hi - v) if rate.n else 0.0)
        pos = [i + (j - 0.5) * width for i in range(len(arms))]
        ax.bar(pos, vals, width, yerr=errs, capsize=4, color=color, alpha=0.8, label=f"{name} prefix")
        for x, arm in zip(pos, arms):
            rate = correction_ratio(arm)[0][name]["suffix"]
            ax.text(x, 1, f"{rate.k}/{rate.n}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(arms)), [a.label for a in arms], fontsize=8)
    ax.set(ylabel="correct suffixes (%)", title="Suffix correction rate by prefix (Wilson 95%; pooled over steps and seeds)")
    ax.title.set_fontsize(10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    return save_figure(fig, path, pad_inches=0.15)


# ---- markdown ----------------------------------------------------------------------------------------


@dataclass
class ReportOutput:
    markdown: Path
    figures_dir: Path
    figures: dict[str, Path]
    verdicts: list[Verdict]
    summary: str  # the claims table, for the console


def _duration(seconds: float) -> str:
    if not _finite(seconds):
        return "–"
    h, rem = divmod(int(round(seconds)), 3600)
    m, s = divmod(rem, 60)
    return f"{h} h {m:02d} min" if h else (f"{m} min {s:02d} s" if m else f"{s} s")


def _table(head: list[str], rows: list[list[str]], align: str = "") -> list[str]:
    align = align or "l" + "r" * (len(head) - 1)
    return ["| " + " | ".join(head) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|", *("| " + " | ".join(r) + " |" for r in rows)]


def _verdict_line(v: Verdict) -> str:
    return f"> **Claim: {v.text}** ({v.source}) — **{v.status}**: {v.reason}. {v.evidence}."


def _verdict_lines(verdicts: list[Verdict], section: str) -> list[str]:
    """The claims a section's figure tests, one quoted paragraph each."""
    return [x for v in verdicts if v.section == section for x in (_verdict_line(v), "")]


def _claims_table(verdicts: list[Verdict]) -> list[str]:
    rows = [[v.text, v.source, f"§{SECTION_TITLES[v.section].split('.')[0]}", f"**{v.status}**", v.evidence] for v in verdicts]
    return _table(["Claim", "Paper", "Tested in", "Verdict", "Evidence (percentage points; 95% intervals)"], rows, "lllll")


def _rules_text(data: ExperimentData) -> list[str]:
    seeds = data.info.get("seeds", [])
    lines = [
        "**Accuracy intervals** (tables, curves, differences) are 95% intervals paired over seeds and items: every arm and seed is scored on the "
        "same items, and two arms with the same seed saw the same prompts in the same order, so a difference is taken per (seed, item) first. "
        "Half-width = sqrt(h_s² + h_i²), with the seed term h_s = t(0.975, S−1) · SD of the S per-seed means / √S and the item term "
        "h_i = 1.96 · SD of the N per-item means (over seeds) / √N "
        + (f"(S = {len(seeds)} seeds: t = {t975(len(seeds) - 1):.3f})." if len(seeds) > 1 else "(one seed: no seed term, the interval covers the items only).")
        + " The interval is cut to [0, 100]% for an accuracy and [−100, +100] points for a difference. Both terms include the seed × item interaction,"
        " so the interval errs on the wide side. Skipped items (none unless `--long-prompts skip`) are left out.",
        "",
        "**Rates** (g > 1 share, correction rates) pool every (seed, step) and carry Wilson 95% intervals; the clean/erroneous ratio carries Katz's "
        "log interval (0.5 added to each cell when a count is 0). Steps of one seed are not independent: read those intervals as optimistic.",
        "",
        "Decision rules (fixed in `srpo_core/compare/experiment.py` and `verdicts.py` before any run; each verdict is computed, never written by hand):",
        "",
    ]
    used = {}
    for c in data.design["claims"]:
        used.setdefault(c["rule"], c.get("params") or {})
    for name, params in used.items():
        extra = ", ".join(f"{k} = {_param(k, v)}" for k, v in params.items())
        lines.append(f"- `{name}`: {RULES[name].text}" + (f" ({extra})" if extra else ""))
    lines.append("")
    return lines


def _param(key: str, value) -> str:
    if key == "margin":
        return f"{100 * float(value):.0f} accuracy points"
    if isinstance(value, list | tuple):
        return f"[{', '.join(f'{float(x):g}' for x in value)}]"
    return f"{value}"


def _accuracy_rows(data: ExperimentData) -> list[list[str]]:
    rows = []
    first = next(iter(data.arms.values()))
    if first.eval_steps and first.eval_steps[0] == 0:
        rows.append(["Base (before training)", "–", accuracy_interval(first, 0).points(), "", "", ""])
    for arm in data.arms.values():
        fin = arm.final_step
        before = accuracy_interval(arm, 0) if 0 in arm.eval_steps else paired_interval([])
        after = accuracy_interval(arm, fin) if fin is not None else paired_interval([])
        rows.append([arm.label, str(len(arm.seeds)), before.points(), after.points(), gain_interval(arm).points(signed=True), f"{arm.rollouts_per_step:.0f}"])
    return rows


def _other_benchmarks(data: ExperimentData) -> list[str]:
    """Accuracy on the other benchmarks (mean ± SD over seeds, from runs.jsonl): no per-item pairing there."""
    from srpo_core.compare.report import mean_sd

    others = [b for b in data.info["benchmarks"] if b != data.benchmark]
    if not others:
        return []
    rows = []
    for arm in data.arms.values():
        cells = []
        for b in others:
            m, sd = mean_sd([r.final[b] for r in arm.results.values() if b in r.final])
            cells.append("–" if not _finite(m) else (f"{100 * m:.1f}" if sd is None else f"{100 * m:.1f} ± {100 * sd:.1f}"))
        rows.append([arm.label, *cells])
    return ["Other benchmarks (accuracy after training, mean ± SD over seeds; not used by the verdicts):", "", *_table(["Arm", *others], rows), ""]


def _budget_lines(data: ExperimentData) -> list[str]:
    ref_key = data.design.get("reference") or next(iter(data.arms))
    ref = data.arms.get(ref_key)
    if ref is None or not _finite(ref.rollouts_per_step) or ref.rollouts_per_step <= 0:
        return []
    off = [f"{a.label} {a.rollouts_per_step:.0f}" for a in data.arms.values() if _finite(a.rollouts_per_step) and abs(a.rollouts_per_step / ref.rollouts_per_step - 1) > BUDGET_TOLERANCE]
    if not off:
        return [f"Every arm sampled within {100 * BUDGET_TOLERANCE:.0f}% of {ref.label}'s {ref.rollouts_per_step:.0f} rollouts per step.", ""]
    return [
        f"**Unequal budgets**: rollouts per step differ by more than {100 * BUDGET_TOLERANCE:.0f}% from {ref.label}'s {ref.rollouts_per_step:.0f}: {', '.join(off)}. "
        "Compare those arms in the figure against rollouts consumed, not by step.",
        "",
    ]


def _g_rows(data: ExperimentData, arms: list[ArmData]) -> list[list[str]]:
    rows = []
    for arm in arms:
        k, n = g_ratio_counts(arm)
        lo, hi = wilson(k, n)
        vals = sorted(arm.metric_values("grad_signal/ratio"))
        med = vals[len(vals) // 2] if len(vals) % 2 else (sum(vals[len(vals) // 2 - 1 : len(vals) // 2 + 1]) / 2 if vals else float("nan"))
        shares = arm.metric_values("grad_signal/both_groups_share")
        steps = sum(len(arm.metrics.get(s, [])) for s in arm.seeds)
        rows.append(
            [
                arm.label,
                f"{n} of {steps}",
                f"{k} ({_pct(k / n) if n else '–'}% [{_pct(lo)}, {_pct(hi)}])",
                f"{med:.2f}" if _finite(med) else "–",
                f"{_pct(sum(shares) / len(shares)) if shares else '–'}%",
            ]
        )
    return rows


def _audit_rows(arms: list[ArmData]) -> list[list[str]]:
    rows = []
    for arm in arms:
        rates, ratio = correction_ratio(arm)
        cells = [arm.label]
        for name in ("clean", "erroneous"):
            for kind in ("suffix", "pass_at_g"):
                r = rates[name][kind]
                lo, hi = r.interval
                cells.append(f"{r.k}/{r.n} = {_pct(r.value)}% [{_pct(lo)}, {_pct(hi)}]" if r.n else "–")
        lo, hi = ratio.interval
        cells.append(f"{ratio.ratio:.2f} [{lo:.2f}, {hi:.2f}]" if ratio.defined else "–")
        rows.append(cells)
    return rows


DIAGNOSTICS = (
    ("reward/base/mean", "base reward", "pct"),
    ("groups/base/zero_adv_share", "flat base groups", "pct"),
    ("groups/shared_prefix/zero_adv_share", "flat suffix groups", "pct"),
    ("seed_search/found_share", "prompts with a seed", "pct"),
    ("reset/relative_mean", "reset position (0 = start)", "num"),
    ("localization/oracle_agreement", "reset = first error", "pct"),
    ("grad_signal/both_groups_share", "both groups carry signal", "pct"),
    ("learner/grad_norm", "grad norm", "num"),
)


def _diagnostic_rows(data: ExperimentData) -> list[list[str]]:
    rows = []
    for arm in data.arms.values():
        cells = [arm.label]
        for key, _, kind in DIAGNOSTICS:
            vals = arm.metric_values(key)
            m = sum(vals) / len(vals) if vals else float("nan")
            cells.append("–" if not _finite(m) else (f"{100 * m:.1f}%" if kind == "pct" else f"{m:.3g}"))
        rows.append(cells)
    return rows


def _compute_rows(data: ExperimentData) -> list[list[str]]:
    rows = []
    for arm in data.arms.values():
        rs = list(arm.results.values())
        n = len(rs)
        rows.append(
            [
                arm.label,
                str(n),
                _duration(sum(r.wall_s for r in rs) / n),
                _duration(sum(r.train_s for r in rs) / n),
                _duration(sum(r.val_s for r in rs) / n),
                f"{arm.rollouts_per_step:.0f}",
                f"{sum(r.tokens for r in rs) / n / 1e3:.1f} k",
            ]
        )
    return rows


def render(data: ExperimentData, figures: dict[str, str], verdicts: list[Verdict]) -> str:
    """The report's markdown (figures: name -> path relative to the report)."""
    info, d = data.info, data.design
    arms = list(data.arms.values())
    walls = [r.wall_s for a in arms for r in a.results.values()]
    n_items = accuracy_interval(arms[0], arms[0].final_step).items if arms[0].final_step is not None else 0
    mlflow = (
        f"experiment `{info['experiment']}`, parent run `{info['parent_run_id']}` at `{info['tracking_uri']}` (one child run per training)"
        if info.get("parent_run_id")
        else "not logged (`--no-mlflow`)"
    )
    lines = [
        f"# {d['title']}",
        "",
        d["question"],
        "",
        f"_Written by `srpo compare --preset {d['name']}` (`srpo_core/compare/experiment_report.py`) from the comparison in `{data.out_dir}`; rerun the command to change it, never edit it by hand._",
        "",
        *_table(
            ["", ""],
            [
                ["command", f"`{info['command']}`"],
                ["commit", f"`{info['commit']}`"],
                ["preset / model", f"`{info['preset']}` / `{info['model']}`"],
                ["benchmark (claims)", f"`{data.benchmark}`, {n_items} items, the same for every arm and seed"],
                ["seeds", " ".join(map(str, info["seeds"]))],
                ["steps", f"{info['steps']} per training; evaluated after {', '.join(map(str, info['eval_steps']))} updates"],
                ["trainings", f"{len(walls)} ({len(arms)} arms × {len(info['seeds'])} seed{'s' if len(info['seeds']) != 1 else ''})"],
                [
                    "wall time",
                    f"{_duration(info.get('wall_s', float('nan')))} ({info.get('started', '?')} – {info.get('finished', '?')}); per training {_duration(sum(walls) / len(walls))} on average",
                ],
                ["MLflow", mlflow],
            ],
            "ll",
        ),
        "",
        "## Claims",
        "",
        *_claims_table(verdicts),
        "",
        f"{sum(v.status == HELD for v in verdicts)} held, {sum(v.status == NOT_HELD for v in verdicts)} not held, "
        f"{sum(v.status == INCONCLUSIVE for v in verdicts)} inconclusive" + (f", {sum(v.status == NOT_RUN for v in verdicts)} not run" if any(v.status == NOT_RUN for v in verdicts) else "") + ".",
        "",
        "### How intervals and verdicts are computed",
        "",
        *_rules_text(data),
        f"## {SECTION_TITLES['accuracy']}",
        "",
        f"Greedy accuracy on `{data.benchmark}` in percent, 95% intervals paired over seeds and items; after − before is paired per (seed, item).",
        "",
        *_table(["Arm", "seeds", "before", "after", "after − before", "rollouts / step"], _accuracy_rows(data)),
        "",
        *_other_benchmarks(data),
        *_verdict_lines(verdicts, "accuracy"),
        f"## {SECTION_TITLES['curves']}",
        "",
        f"![learning curves]({figures['curves']})",
        "",
        *_verdict_lines(verdicts, "curves"),
        f"## {SECTION_TITLES['budget']}",
        "",
        "Rollouts consumed: every chain sampled in training steps (base and suffix rollouts, seeds, fallback chains and chains dropped by the "
        "seed search; localization answers and evaluation not counted), mean over seeds. A claim at the rollouts consumed compares each arm at "
        "its last evaluation within the smaller of the two arms' final budgets.",
        "",
        *_budget_lines(data),
        f"![accuracy against rollouts consumed]({figures['budget']})",
        "",
        *_verdict_lines(verdicts, "budget"),
        f"## {SECTION_TITLES['splits']}",
        "",
        *_ablation(data, d.get("split_ablation") or (), figures.get("splits"), "splits"),
        *_verdict_lines(verdicts, "splits"),
        f"## {SECTION_TITLES['clip']}",
        "",
        *_ablation(data, d.get("clip_ablation") or (), figures.get("clip"), "clip"),
        *_verdict_lines(verdicts, "clip"),
        f"## {SECTION_TITLES['g_ratio']}",
        "",
        "g (paper app. 14.1): per rollout, |A| / T · Σ(1 − p_t) over its active tokens; averaged per prompt per group over rollouts with A ≠ 0; "
        "the ratio shared-prefix / base over the prompts where both groups carry signal (fallback groups excluded). Per (seed, step); a step "
        "without such a prompt has no ratio.",
        "",
    ]
    g_arms = [a for a in arms if a.metric_values("grad_signal/both_groups_share")]
    if g_arms:
        lines += [
            *_table(["Arm", "steps with a ratio", "g > 1 (Wilson 95%)", "median g", "both groups carry signal (mean)"], _g_rows(data, g_arms)),
            "",
            f"![g ratio per step]({figures['g_ratio']})",
            "",
        ]
    else:
        lines += ["No arm has shared-prefix groups: no g ratio.", ""]
    lines += [*_verdict_lines(verdicts, "g_ratio"), f"## {SECTION_TITLES['audit']}", ""]
    a_arms = [a for a in arms if a.audit]
    lines += [
        "Per seed, the judge (the task's step checker) names the first wrong thought j; the method reset at h. The prefix is clean when "
        "h ≤ j (it holds no wrong thought), erroneous otherwise. A suffix is correct when its reward is 1. Counts pooled over steps and seeds.",
        "",
    ]
    if a_arms:
        lines += [
            *_table(["Arm", "clean: per suffix", "clean: Pass@G", "erroneous: per suffix", "erroneous: Pass@G", "clean / erroneous (per suffix)"], _audit_rows(a_arms)),
            "",
            f"![correction rates]({figures['audit']})",
            "",
        ]
    else:
        lines += ["No judged seed: no audit.", ""]
    lines += [
        *_verdict_lines(verdicts, "audit"),
        "## 8. Diagnostics",
        "",
        "Means over every (seed, step), for reading why arms do or do not separate: a flat group (all rewards equal) carries no gradient; a reset late in the chain leaves few tokens to learn from.",
        "",
        *_table(["Arm", *(name for _, name, _ in DIAGNOSTICS)], _diagnostic_rows(data)),
        "",
        "## 9. Compute",
        "",
        *_table(["Arm", "trainings", "wall / training", "training steps", "evaluations", "rollouts / step", "tokens / training"], _compute_rows(data)),
        "",
    ]
    return "\n".join(lines)


def _ablation(data: ExperimentData, keys, figure: str | None, kind: str) -> list[str]:
    arms = [data.arms[k] for k in keys if k in data.arms]
    if len(arms) < 2 or figure is None:
        return [f"Not run ({', '.join(k for k in keys if k not in data.arms) or 'no arms'} missing).", ""]
    ref = arms[0]
    rows = []
    for arm in arms:
        after = accuracy_interval(arm, arm.final_step) if arm.final_step is not None else paired_interval([])
        diff = accuracy_interval(ref, ref.final_step, arm, arm.final_step) if arm is not ref and ref.final_step is not None and arm.final_step is not None else None
        rows.append([arm.label, after.points(), gain_interval(arm).points(signed=True), "–" if diff is None else diff.points(signed=True)])
    return [*_table(["Arm", "after", "after − before", f"{ref.label} − arm"], rows), "", f"![{kind} ablation]({figure})", ""]


def write_report(out_dir: Path, report: Path) -> ReportOutput:
    """Read the experiment in `out_dir`, write `report` and its figures into `<report without
    suffix>/` (docs/fidelity.md -> docs/fidelity/)."""
    data = load(out_dir)
    report = Path(report)
    fig_dir = report.with_suffix("")
    d = data.design
    arms = list(data.arms.values())
    ablations = [list(d.get("split_ablation") or ()), list(d.get("clip_ablation") or ())]
    ablation_only = {k for group in ablations for k in group[1:]} - {group[0] for group in ablations if group}  # the ablations' other arms: in their own figures
    main = [a for a in arms if a.key not in ablation_only]
    paths = {
        "curves": plot_curves(main, fig_dir / "learning_curves.png", f"Accuracy on {data.benchmark} vs training step (95% band, paired over seeds × items)"),
        "budget": plot_curves(main, fig_dir / "accuracy_vs_rollouts.png", f"Accuracy on {data.benchmark} vs rollouts consumed (95% band)", x="rollouts"),
    }
    split = [data.arms[k] for k in d.get("split_ablation") or () if k in data.arms]
    if len(split) >= 2:
        paths["splits"] = plot_bars(split, fig_dir / "split_ablation.png", "Split ablation: accuracy after training (95% interval)", reference=data.arms.get(d.get("reference", "")))
    clip = [data.arms[k] for k in d.get("clip_ablation") or () if k in data.arms]
    if len(clip) >= 2:
        paths["clip"] = plot_curves(clip, fig_dir / "clip_ablation.png", "Loss ablation: accuracy vs training step (95% band)")
    g_arms = [a for a in arms if a.metric_values("grad_signal/both_groups_share")]
    if g_arms:
        paths["g_ratio"] = plot_g_ratio(g_arms, fig_dir / "g_ratio.png")
    a_arms = [a for a in arms if a.audit]
    if a_arms:
        paths["audit"] = plot_correction(a_arms, fig_dir / "correction_rates.png")
    verdicts = [decide_claim(c, data) for c in d["claims"]]
    rel = {k: str(p.relative_to(report.parent)) if p.is_relative_to(report.parent) else str(p) for k, p in paths.items()}
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(render(data, rel, verdicts))
    summary = "\n".join(f"{v.status:>12}  {v.text}: {v.evidence}" for v in verdicts)
    return ReportOutput(report, fig_dir, paths, verdicts, summary)


def log_report(tracking_uri: str, run_id: str, out: ReportOutput) -> None:
    """The report and its figures as artifacts of the comparison's parent run (`report/`), each
    verdict as a tag `claim.<key>`."""
    from srpo_core import tracking

    client = tracking.client(tracking_uri)
    client.log_artifact(run_id, str(out.markdown), artifact_path="report")
    for p in out.figures.values():
        client.log_artifact(run_id, str(p), artifact_path=f"report/{out.figures_dir.name}")
    for v in out.verdicts:
        client.set_tag(run_id, f"claim.{v.key}", v.status)

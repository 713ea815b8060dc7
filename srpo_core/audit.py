"""The localization audit (paper app. 15 / fig. 4, REFERENCE "Localization audit"), live: per step,
for every seed, the judge's first wrong thought next to the reset the method chose, and whether
suffixes sampled from clean prefixes correct more often than those from erroneous ones.

Judge (`method.audit_judge`)
    ""          the task's step checker where it has one (every seed), else no audit
    "none"      no audit
    "checker"   the step checker (a task without one is a configuration error at the first step)
    a model     a local path, hub id or builtin:NAME, loaded once per process through our engines
                (`rollout.engine`), or an http(s):// URL of a running srpo inference server
                (srpo_core/server). On `method.audit_sample` seeds per shard and step (0: all,
                else a seeded sample), sent the policy's own localization prompt verbatim
                (`method.localization_template`, chat template where the judge has one), greedy,
                `method.audit_max_tokens` new tokens; the last `\\boxed{N}` with N in 1..n is its
                answer, any other reply is dropped (judge_status "unparsed"), an engine error too
                ("error"). The judge's tokens are not the policy's: no efficiency count holds them.
    The checker's answer is its first wrong thought within the chain (a chain that stopped early
    is wrong at its missing next thought: the judge names its last one, as the oracle resets).

Per judged seed (h = the reset index the method used, j = the judge's thought; both in 1..n)
    deviation      h - j (thoughts)
    eff5           meaningful thoughts (>= 5 whitespace words once `<...>` special tokens and the
                   stop string are stripped) before h minus those before j
    clean prefix   deviation <= 0 (x* holds no wrong thought); erroneous: deviation > 0
Per step (metrics `audit/...`, MLflow keys; `n` = judged seeds)
    audit/seeds, audit/judged_share, audit/deviation_mean, audit/exact_agreement (deviation 0),
    audit/within1_agreement (|deviation| <= 1), audit/eff5_deviation_mean,
    audit/eff5_exact_agreement, audit/eff5_within1_agreement,
    audit/deviation_hist/<b> for b in -4..4 (-4 counts deviations <= -4, 4 those >= 4),
    audit/<clean|erroneous>/seeds, /suffixes, /correction_rate (correct suffixes / suffixes),
    /pass_at_g (share of seeds with any correct suffix), each with Wilson 95% bounds `_lo`/`_hi`,
    audit/correction_ratio = clean / erroneous correction rate.
A suffix is correct when its reward is 1 (all tests passed for code).

Records in, numbers and a figure out: `audit_rows` reads step records (rollouts.Record or the dicts
of rollouts.jsonl), so the same functions serve a live step, the flow's end and a comparison.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from srpo_core import rollouts as R
from srpo_core import templates
from srpo_core.engine.base import RolloutEngine, SamplingParams
from srpo_core.tasks import Task
from srpo_core.verifiers.extract import last_boxed

log = logging.getLogger(__name__)

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
HIST_BINS = tuple(range(-4, 5))  # deviation bins; the ends hold everything beyond them
MEANINGFUL_WORDS = 5
_SPECIAL = re.compile(r"<\|[^<>|]*\|>|</?thought>|</?s>")
_BOXED_INT = re.compile(r"^\s*(\d+)\s*$")


# ---- the judge -------------------------------------------------------------------------------------


def judge_kind(spec: str, task: Task) -> str:
    """`method.audit_judge` -> "none" | "checker" | "server" | "model" for this task."""
    spec = spec.strip()
    if spec == "":
        return "checker" if task.has_step_checker else "none"
    if spec == "none":
        return "none"
    if spec == "checker":
        if not task.has_step_checker:
            raise ValueError(f"method.audit_judge: 'checker' needs a step checker; task {task.name!r} has none (name a judge model or URL, or 'none')")
        return "checker"
    return "server" if spec.startswith(("http://", "https://")) else "model"


_ENGINES: dict[tuple, RolloutEngine] = {}


def judge_engine(cfg) -> RolloutEngine:
    """The judge model's engine (`method.audit_judge`), built once per process."""
    spec = cfg.method.audit_judge.strip()
    key = (spec, cfg.rollout.engine, cfg.model.dtype)
    if key not in _ENGINES:
        if spec.startswith(("http://", "https://")):
            from srpo_core.engine.remote import RemoteEngine

            engine = RemoteEngine(spec)
            engine.check_ready()
        else:
            from srpo_core import runtime

            local = {"rollout.engine": "hf", "rollout.lora_dir": ""} if cfg.rollout.engine == "openai" else {}  # a vLLM server serves the policy, not the judge
            engine = runtime.build_engine(cfg.override(**{"model.name_or_path": spec, **local}))
        _ENGINES[key] = engine
    return _ENGINES[key]


def parse_judge(text: str, n_thoughts: int) -> int | None:
    """The judge's answer: the last `\\boxed{N}` with N in 1..n, else None (dropped)."""
    boxed = last_boxed(text)
    m = _BOXED_INT.match(boxed) if boxed is not None else None
    return int(m.group(1)) if m and 1 <= int(m.group(1)) <= n_thoughts else None


def checker_judge(task: Task, case: R.SeedCase) -> tuple[int | None, str]:
    k = task.first_error(case.item, case.seed.thoughts)
    return (R.oracle_reset(k, len(case.seed.spans)), "checker") if k is not None else (None, "no_error")


def judge_seeds(cases: list[R.SeedCase], locs: list[R.Localization], cfg, task: Task, seed: int, engine: RolloutEngine | None = None) -> list[R.Localization]:
    """The localizations with the judge's verdict added (`judge`, `judge_status`, `judge_tokens`).
    `engine` overrides the configured judge model (tests)."""
    kind = judge_kind(cfg.method.audit_judge, task) if engine is None else "model"
    if kind == "none" or not cases:
        return locs
    out = list(locs)
    if kind == "checker":
        for i, c in enumerate(cases):
            try:
                j, status = checker_judge(task, c)
            except Exception as exc:  # noqa: BLE001 - the audit never fails a step
                log.warning("audit: the step checker failed on a seed of item %r: %s: %s", c.item.id, type(exc).__name__, exc)
                j, status = None, "error"
            out[i] = dataclasses.replace(out[i], judge=j, judge_status=status)
        return out
    chosen = list(range(len(cases)))
    if 0 < cfg.method.audit_sample < len(cases):
        chosen = sorted(random.Random(seed).sample(chosen, cfg.method.audit_sample))
    try:
        engine = engine or judge_engine(cfg)
        prompts = [engine.encode_chat(templates.localization_prompt(cfg.method.localization_template, cases[i].item.question, cases[i].seed.thoughts)) for i in chosen]
        replies = engine.complete(prompts, cfg.method.audit_max_tokens, SamplingParams(temperature=0.0, seed=seed))
        if len(replies) != len(chosen):
            raise RuntimeError(f"the judge returned {len(replies)} replies for {len(chosen)} prompts")
    except Exception as exc:  # noqa: BLE001 - the audit never fails a step
        log.warning("audit: the judge %r failed on %d seeds: %s: %s", cfg.method.audit_judge, len(chosen), type(exc).__name__, exc)
        for i in chosen:
            out[i] = dataclasses.replace(out[i], judge=None, judge_status="error")
        return out
    for i, reply in zip(chosen, replies):
        j = parse_judge(reply.text, len(cases[i].seed.spans))
        out[i] = dataclasses.replace(out[i], judge=j, judge_status="boxed" if j is not None else "unparsed", judge_tokens=len(reply.ids))
    return out


# ---- per-seed rows from records ------------------------------------------------------------------


def meaningful(thought: str) -> bool:
    """A thought of at least 5 whitespace words once special tokens and the stop string are stripped."""
    return len(_SPECIAL.sub(" ", thought).split()) >= MEANINGFUL_WORDS


def eff5_deviation(thoughts: list[str], self_index: int, judge_index: int) -> int:
    """Meaningful thoughts before the self step minus meaningful thoughts before the judge step."""
    flags = [meaningful(t) for t in thoughts]
    return sum(flags[: self_index - 1]) - sum(flags[: judge_index - 1])


@dataclass(frozen=True)
class AuditRow:
    """One judged seed and the suffixes sampled from its reset."""

    group_id: str
    self_index: int
    judge_index: int
    eff5: int
    suffix_rewards: tuple[float, ...]

    @property
    def deviation(self) -> int:
        return self.self_index - self.judge_index

    @property
    def clean(self) -> bool:
        return self.deviation <= 0

    @property
    def correct(self) -> int:
        return sum(r >= 1.0 for r in self.suffix_rewards)


def _field(rec: Any, name: str) -> Any:
    if isinstance(rec, dict):
        return rec.get(name)
    if name == "thoughts":
        return rec.rollout.thoughts
    return getattr(rec, name)


def audit_rows(records: Iterable[Any]) -> list[AuditRow]:
    """The judged seeds of records (rollouts.Record or rollouts.jsonl dicts, any number of steps)."""
    records = list(records)
    suffixes: dict[str, list[float]] = {}
    for rec in records:
        if _field(rec, "group") == "shared_prefix":
            suffixes.setdefault(_field(rec, "group_id"), []).append(float(_field(rec, "reward")))
    rows = []
    for rec in records:
        judge = _field(rec, "judge_first_error")
        if _field(rec, "group") != "seed" or judge is None:
            continue
        gid, h = _field(rec, "group_id"), int(_field(rec, "reset_index"))
        rows.append(AuditRow(gid, h, int(judge), eff5_deviation(list(_field(rec, "thoughts")), h, int(judge)), tuple(suffixes.get(R.suffix_group_id(gid), ()))))
    return rows


def read_records(text: str, name: str = "rollouts.jsonl") -> list[dict]:
    """The objects of a JSON-lines text such as rollouts.jsonl (blank lines skipped; a bad line
    raises naming `name` and the line)."""
    import json

    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{name} line {i}: not JSON ({exc})") from None
    return out


# ---- numbers ---------------------------------------------------------------------------------------


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of k successes in n trials (nan, nan for n = 0)."""
    if n <= 0:
        return float("nan"), float("nan")
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, min(p, mid - half)), min(1.0, max(p, mid + half))  # k = 0 or n: mid - half is 0 only up to rounding


@dataclass(frozen=True)
class Rate:
    k: int
    n: int

    @property
    def value(self) -> float:
        return self.k / self.n if self.n else float("nan")

    @property
    def interval(self) -> tuple[float, float]:
        return wilson(self.k, self.n)


def correction_rates(rows: list[AuditRow]) -> dict[str, dict[str, Rate]]:
    """{"clean"|"erroneous": {"suffix": correct suffixes / suffixes, "pass_at_g": seeds with any
    correct suffix / seeds}} (seeds without suffixes are left out)."""
    out = {}
    for name, want in (("clean", True), ("erroneous", False)):
        rs = [r for r in rows if r.clean == want and r.suffix_rewards]
        out[name] = {"suffix": Rate(sum(r.correct for r in rs), sum(len(r.suffix_rewards) for r in rs)), "pass_at_g": Rate(sum(r.correct > 0 for r in rs), len(rs))}
    return out


def deviation_hist(values: Iterable[int]) -> dict[int, int]:
    hist = dict.fromkeys(HIST_BINS, 0)
    for v in values:
        hist[min(max(v, HIST_BINS[0]), HIST_BINS[-1])] += 1
    return hist


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def audit_metrics(records: Iterable[Any]) -> dict[str, float]:
    """The step's `audit/*` metrics (module doc); empty when no seed was judged."""
    records = list(records)
    n_seeds = sum(1 for r in records if _field(r, "group") == "seed")
    rows = audit_rows(records)
    if not rows:
        return {}
    dev = [r.deviation for r in rows]
    m = {
        "audit/seeds": float(len(rows)), "audit/judged_share": len(rows) / n_seeds,
        "audit/deviation_mean": _mean(dev), "audit/exact_agreement": _mean(float(d == 0) for d in dev),
        "audit/within1_agreement": _mean(float(abs(d) <= 1) for d in dev),
        "audit/eff5_deviation_mean": _mean(r.eff5 for r in rows), "audit/eff5_exact_agreement": _mean(float(r.eff5 == 0) for r in rows),
        "audit/eff5_within1_agreement": _mean(float(abs(r.eff5) <= 1) for r in rows),
    }  # fmt: skip
    m.update({f"audit/deviation_hist/{b}": float(c) for b, c in deviation_hist(dev).items()})
    rates = correction_rates(rows)
    for name, by in rates.items():
        m[f"audit/{name}/seeds"] = float(by["pass_at_g"].n)
        m[f"audit/{name}/suffixes"] = float(by["suffix"].n)
        for key, rate in (("correction_rate", by["suffix"]), ("pass_at_g", by["pass_at_g"])):
            lo, hi = rate.interval
            m[f"audit/{name}/{key}"], m[f"audit/{name}/{key}_lo"], m[f"audit/{name}/{key}_hi"] = rate.value, lo, hi
    clean, bad = rates["clean"]["suffix"].value, rates["erroneous"]["suffix"].value
    if math.isfinite(clean) and math.isfinite(bad) and bad > 0:
        m["audit/correction_ratio"] = clean / bad
    return {k: v for k, v in m.items() if not (isinstance(v, float) and math.isnan(v))}


# ---- the figure ------------------------------------------------------------------------------------


def plot_audit(records: Iterable[Any], path: Path | None = None, title: str = "Localization audit"):
    """Fig.-4-like figure from records: (a) the deviation self - judge (thoughts and eff5), (b) the
    correction rate of suffixes from clean vs erroneous prefixes, per suffix and as Pass@G, with
    Wilson 95% intervals. Saved to `path` when given; returns the matplotlib figure (closed when
    saved), or None when no seed was judged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = audit_rows(records)
    if not rows:
        return None
    fig, (ax_h, ax_c) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    width = 0.4
    h_thoughts = deviation_hist(r.deviation for r in rows)
    h_eff5 = deviation_hist(r.eff5 for r in rows)
    xs = list(HIST_BINS)
    ax_h.bar([x - width / 2 for x in xs], [h_thoughts[x] for x in xs], width, label="thoughts")
    ax_h.bar([x + width / 2 for x in xs], [h_eff5[x] for x in xs], width, label="eff5 (>= 5-word thoughts)")
    ax_h.set_xticks(xs, ["≤-4", *map(str, xs[1:-1]), "≥4"])
    ax_h.axvline(0.5, color="gray", ls="--", lw=1)
    ax_h.set(title=f"(a) deviation self - judge ({len(rows)} seeds)", xlabel="thoughts (≤ 0: clean prefix, > 0: erroneous)", ylabel="seeds")
    ax_h.yaxis.get_major_locator().set_params(integer=True)
    ax_h.legend(fontsize=8, loc="upper left")
    rates = correction_rates(rows)
    kinds = (("suffix", "per suffix"), ("pass_at_g", "Pass@G"))
    for i, (name, color) in enumerate((("clean", "tab:green"), ("erroneous", "tab:red"))):
        vals, errs, labels = [], [[], []], []
        for key, _ in kinds:
            rate = rates[name][key]
            lo, hi = rate.interval
            v = rate.value if rate.n else 0.0
            vals.append(100 * v)
            errs[0].append(100 * (v - lo) if rate.n else 0.0)
            errs[1].append(100 * (hi - v) if rate.n else 0.0)
            labels.append(f"{rate.k}/{rate.n}")
        pos = [k + (i - 0.5) * width for k in range(len(kinds))]
        ax_c.bar(pos, vals, width, yerr=errs, capsize=4, color=color, alpha=0.8, label=f"{name} prefix ({rates[name]['pass_at_g'].n} seeds)")
        for x, text in zip(pos, labels):
            ax_c.text(x, 2, text, ha="center", va="bottom", fontsize=8)
    ax_c.set_xticks(range(len(kinds)), [label for _, label in kinds])
    ax_c.set_ylim(0, 125)
    ax_c.set_yticks(range(0, 101, 20))
    ax_c.set(title="(b) correction rate (Wilson 95% CI)", ylabel="correct (%)")
    ax_c.legend(fontsize=8, loc="upper center", ncol=2)
    fig.suptitle(title)
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
    return fig

"""Evaluation through the rollout-engine interface.

:func:`evaluate` runs thought-structured decoding (SPEC 1: temperature ``cfg.eval.temperature``,
0 = greedy) over a task's items in batches of ``cfg.eval.batch_size`` requests, with a tqdm bar
per benchmark, and returns the accuracy with the number of items and per-item outcomes. A chain
is scored as in training (``rollouts.chain_reward``): one that ends without an answer
(``finish_reason`` other than ``answer``) gets 0 unless ``rollout.score_unfinished``.

pass@k
    With ``samples > 1`` and ``ks``, each item also gets ``samples`` sampled chains and pass@k is
    the unbiased estimator of Chen et al. 2021 (:func:`pass_at_k`), averaged over items. At
    ``eval.temperature == 0`` the accuracy stays the greedy one (the paper's number) and the
    samples are drawn at the rollout temperature/top-p (greedy samples would all be identical);
    at ``eval.temperature > 0`` one set of ``samples`` chains serves both and the accuracy is the
    mean correctness of the samples (the unbiased pass@1).

Prompts longer than ``rollout.max_prompt_tokens`` (``long_prompts``)
    ``"truncate"`` (default): the question is cut in the middle (its head and tail are kept, joined
    by ``" ... "``) to the longest text that fits; ``"skip"``: the item is left out of the
    accuracy and ``n``; ``"error"``: ValueError naming the item. Truncated and skipped items are
    counted in :class:`EvalResult` (and logged by :func:`evaluate_suite` as
    ``eval/<benchmark>/truncated`` / ``skipped``), and flagged per item in the outcomes.

:func:`evaluate_suite` evaluates several benchmarks (task names: ``synthetic`` or any registry
benchmark, see :mod:`srpo_core.tasks.benchmark`) and logs ``eval/<benchmark>/accuracy`` (and
pass@k as ``eval/<benchmark>/pass_at_<k>``: MLflow metric names cannot contain ``@``) to MLflow at the training step, plus the per-item outcomes as
``eval/step_<step>/outcomes.jsonl`` and ``.csv`` artifacts.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from srpo_core import templates
from srpo_core.config import Config
from srpo_core.engine.base import RolloutEngine, SamplingParams, ThoughtRequest
from srpo_core.rollouts import chain_reward
from srpo_core.shard import limits_of, sampling_of
from srpo_core.tasks import Task, TaskItem

log = logging.getLogger(__name__)

LONG_PROMPTS = ("truncate", "skip", "error")
TRUNCATION_MARK = " ... "
_REPORTED: set[tuple] = set()


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    prob = 1.0
    for i in range(n - c + 1, n + 1):
        prob *= 1.0 - k / i
    return 1.0 - prob


@dataclass
class EvalResult:
    name: str
    accuracy: float
    n: int
    outcomes: list[dict]
    pass_at: dict[int, float]
    generated_tokens: int
    truncated: int = 0  # prompts cut to fit rollout.max_prompt_tokens
    skipped: int = 0  # items left out (long_prompts="skip", or a template alone too long)
    seconds: float = 0.0
    samples: int = 1

    def metrics(self, prefix: str | None = None) -> dict[str, float]:
        """``eval/<name>/accuracy``, ``/pass_at_<k>``, ``/n``, ``/truncated``, ``/skipped``, ``/seconds``
        (pass@k is spelled ``pass_at_<k>``: MLflow metric names cannot contain ``@``)."""
        p = prefix or f"eval/{self.name}"
        out = {f"{p}/accuracy": self.accuracy, f"{p}/n": float(self.n), f"{p}/truncated": float(self.truncated), f"{p}/skipped": float(self.skipped), f"{p}/seconds": self.seconds}
        out.update({f"{p}/pass_at_{k}": v for k, v in self.pass_at.items()})
        return out


# ---- prompts -------------------------------------------------------------------------------------


@dataclass
class FittedPrompt:
    ids: list[int] | None  # None: skipped
    dropped_chars: int = 0  # chars cut from the question (0: untouched)


def middle_cut(text: str, keep: int) -> str:
    """``text`` shortened to its first ceil(keep/2) and last floor(keep/2) chars around the mark."""
    if keep >= len(text):
        return text
    head = (keep + 1) // 2
    tail = keep - head
    return text[:head] + TRUNCATION_MARK + (text[len(text) - tail :] if tail else "")


def fit_prompt(engine: RolloutEngine, cfg: Config, item: TaskItem, policy: str = "truncate", source: str = "prompts") -> FittedPrompt:
    """The item's rollout prompt ids, made to fit ``rollout.max_prompt_tokens`` by ``policy``."""
    if policy not in LONG_PROMPTS:
        raise ValueError(f"long_prompts must be one of {LONG_PROMPTS}, got {policy!r}")
    limit = cfg.rollout.max_prompt_tokens
    template = cfg.rollout.template

    def encode(question: str) -> list[int]:
        return engine.encode(templates.rollout_prompt(template, question))

    ids = encode(item.question)
    if len(ids) <= limit:
        return FittedPrompt(ids)
    if policy == "error":
        raise ValueError(f"{source}: item {item.id!r} has {len(ids)} prompt tokens > rollout.max_prompt_tokens={limit} (long_prompts='error')")
    if policy == "skip":
        return FittedPrompt(None)
    q = item.question
    lo, hi, best = 0, len(q) - 1, None  # largest kept length whose prompt fits (binary search)
    while lo <= hi:
        mid = (lo + hi) // 2
        cand = encode(middle_cut(q, mid))
        if len(cand) <= limit:
            best, lo = (mid, cand), mid + 1
        else:
            hi = mid - 1
    if best is None:  # even an empty question does not fit: the template alone is too long
        log.warning("%s: item %r: the template alone exceeds rollout.max_prompt_tokens=%d; skipped", source, item.id, limit)
        return FittedPrompt(None)
    return FittedPrompt(best[1], len(q) - best[0])


# ---- evaluation ----------------------------------------------------------------------------------


def _run(engine: RolloutEngine, prompts: list[list[int]], n: int, cfg: Config, sampling: SamplingParams, bar) -> list:
    out = []
    bs = cfg.eval.batch_size
    limits = limits_of(cfg)
    for start in range(0, len(prompts), bs):
        chunk = prompts[start : start + bs]
        out += engine.generate_thoughts([ThoughtRequest(tuple(p), n=n) for p in chunk], limits, sampling)
        if bar is not None:
            bar.update(len(chunk))
    return out


def evaluate(
    engine: RolloutEngine,
    task: Task,
    items: list[TaskItem],
    cfg: Config,
    samples: int = 1,
    ks: tuple[int, ...] = (),
    seed: int = 0,
    progress: bool = True,
    name: str | None = None,
    long_prompts: str = "truncate",
) -> EvalResult:
    """Accuracy of ``engine`` on ``items`` (see the module doc for pass@k and long prompts)."""
    name = name or task.name
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    bad_ks = [k for k in ks if k < 1 or k > samples]
    if bad_ks:
        raise ValueError(f"pass@k needs 1 <= k <= samples={samples}; got k={bad_ks}")
    t0 = time.perf_counter()
    fitted = [fit_prompt(engine, cfg, it, long_prompts, source=name) for it in items]
    kept = [i for i, f in enumerate(fitted) if f.ids is not None]
    prompts = [fitted[i].ids for i in kept]
    truncated = sum(1 for f in fitted if f.ids is not None and f.dropped_chars > 0)
    skipped = len(items) - len(kept)
    if truncated or skipped:
        key = (name, truncated, skipped, len(items), cfg.rollout.max_prompt_tokens, long_prompts)
        (log.info if key in _REPORTED else log.warning)(
            "%s: %d of %d prompts truncated, %d skipped (rollout.max_prompt_tokens=%d, long_prompts=%r)", name, truncated, len(items), skipped, cfg.rollout.max_prompt_tokens, long_prompts
        )
        _REPORTED.add(key)  # the same counts again (next evaluation of the same set): info only

    t_eval = cfg.eval.temperature
    greedy = SamplingParams(temperature=0.0, seed=seed)
    sampled = dataclasses.replace(sampling_of(cfg, seed), temperature=t_eval or cfg.rollout.temperature)  # rollout top-p/top-k
    separate = samples > 1 and t_eval == 0  # greedy accuracy + sampled pass@k
    passes = 2 if separate else 1
    bar = tqdm(total=len(prompts) * passes, desc=f"eval {name}", disable=not progress, leave=False)
    first = _run(engine, prompts, 1 if separate else samples, cfg, greedy if t_eval == 0 else sampled, bar)
    extra = _run(engine, prompts, samples, cfg, sampled, bar) if separate else first
    bar.close()

    outcomes, tokens = [], 0
    for j, i in enumerate(kept):
        item, main, draws = items[i], first[j], extra[j]
        rewards_main = [chain_reward(task, item, r, cfg.rollout.score_unfinished) for r in main]
        rewards = rewards_main if draws is main else [chain_reward(task, item, r, cfg.rollout.score_unfinished) for r in draws]
        tokens += sum(r.generated_tokens for r in main) + (0 if draws is main else sum(r.generated_tokens for r in draws))
        correct = (rewards_main[0] >= 1.0) if (separate or samples == 1) else (sum(r >= 1.0 for r in rewards) / len(rewards))
        outcomes.append({
            "id": item.id, "benchmark": name, "gold": item.gold, "correct": correct, "reward": rewards_main[0],
            "rewards": rewards, "response": main[0].text, "finish_reason": main[0].finish_reason,
            "response_tokens": main[0].generated_tokens, "prompt_tokens": len(prompts[j]),
            "prompt_truncated": fitted[i].dropped_chars > 0, "prompt_chars_dropped": fitted[i].dropped_chars,
        })  # fmt: skip
    for i, f in enumerate(fitted):
        if f.ids is None:
            outcomes.append({"id": items[i].id, "benchmark": name, "gold": items[i].gold, "skipped": True})
    scored = [o for o in outcomes if not o.get("skipped")]
    accuracy = sum(float(o["correct"]) for o in scored) / max(len(scored), 1)
    pass_at = {k: sum(pass_at_k(samples, sum(r >= 1.0 for r in o["rewards"]), k) for o in scored) / max(len(scored), 1) for k in ks}
    return EvalResult(name, accuracy, len(scored), outcomes, pass_at, tokens, truncated, skipped, time.perf_counter() - t0, samples)


# ---- a suite of benchmarks, logged to MLflow ------------------------------------------------------


@dataclass
class SuiteResult:
    step: int
    results: dict[str, EvalResult] = field(default_factory=dict)
    seconds: float = 0.0
    extra: dict[str, dict[str, float]] = field(default_factory=dict)  # benchmark -> the method's extra_evaluation values

    @property
    def accuracies(self) -> dict[str, float]:
        return {name: r.accuracy for name, r in self.results.items()}

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for r in self.results.values():
            out.update(r.metrics())
        for name, values in self.extra.items():
            out.update({f"eval/{name}/{k}": v for k, v in values.items()})
        return out

    def outcome_rows(self) -> list[dict]:
        return [{"step": self.step, **o} for r in self.results.values() for o in r.outcomes]


OUTCOME_COLUMNS = (
    "step",
    "benchmark",
    "id",
    "gold",
    "correct",
    "reward",
    "rewards",
    "finish_reason",
    "response_tokens",
    "prompt_tokens",
    "prompt_truncated",
    "prompt_chars_dropped",
    "skipped",
    "response",
)


def outcomes_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(OUTCOME_COLUMNS)
    for r in rows:
        w.writerow([json.dumps(r.get(c)) if isinstance(r.get(c), list) else ("" if r.get(c) is None else r.get(c)) for c in OUTCOME_COLUMNS])
    return buf.getvalue()


def outcomes_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def _mlflow_run_id(run_id: str | None) -> str | None:
    """``run_id``, else the active MLflow run's id, else None (mlflow is not imported for that)."""
    if run_id:
        return run_id
    mlflow = sys.modules.get("mlflow")
    run = mlflow.active_run() if mlflow is not None else None
    return run.info.run_id if run is not None else None


def evaluate_suite(
    engine: RolloutEngine,
    cfg: Config,
    benchmarks: list[str] | tuple[str, ...],
    step: int,
    run_id: str | None = None,
    *,
    items_per_benchmark: int | Mapping[str, int] | None = None,
    samples: int = 1,
    ks: tuple[int, ...] = (),
    long_prompts: str = "truncate",
    progress: bool = True,
    out_dir: Path | None = None,
    log_to_mlflow: bool = True,
    tracking_uri: str | None = None,
) -> SuiteResult:
    """Evaluate ``benchmarks`` (task names) at training ``step``.

    Items: ``task.items("test", n, cfg.data.data_seed)`` with ``n`` = ``items_per_benchmark`` (an
    int, or a mapping benchmark -> n where missing names fall back) else
    ``cfg.eval.items_per_benchmark``. Logs to MLflow run ``run_id`` (else the active run; nothing when there
    is none): ``eval/<b>/accuracy``, ``/pass_at_<k>``, ``/n``, ``/truncated``, ``/skipped``,
    ``/seconds`` at ``step``, and the per-item outcomes as artifacts
    ``eval/step_<step:06d>/outcomes.{jsonl,csv}``. With ``out_dir`` the same files are written
    there. ``tracking_uri`` names the MLflow store of ``run_id`` (default: the one
    :mod:`srpo_core.tracking` uses, i.e. ``$MLFLOW_TRACKING_URI`` or the last started run's).
    """
    from srpo_core import data_order

    t0 = time.perf_counter()
    suite = SuiteResult(step)
    for name in benchmarks:
        if isinstance(items_per_benchmark, Mapping):
            n = items_per_benchmark.get(name) or cfg.eval.items_per_benchmark
        else:
            n = items_per_benchmark or cfg.eval.items_per_benchmark
        task = data_order.eval_task(cfg, name)
        items = task.items("test", n, cfg.data.data_seed)
        suite.results[name] = evaluate(engine, task, items, cfg, samples=samples, ks=ks, progress=progress, name=name, long_prompts=long_prompts)
        extra = cfg.method.spec.extra_evaluation(engine, task, items, cfg)
        if extra:
            suite.extra[name] = extra
    suite.seconds = time.perf_counter() - t0
    rows = suite.outcome_rows()
    sub = f"eval/step_{step:06d}"
    files = {"outcomes.jsonl": outcomes_jsonl(rows), "outcomes.csv": outcomes_csv(rows)}
    if out_dir is not None:
        d = Path(out_dir) / sub
        d.mkdir(parents=True, exist_ok=True)
        for fname, text in files.items():
            (d / fname).write_text(text)
    rid = _mlflow_run_id(run_id) if log_to_mlflow else None
    if rid is not None:
        from srpo_core import tracking

        mlflow_client = tracking.client(tracking_uri)
        tracking.log_step_metrics(suite.metrics(), step, run_id=rid, mlflow_client=mlflow_client)
        with tempfile.TemporaryDirectory() as tmp:
            for fname, text in files.items():
                (Path(tmp) / fname).write_text(text)
                mlflow_client.log_artifact(rid, str(Path(tmp) / fname), artifact_path=sub)
    return suite

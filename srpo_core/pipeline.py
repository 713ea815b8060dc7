"""One training step as phases that a plain loop or a workflow step can call in turn:

    generate (seed search + base groups) -> localize -> suffixes -> records/advantages -> update

plus the per-step metrics of SPEC 4 and the rollout-record file format (rollouts.jsonl).
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from srpo_core import rollouts as R
from srpo_core import templates
from srpo_core.config import Config
from srpo_core.engine.base import RolloutEngine, SamplingParams, ThoughtLimits
from srpo_core.tasks import Task, TaskItem


@contextmanager
def timed(timings: dict[str, float], key: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - start


def limits_of(cfg: Config) -> ThoughtLimits:
    r = cfg.rollout
    return ThoughtLimits(stop=r.stop, max_thoughts=r.max_thoughts, max_thought_tokens=r.max_thought_tokens, max_response_tokens=r.max_response_tokens, max_model_len=cfg.model.max_model_len)


def sampling_of(cfg: Config, seed: int) -> SamplingParams:
    r = cfg.rollout
    return SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, seed=seed)


def step_seed(cfg: Config, step: int, phase: int) -> int:
    """Seeds derived from (training seed, step, phase) so a resumed step samples the same way."""
    return (cfg.train.seed * 1_000_003 + step * 101 + phase) % (2**31)


def encode_prompts(engine: RolloutEngine, cfg: Config, items: list[TaskItem], source: str = "prompts") -> list[list[int]]:
    out = []
    for it in items:
        ids = engine.encode(templates.rollout_prompt(cfg.rollout.template, it.question))
        if len(ids) > cfg.rollout.max_prompt_tokens:
            raise ValueError(f"{source}: item {it.id!r} has {len(ids)} prompt tokens > rollout.max_prompt_tokens={cfg.rollout.max_prompt_tokens}")
        out.append(ids)
    return out


@dataclass
class StepResult:
    records: list[R.Record]
    metrics: dict[str, float]
    timings: dict[str, float] = field(default_factory=dict)


def generate_phase(engine: RolloutEngine, task: Task, cfg: Config, items: list[TaskItem], step: int, timings: dict[str, float]) -> list[R.PromptState]:
    m = cfg.method
    states = [R.PromptState(it, ids) for it, ids in zip(items, encode_prompts(engine, cfg, items))]
    with timed(timings, "generation"):
        R.search_seeds(engine, task, states, m.method, m.split, m.seed_search_budget, m.rollouts_per_prompt, m.incorrect_threshold, limits_of(cfg), sampling_of(cfg, step_seed(cfg, step, 1)), timings=timings)
    timings["generation"] -= timings.get("verification", 0.0)
    return states


def localize_phase(engine: RolloutEngine, task: Task, cfg: Config, states: list[R.PromptState], step: int, timings: dict[str, float]) -> tuple[list[R.SeedCase], list[R.Localization]]:
    m = cfg.method
    cases = R.seed_cases(states)
    ctx = R.LocalizeContext(engine, task, m.localization_template, m.resolved_localization_temperature, m.localization_max_tokens, cfg.model.chat_template_for_localization, step_seed(cfg, step, 2))
    with timed(timings, "localization"):
        locs = R.LOCALIZERS[m.resolved_localizer](cases, ctx)
    return cases, locs


def suffix_phase(engine: RolloutEngine, cfg: Config, cases: list[R.SeedCase], locs: list[R.Localization], step: int, timings: dict[str, float]):
    with timed(timings, "suffix"):
        return R.sample_suffixes(engine, cases, locs, R.SPLITS[cfg.method.split].suffixes, limits_of(cfg), sampling_of(cfg, step_seed(cfg, step, 3)))


def assign_advantages(records: list[R.Record]) -> None:
    """Group-normalised advantages over each advantage group (seeds are not trained on)."""
    import torch

    from srpo_core.algos import group_advantages

    train = [r for r in records if r.trainable]
    if not train:
        return
    gids = {g: i for i, g in enumerate(dict.fromkeys(r.group_id for r in train))}
    adv = group_advantages(torch.tensor([r.reward for r in train], dtype=torch.float64), torch.tensor([gids[r.group_id] for r in train]))
    for r, a in zip(train, adv.tolist()):
        r.advantage = a


def run_rollout_phases(engine: RolloutEngine, task: Task, cfg: Config, items: list[TaskItem], step: int) -> StepResult:
    """Everything of a step but the update: groups, resets, suffixes, rewards, advantages."""
    timings: dict[str, float] = {}
    states = generate_phase(engine, task, cfg, items, step, timings)
    cases, locs = localize_phase(engine, task, cfg, states, step, timings)
    suffixes = suffix_phase(engine, cfg, cases, locs, step, timings)
    with timed(timings, "verification"):
        records = R.build_records(task, step, states, cfg.method.method, locs, suffixes)
    assign_advantages(records)
    metrics = step_metrics(records, states, task, timings, cfg.method.resolved_localizer)
    return StepResult(records, metrics, timings)


def train_sequences(records: list[R.Record]):
    from srpo_core.learner import TrainSequence

    index = {pid: i for i, pid in enumerate(dict.fromkeys(r.item.id for r in records))}
    return [TrainSequence(r.rollout.prompt_ids, r.rollout.response_ids, r.rollout.prefix_len, r.advantage, r.rollout.logprobs, index[r.item.id]) for r in records if r.trainable]


# ---- metrics -------------------------------------------------------------------------------------

def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def gradient_signal_ratio(records: list[R.Record]) -> tuple[float, float, float]:
    """Mean per-token gradient signal (algos.gradient_signal, p from the rollout log-probs) of
    shared-prefix vs base rollouts with a nonzero advantage. Returns (g_sp, g_base, ratio)."""
    import torch

    from srpo_core.algos import gradient_signal

    def signals(recs: list[R.Record]) -> list[float]:
        recs = [r for r in recs if r.rollout.logprobs]
        if not recs:
            return []
        width = max(len(r.rollout.logprobs) for r in recs)
        probs, mask = torch.zeros(len(recs), width), torch.zeros(len(recs), width)
        for i, r in enumerate(recs):
            probs[i, : len(r.rollout.logprobs)] = torch.tensor(r.rollout.logprobs).exp()
            mask[i, : len(r.rollout.logprobs)] = 1.0
        return gradient_signal(torch.tensor([r.advantage for r in recs]), probs, mask).tolist()

    sp = signals([r for r in records if r.group == "shared_prefix" and r.advantage != 0])
    base = signals([r for r in records if r.group in ("base", "fallback") and r.advantage != 0])
    g_sp, g_base = _mean(sp), _mean(base)
    return g_sp, g_base, (g_sp / g_base if sp and base and g_base > 0 else float("nan"))


def step_metrics(records: list[R.Record], states: list[R.PromptState], task: Task, timings: dict[str, float], localizer: str = "") -> dict[str, float]:
    m: dict[str, float] = {}
    for kind in ("base", "shared_prefix", "fallback", "seed"):
        rs = [r for r in records if r.group == kind]
        m[f"rollouts/{kind}/count"] = float(len(rs))
        if rs:
            m[f"reward/{kind}/mean"] = _mean(r.reward for r in rs)
            m[f"pass_rate/{kind}"] = _mean(float(r.reward >= 1.0) for r in rs)
            m[f"tokens/{kind}"] = float(sum(r.rollout.generated_tokens for r in rs))
        if kind != "seed":
            groups: dict[str, list[float]] = {}
            for r in rs:
                groups.setdefault(r.group_id, []).append(r.reward)
            if groups:
                m[f"groups/{kind}/count"] = float(len(groups))
                m[f"groups/{kind}/zero_adv_share"] = _mean(float(max(v) - min(v) < 1e-8) for v in groups.values())
    m["rollouts/dropped/count"] = float(sum(s.dropped for s in states))
    m["tokens/dropped"] = float(sum(s.dropped_tokens for s in states))
    m["seed_search/attempts_mean"] = _mean(s.attempts for s in states)
    m["seed_search/found_share"] = _mean(float(bool(s.seeds)) for s in states)
    seeds = [r for r in records if r.group == "seed"]
    if seeds:
        hist = Counter(r.reset_index for r in seeds)
        for k, v in sorted(hist.items()):
            m[f"reset/index_hist/{k}"] = float(v)
        m["reset/index_mean"] = _mean(r.reset_index for r in seeds)
        m["reset/relative_mean"] = _mean((r.reset_index - 1) / max(len(r.rollout.spans), 1) for r in seeds)
        status = Counter(r.localization_status for r in seeds)
        m["localization/parse_rate"] = (status["boxed"] + status["step"]) / len(seeds) if localizer == "self" else float("nan")  # the policy's answers only
        m["localization/fallback_rate"] = status["fallback"] / len(seeds)
        if task.has_step_checker:
            m["localization/oracle_agreement"] = _mean(float(r.oracle_first_error is not None and r.reset_index == R.oracle_reset(r.oracle_first_error, len(r.rollout.spans))) for r in seeds)
        m["tokens/localization"] = float(sum(r.localization_tokens for r in seeds))
        m["localization/output_tokens_mean"] = _mean(r.localization_tokens for r in seeds)
    g_sp, g_base, ratio = gradient_signal_ratio(records)
    m["grad_signal/shared_prefix"], m["grad_signal/base"], m["grad_signal/ratio"] = g_sp, g_base, ratio
    if task.has_step_checker:
        ok = [r for r in records if r.trainable and r.reward >= 1.0]
        m["steps/right_answer_wrong_step_share"] = _mean(float(r.steps_valid is False) for r in ok)
    for key, value in timings.items():
        m[f"time/{key}"] = value
    gen_tokens = sum(r.rollout.generated_tokens for r in records) + m["tokens/dropped"]
    gen_time = timings.get("generation", 0.0) + timings.get("suffix", 0.0)
    m["tokens/generated"] = float(gen_tokens)
    m["generation/tokens_per_s"] = gen_tokens / gen_time if gen_time > 0 else float("nan")
    return m


# ---- records -------------------------------------------------------------------------------------

def record_dict(rec: R.Record, step: int, split: str, localizer: str) -> dict:
    return {
        "step": step,
        "prompt_id": rec.item.id,
        "group_id": rec.group_id,
        "group": rec.group,
        "split": split,
        "localizer": localizer,
        "reset_index": rec.reset_index if rec.group in ("shared_prefix", "seed") else None,
        "oracle_first_error": rec.oracle_first_error,
        "localization_status": rec.localization_status,
        "prefix_tokens": rec.rollout.prefix_len,
        "response_tokens": len(rec.rollout.response_ids),
        "thoughts": rec.rollout.thoughts,
        "finish_reason": rec.rollout.finish_reason,
        "reward": rec.reward,
        "advantage": rec.advantage,
        "steps_valid": rec.steps_valid,
        "adapter_version": rec.rollout.adapter_version,
    }


def write_records(path: Path, records: list[R.Record], step: int, cfg: Config) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as fh:
        for rec in records:
            fh.write(json.dumps(record_dict(rec, step, cfg.method.split, cfg.method.resolved_localizer)) + "\n")
    tmp.replace(path)
    return path


def step_batches(n_items: int, prompts_per_step: int, epochs: int, seed: int) -> list[list[int]]:
    """The data order: a seeded permutation per epoch, cut into steps (a short tail is dropped)."""
    batches = []
    for epoch in range(epochs):
        order = list(range(n_items))
        random.Random(f"data-{seed}-{epoch}").shuffle(order)
        batches += [order[i : i + prompts_per_step] for i in range(0, n_items - prompts_per_step + 1, prompts_per_step)]
    return batches


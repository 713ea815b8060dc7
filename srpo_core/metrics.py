"""The per-step training metrics (SPEC 4) of a step's rollout records: rewards and pass rates per
group kind, zero-advantage groups, the seed search, resets and localization, token counts, the
gradient-signal diagnostic, and phase times. Names are the MLflow metric keys."""

from __future__ import annotations

from collections import Counter

from srpo_core import rollouts as R
from srpo_core.tasks import Task

GROUP_KINDS = ("base", "shared_prefix", "fallback", "seed")


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
    for kind in GROUP_KINDS:
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
    if any(r.group == "shared_prefix" for r in records):  # methods without shared-prefix groups log no grad_signal/*
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

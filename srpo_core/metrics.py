"""The per-step training metrics (SPEC 4) of a step's rollout records: rewards and pass rates per
group kind, zero-advantage groups, the seed search, resets and localization, token counts, the
gradient-signal diagnostic, and phase times. Names are the MLflow metric keys."""

from __future__ import annotations

from collections import Counter

from srpo_core import audit
from srpo_core import rollouts as R
from srpo_core.tasks import Task

GROUP_KINDS = ("base", "shared_prefix", "fallback", "seed")


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def prompt_group_signal(signal, advantages, prompt, is_shared_prefix, n_prompts: int):
    """Paper app. 14.1: per prompt, the mean per-rollout signal g_i of each group over its rollouts
    with a nonzero advantage. signal [N], advantages [N], prompt [N] long in 0..P-1,
    is_shared_prefix [N] bool (else base) -> (g_sp [P], g_base [P], n_sp [P], n_base [P]); a
    prompt whose group has no such rollout gets nan there (n = 0)."""
    import torch

    active = (advantages != 0).to(signal.dtype)  # [N]
    sp = is_shared_prefix.to(signal.dtype)  # [N]
    out = []
    for member in (sp * active, (1 - sp) * active):  # [N] each
        total = torch.zeros(n_prompts, dtype=signal.dtype).index_add_(0, prompt, signal * member)  # [P]
        count = torch.zeros(n_prompts, dtype=signal.dtype).index_add_(0, prompt, member)  # [P]
        out += [torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan"))), count]
    g_sp, n_sp, g_base, n_base = out
    return g_sp, g_base, n_sp, n_base


def gradient_signal_metrics(records: list[R.Record]) -> dict[str, float]:
    """`grad_signal/*` of paper app. 14.1 over the step's base and shared-prefix rollouts
    (fallback groups and seeds excluded): g_i = algos.gradient_signal (|A_i| / T_i * (1 - p_t)
    averaged over the rollout's active tokens, p from the rollout's log-probs), averaged per prompt
    per group over rollouts with A != 0; on the prompts where both groups carry signal, the means
    across prompts `grad_signal/shared_prefix`, `grad_signal/base` and their `grad_signal/ratio`;
    `grad_signal/both_groups_share` = those prompts / the step's prompts, `grad_signal/both_groups`
    their count. Without such a prompt only the share and the count are logged."""
    import torch

    from srpo_core.algos import gradient_signal

    recs = [r for r in records if r.group in ("base", "shared_prefix")]
    prompts = {pid: i for i, pid in enumerate(dict.fromkeys(r.item.id for r in records))}
    m: dict[str, float] = {}
    if recs:
        width = max(max(len(r.rollout.logprobs) for r in recs), 1)
        probs, mask = torch.zeros(len(recs), width, dtype=torch.float64), torch.zeros(len(recs), width, dtype=torch.float64)  # [N, T]
        for i, r in enumerate(recs):
            n = len(r.rollout.logprobs)
            probs[i, :n] = torch.tensor(r.rollout.logprobs, dtype=torch.float64).exp()
            mask[i, :n] = 1.0  # the logged tokens are the generated ones: a suffix's own tokens, a base rollout's whole response
        adv = torch.tensor([r.advantage for r in recs], dtype=torch.float64)  # [N]
        g = gradient_signal(adv, probs, mask)  # [N]
        g_sp, g_base, n_sp, n_base = prompt_group_signal(g, adv, torch.tensor([prompts[r.item.id] for r in recs]), torch.tensor([r.group == "shared_prefix" for r in recs]), len(prompts))
        both = (n_sp > 0) & (n_base > 0)  # [P]
    else:
        both = torch.zeros(len(prompts), dtype=torch.bool)
    m["grad_signal/both_groups"] = float(both.sum())
    m["grad_signal/both_groups_share"] = float(both.sum()) / len(prompts) if prompts else float("nan")
    if both.any():
        sp_mean, base_mean = float(g_sp[both].mean()), float(g_base[both].mean())
        m["grad_signal/shared_prefix"], m["grad_signal/base"] = sp_mean, base_mean
        if base_mean > 0:
            m["grad_signal/ratio"] = sp_mean / base_mean
    return m


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
        if localizer == "self":  # the policy's answers only: other localizers log no parse rate (not a nan warned about every step)
            m["localization/parse_rate"] = (status["boxed"] + status["step"]) / len(seeds)
        m["localization/fallback_rate"] = status["fallback"] / len(seeds)
        m["localization/errors"] = float(status[R.ERROR_STATUS])
        m["localization/error_rate"] = status[R.ERROR_STATUS] / len(seeds)
        if task.has_step_checker:
            m["localization/oracle_agreement"] = _mean(float(r.oracle_first_error is not None and r.reset_index == R.oracle_reset(r.oracle_first_error, len(r.rollout.spans))) for r in seeds)
        m["tokens/localization"] = float(sum(r.localization_tokens for r in seeds))
        m["localization/output_tokens_mean"] = _mean(r.localization_tokens for r in seeds)
    if any(r.group == "shared_prefix" for r in records):  # methods without shared-prefix groups log no grad_signal/*
        m.update(gradient_signal_metrics(records))
    m.update(audit.audit_metrics(records))
    if task.has_step_checker:
        ok = [r for r in records if r.trainable and r.reward >= 1.0]
        m["steps/right_answer_wrong_step_share"] = _mean(float(r.steps_valid is False) for r in ok)
        for kind in GROUP_KINDS:  # per group: a reset after the real error is rewarded only through another wrong step
            ok_kind = [r for r in ok if r.group == kind]
            if ok_kind:
                m[f"steps/{kind}/right_answer_wrong_step_share"] = _mean(float(r.steps_valid is False) for r in ok_kind)
    for key, value in timings.items():
        m[f"time/{key}"] = value
    # tokens/trained: what the update learns from; tokens/generated: every chain the policy sampled
    # (trained + seeds + dropped); localization answers are apart (tokens/localization), and an
    # audit judge model's tokens are not the policy's and not counted
    # (a record's trained tokens may differ from its generated ones: SPO-Tree trains a shared segment in each of its leaves)
    m["tokens/trained"] = float(sum(r.trained_tokens for r in records))
    gen_tokens = sum(r.rollout.generated_tokens for r in records) + m["tokens/dropped"]
    gen_time = timings.get("generation", 0.0) + timings.get("suffix", 0.0)
    m["tokens/generated"] = float(gen_tokens)
    m["generation/tokens_per_s"] = gen_tokens / gen_time if gen_time > 0 else float("nan")
    return m

"""Rollout groups: paper algorithm 2 (and GRPO), with the budget of 8 rollouts per prompt.

  (grpo         8 iid rollouts from the prompt, one group: srpo_core/methods/grpo.py.)
  rrpo / srpo   Sample iid chains until the first incorrect one (the seed; at most
                `seed_search_budget` attempts). Chains other than the seed fill the base group up
                to G=4 (extra ones are dropped); the seed is never trained on. Pick the reset
                index h* in the seed's thoughts, form x* = prompt + thoughts 1..h*-1 (token-exact),
                sample G suffixes from x*: the shared-prefix group. The base group is filled to
                its size with further iid chains.
                rrpo: h* uniform in 1..H_s.   srpo: the localizer (`self`, `oracle`, `divergence`).
  splits        1x4: one seed, 4 suffixes, base group of 4.  2x4: two seeds, 4 suffixes each, no
                base group.  1x8: one seed, 8 suffixes.  A split that finds fewer seeds than it
                wants gives the unused suffix budget to the base group; with no seed at all, the
                prompt falls back to one GRPO group of 8 (what was collected, filled with iid chains).

The work is batched over prompts: each round samples for every prompt that still needs chains,
and attempts are absorbed in sampling order, which keeps the iid semantics of one-at-a-time
sampling. Phases are separate functions so a workflow can run them as separate steps.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass, field
from typing import Callable

from srpo_core import templates
from srpo_core.engine.base import Rollout, RolloutEngine, SamplingParams, ThoughtLimits, ThoughtRequest
from srpo_core.tasks import Task, TaskItem
from srpo_core.verifiers.extract import last_boxed


@dataclass(frozen=True)
class SplitSpec:
    seeds: int
    suffixes: int
    group_size: int = 4  # G of the base group


SPLITS = {"1x4": SplitSpec(1, 4), "2x4": SplitSpec(2, 4), "1x8": SplitSpec(1, 8)}


@dataclass
class Attempt:
    rollout: Rollout
    reward: float


@dataclass
class PromptState:
    item: TaskItem
    prompt_ids: list[int]
    collected: list[Attempt] = field(default_factory=list)  # non-seed chains, in sampling order
    seeds: list[Attempt] = field(default_factory=list)
    attempts: int = 0
    dropped: int = 0
    dropped_tokens: int = 0
    base: list[Attempt] = field(default_factory=list)  # final base / fallback group


@dataclass(frozen=True)
class Localization:
    index: int  # h*, 1-based, clamped to [1, n_thoughts]
    status: str  # how it was obtained: boxed | step | fallback | random | oracle | divergence
    output_tokens: int = 0
    raw: str | None = None


@dataclass
class Record:
    """One rollout with its group, as written to rollouts.jsonl (advantage filled by the learner)."""

    rollout: Rollout
    item: TaskItem
    group: str  # base | shared_prefix | fallback | seed
    group_id: str
    reward: float
    reset_index: int | None = None
    oracle_first_error: int | None = None
    localization_status: str | None = None
    localization_tokens: int = 0
    advantage: float = 0.0
    steps_valid: bool | None = None

    @property
    def trainable(self) -> bool:
        return self.group != "seed"


# ---- seed search and the base group -------------------------------------------------------------

def wanted_attempts(state: PromptState, spec: SplitSpec, budget: int) -> int:
    """How many more iid chains this prompt needs in the seed-search phase."""
    if len(state.seeds) >= spec.seeds or state.attempts >= budget:
        return 0
    need = spec.seeds - len(state.seeds) + max(0, spec.group_size - len(state.collected))
    return min(budget - state.attempts, max(need, spec.group_size))


def absorb(state: PromptState, attempts: list[Attempt], spec: SplitSpec, incorrect_threshold: float) -> None:
    """Take attempts in sampling order: the first incorrect chains (with >= 1 thought) become
    seeds; other chains are kept for the base group up to G; the rest are dropped."""
    for att in attempts:
        state.attempts += 1
        if not att.rollout.spans:
            att.reward = 0.0
        is_seed = att.reward <= incorrect_threshold and bool(att.rollout.spans) and len(state.seeds) < spec.seeds
        if is_seed:
            state.seeds.append(att)
        elif len(state.collected) < spec.group_size:
            state.collected.append(att)
        else:
            state.dropped += 1
            state.dropped_tokens += att.rollout.generated_tokens


def base_capacity(state: PromptState, spec: SplitSpec, rollouts_per_prompt: int) -> int:
    return rollouts_per_prompt - spec.suffixes * len(state.seeds) if state.seeds else rollouts_per_prompt


def verify(task: Task, item: TaskItem, rollouts: list[Rollout], timings: dict[str, float] | None = None) -> list[Attempt]:
    start = time.perf_counter()
    out = [Attempt(r, task.reward(item, r.text)) for r in rollouts]
    if timings is not None:
        timings["verification"] = timings.get("verification", 0.0) + time.perf_counter() - start
    return out


def sample(engine: RolloutEngine, states: list[PromptState], counts: list[int], limits: ThoughtLimits, sampling: SamplingParams) -> list[list[Rollout]]:
    todo = [(i, n) for i, n in enumerate(counts) if n > 0]
    out: list[list[Rollout]] = [[] for _ in states]
    if todo:
        results = engine.generate_thoughts([ThoughtRequest(tuple(states[i].prompt_ids), n=n) for i, n in todo], limits, sampling)
        for (i, _), rs in zip(todo, results):
            out[i] = rs
    return out


def round_sampling(sampling: SamplingParams, round_index: int) -> SamplingParams:
    return SamplingParams(sampling.temperature, sampling.top_p, sampling.top_k, seed=sampling.seed * 1000 + round_index)


def round_counts(states: list[PromptState], spec: SplitSpec, budget: int) -> list[int]:
    return [wanted_attempts(s, spec, budget) for s in states]


def absorb_round(task: Task, states: list[PromptState], rollouts: list[list[Rollout]], spec: SplitSpec, incorrect_threshold: float, timings: dict[str, float] | None = None) -> None:
    for state, rs in zip(states, rollouts):
        absorb(state, verify(task, state.item, rs, timings), spec, incorrect_threshold)


def finalize_base(states: list[PromptState], spec: SplitSpec, rollouts_per_prompt: int) -> list[int]:
    """Close the seed search: keep collected chains up to each prompt's base capacity (the rest
    are dropped) and return how many fresh iid chains fill each base group."""
    fill = []
    for s in states:
        cap = base_capacity(s, spec, rollouts_per_prompt)
        s.base = s.collected[:cap]
        s.dropped += len(s.collected) - len(s.base)
        s.dropped_tokens += sum(a.rollout.generated_tokens for a in s.collected[cap:])
        fill.append(cap - len(s.base))
    return fill


FILL_ROUND = 999  # sampling-seed slot of the base-fill chains


@dataclass(frozen=True)
class SeedSearch:
    """The settings of algorithm 2's seed search (from `method.*`)."""

    spec: SplitSpec
    budget: int  # seed_search_budget: attempts per prompt
    rollouts_per_prompt: int
    incorrect_threshold: float


def finish_seed_search(engine: RolloutEngine, task: Task, states: list[PromptState], search: SeedSearch, limits: ThoughtLimits, sampling: SamplingParams, first_round: int = 0, timings: dict[str, float] | None = None) -> tuple[int, list[list[Rollout]]]:
    """Rounds of batched sampling from `first_round` on until every prompt has its seeds or spent
    its budget; then the base groups are finalized and their fill chains sampled (not scored).
    Returns (rounds run in all, fill chains per state)."""
    rounds = first_round
    while any(counts := round_counts(states, search.spec, search.budget)):
        absorb_round(task, states, sample(engine, states, counts, limits, round_sampling(sampling, rounds)), search.spec, search.incorrect_threshold, timings)
        rounds += 1
    fill = finalize_base(states, search.spec, search.rollouts_per_prompt)
    return rounds, sample(engine, states, fill, limits, round_sampling(sampling, FILL_ROUND))


# ---- localization ------------------------------------------------------------------------------

@dataclass(frozen=True)
class SeedCase:
    item: TaskItem
    prompt_ids: list[int]
    seed: Rollout


@dataclass(frozen=True)
class LocalizeContext:
    engine: RolloutEngine
    task: Task
    template: str
    temperature: float
    max_tokens: int
    use_chat_template: bool
    seed: int


_BOXED_INT = re.compile(r"^\s*(-?\d+)\s*$")
_STEP = re.compile(r"Step\s*(\d+)")


def parse_localization(text: str, n_thoughts: int) -> tuple[int, str]:
    """REFERENCE.md rules: last boxed int in [0, n] (0 -> 1); else last `Step k` in range; else 1."""
    boxed = last_boxed(text)
    m = _BOXED_INT.match(boxed) if boxed is not None else None
    if m and 0 <= int(m.group(1)) <= n_thoughts:
        return max(1, int(m.group(1))), "boxed"
    steps = [int(k) for k in _STEP.findall(text) if 1 <= int(k) <= n_thoughts]
    if steps:
        return steps[-1], "step"
    return 1, "fallback"


def _n(case: SeedCase) -> int:
    return len(case.seed.spans)


def random_localizer(cases: list[SeedCase], ctx: LocalizeContext) -> list[Localization]:
    rng = random.Random(ctx.seed)
    return [Localization(rng.randint(1, _n(c)), "random") for c in cases]


def oracle_localizer(cases: list[SeedCase], ctx: LocalizeContext) -> list[Localization]:
    if not ctx.task.has_step_checker:
        raise ValueError(f"the oracle localizer needs a step checker; task {ctx.task.name!r} has none")
    out = []
    for c in cases:
        k = ctx.task.first_error(c.item, c.seed.thoughts)
        out.append(Localization(oracle_reset(k, _n(c)), "oracle") if k is not None else Localization(1, "fallback"))
    return out


def oracle_reset(first_error: int, n_thoughts: int) -> int:
    """The reset the step checker points at: its first wrong thought, within the chain's thoughts
    (a chain that stopped early is wrong at the missing thought n+1: reset at its last one)."""
    return min(max(first_error, 1), n_thoughts)


def self_localizer(cases: list[SeedCase], ctx: LocalizeContext) -> list[Localization]:
    """The policy answers the localization prompt (steps rendered `Step k: ...`) with \\boxed{N}."""
    if not cases:
        return []
    texts = [templates.localization_prompt(ctx.template, c.item.question, c.seed.thoughts) for c in cases]
    encode = ctx.engine.encode_chat if ctx.use_chat_template else ctx.engine.encode
    completions = ctx.engine.complete([encode(t) for t in texts], ctx.max_tokens, SamplingParams(temperature=ctx.temperature, seed=ctx.seed))
    out = []
    for c, comp in zip(cases, completions):
        index, status = parse_localization(comp.text, _n(c))
        out.append(Localization(index, status, len(comp.ids), comp.text))
    return out


def divergence_localizer(cases: list[SeedCase], ctx: LocalizeContext) -> list[Localization]:
    """Promptless: teacher-force the seed and reset at the first thought holding a token that
    differs from the policy's own greedy choice (fallback 1 if the seed is the greedy chain)."""
    if not cases:
        return []
    scores = ctx.engine.teacher_force([c.prompt_ids for c in cases], [c.seed.response_ids for c in cases])
    out = []
    for c, sc in zip(cases, scores):
        t = next((i for i, (g, y) in enumerate(zip(sc.greedy_ids, c.seed.response_ids)) if g != y), None)
        k = next((j for j, (a, b) in enumerate(c.seed.spans, 1) if a <= t < b), None) if t is not None else None
        out.append(Localization(k, "divergence") if k is not None else Localization(1, "fallback"))
    return out


LOCALIZERS: dict[str, Callable[[list[SeedCase], LocalizeContext], list[Localization]]] = {
    "random": random_localizer,
    "self": self_localizer,
    "oracle": oracle_localizer,
    "divergence": divergence_localizer,
}


# ---- resets and suffixes -----------------------------------------------------------------------

def reset_request(case: SeedCase, h: int, n: int) -> ThoughtRequest:
    """x* = prompt + the seed's thoughts 1..h-1, token-exact (h <= 1: the prompt itself)."""
    if h <= 1:
        return ThoughtRequest(tuple(case.prompt_ids), n=n)
    end = case.seed.spans[h - 2][1]
    return ThoughtRequest(tuple(case.prompt_ids), n=n, prefix_ids=tuple(case.seed.response_ids[:end]), prefix_spans=tuple(case.seed.spans[: h - 1]))


def seed_cases(states: list[PromptState]) -> list[SeedCase]:
    return [SeedCase(s.item, s.prompt_ids, a.rollout) for s in states for a in s.seeds]


def sample_suffixes(engine: RolloutEngine, cases: list[SeedCase], locs: list[Localization], n: int, limits: ThoughtLimits, sampling: SamplingParams) -> list[list[Rollout]]:
    if not cases:
        return []
    return engine.generate_thoughts([reset_request(c, loc.index, n) for c, loc in zip(cases, locs)], limits, sampling)


def build_records(task: Task, step: int, states: list[PromptState], locs: list[Localization], suffixes: list[list[Rollout]]) -> list[Record]:
    """Records for every rollout (seeds included, marked `seed`), with their group ids."""
    records: list[Record] = []
    k = 0
    for s in states:
        kind = "base" if s.seeds else "fallback"
        gid = f"{step}:{s.item.id}:{kind}"
        records += [Record(a.rollout, s.item, kind, gid, a.reward) for a in s.base]
        for j, seed in enumerate(s.seeds):
            loc, group = locs[k], suffixes[k]  # seeds in seed_cases order
            k += 1
            oracle = task.first_error(s.item, seed.rollout.thoughts) if task.has_step_checker else None
            records.append(Record(seed.rollout, s.item, "seed", f"{step}:{s.item.id}:seed{j}", seed.reward, loc.index, oracle, loc.status, loc.output_tokens))
            sp = f"{step}:{s.item.id}:sp{j}"
            for r in group:
                records.append(Record(r, s.item, "shared_prefix", sp, task.reward(s.item, r.text), loc.index, oracle, loc.status))
    return mark_steps_valid(task, records)


def mark_steps_valid(task: Task, records: list[Record]) -> list[Record]:
    """`steps_valid` of every record where the task has a step checker (else left None)."""
    if task.has_step_checker:
        for rec in records:
            rec.steps_valid = task.first_error(rec.item, rec.rollout.thoughts) is None
    return records

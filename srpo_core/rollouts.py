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

Rewards (REFERENCE "Rollouts"): a chain scores its task reward only when it ended with an answer
(`finish_reason == "answer"`, a thought holding `\boxed{`); a chain stopped by the thought cap, the
response cap, the model length or an end-of-sequence gets 0 (`rollout.score_unfinished: true`
scores its text instead), and so does a chain with no thought. A chain is incorrect (a seed
candidate) by its task's rule (`Task.is_incorrect`: reward 0 for binary tasks, not all training
tests passed for code), unless `method.incorrect_threshold` overrides it (reward <= threshold).

Localization errors: any exception while localizing (the engine call, the parse, the step
checker) sends the affected seeds to thought 1 with status `error` (logged and counted).

The work is batched over prompts: each round samples for every prompt that still needs chains,
and attempts are absorbed in sampling order, which keeps the iid semantics of one-at-a-time
sampling. Phases are separate functions so a workflow can run them as separate steps.
"""

from __future__ import annotations

import logging
import random
import re
import time
from dataclasses import dataclass, field
from typing import Callable

from srpo_core import templates
from srpo_core.engine.base import Rollout, RolloutEngine, SamplingParams, ThoughtLimits, ThoughtRequest
from srpo_core.tasks import Task, TaskItem
from srpo_core.tasks.base import is_incorrect as task_is_incorrect
from srpo_core.verifiers.extract import last_boxed

log = logging.getLogger(__name__)
ANSWERED = "answer"  # the finish reason of a chain that ended with an answer (engine/base.py)


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
    status: str  # how it was obtained: boxed | step | fallback | random | oracle | divergence | error
    output_tokens: int = 0
    raw: str | None = None
    judge: int | None = None  # the audit judge's first wrong thought (srpo_core/audit.py), None: not judged
    judge_status: str | None = None  # checker | boxed | unparsed | error | None (not judged)
    judge_tokens: int = 0  # tokens the judge model generated


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
    judge_first_error: int | None = None  # seed and its suffixes: the audit judge's first wrong thought of the seed
    judge_status: str | None = None

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


def absorb(task: Task, state: PromptState, attempts: list[Attempt], search: "SeedSearch") -> None:
    """Take attempts in sampling order: the first incorrect chains (with >= 1 thought) become
    seeds; other chains are kept for the base group up to G; the rest are dropped."""
    spec = search.spec
    for att in attempts:
        state.attempts += 1
        if not att.rollout.spans:
            att.reward = 0.0
        is_seed = search.incorrect(task, state.item, att.reward) and bool(att.rollout.spans) and len(state.seeds) < spec.seeds
        if is_seed:
            state.seeds.append(att)
        elif len(state.collected) < spec.group_size:
            state.collected.append(att)
        else:
            state.dropped += 1
            state.dropped_tokens += att.rollout.generated_tokens


def base_capacity(state: PromptState, spec: SplitSpec, rollouts_per_prompt: int) -> int:
    return rollouts_per_prompt - spec.suffixes * len(state.seeds) if state.seeds else rollouts_per_prompt


def chain_reward(task: Task, item: TaskItem, rollout: Rollout, score_unfinished: bool = False) -> float:
    """The training/evaluation reward of one chain: the task's reward of its text if it ended with
    an answer, else 0 (a chain with no thought, or one that stopped without an answer unless
    `score_unfinished`)."""
    if not rollout.spans:
        return 0.0
    if rollout.finish_reason != ANSWERED and not score_unfinished:
        return 0.0
    return task.reward(item, rollout.text)


def verify(task: Task, item: TaskItem, rollouts: list[Rollout], timings: dict[str, float] | None = None, score_unfinished: bool = False) -> list[Attempt]:
    start = time.perf_counter()
    out = [Attempt(r, chain_reward(task, item, r, score_unfinished)) for r in rollouts]
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


def absorb_round(task: Task, states: list[PromptState], rollouts: list[list[Rollout]], search: "SeedSearch", timings: dict[str, float] | None = None) -> None:
    for state, rs in zip(states, rollouts):
        absorb(task, state, verify(task, state.item, rs, timings, search.score_unfinished), search)


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
    incorrect_threshold: float | None = None  # None: the task's rule (Task.is_incorrect); else reward <= threshold
    score_unfinished: bool = False  # rollout.score_unfinished

    def incorrect(self, task: Task, item: TaskItem, reward: float) -> bool:
        if self.incorrect_threshold is not None:
            return reward <= self.incorrect_threshold
        return task_is_incorrect(task, item, reward)


def finish_seed_search(
    engine: RolloutEngine, task: Task, states: list[PromptState], search: SeedSearch, limits: ThoughtLimits, sampling: SamplingParams, first_round: int = 0, timings: dict[str, float] | None = None
) -> tuple[int, list[list[Rollout]]]:
    """Rounds of batched sampling from `first_round` on until every prompt has its seeds or spent
    its budget; then the base groups are finalized and their fill chains sampled (not scored).
    Returns (rounds run in all, fill chains per state)."""
    rounds = first_round
    while any(counts := round_counts(states, search.spec, search.budget)):
        absorb_round(task, states, sample(engine, states, counts, limits, round_sampling(sampling, rounds)), search, timings)
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
ERROR_STATUS = "error"


def localize(name: str, cases: list[SeedCase], ctx: LocalizeContext) -> list[Localization]:
    """The localizer `name` on the cases, where any error falls back to thought 1 (REFERENCE:
    "any localization error -> 1"): a batch that raises is retried seed by seed, so only the seeds
    whose own call raises get `Localization(1, "error")`; each is logged. Configuration errors
    (a localizer the task cannot serve, e.g. the oracle without a step checker) still raise."""
    localizer = LOCALIZERS[name]
    if name == "oracle" and cases and not ctx.task.has_step_checker:
        return localizer(cases, ctx)  # raises its configuration error
    try:
        return _checked(localizer(cases, ctx), cases)
    except Exception as exc:  # noqa: BLE001 - REFERENCE: any localization error -> thought 1
        if len(cases) == 1:
            log.warning("localization (%s) of a seed of item %r failed, reset at thought 1: %s: %s", name, cases[0].item.id, type(exc).__name__, exc)
            return [Localization(1, ERROR_STATUS, raw=f"{type(exc).__name__}: {exc}")]
        log.warning("localization (%s) of %d seeds failed (%s: %s); retrying seed by seed", name, len(cases), type(exc).__name__, exc)
    return [loc for case in cases for loc in localize(name, [case], ctx)]


def _checked(locs: list[Localization], cases: list[SeedCase]) -> list[Localization]:
    if len(locs) != len(cases):
        raise RuntimeError(f"the localizer returned {len(locs)} answers for {len(cases)} seeds")
    for loc, c in zip(locs, cases):
        if not isinstance(loc.index, int) or not 1 <= loc.index <= max(_n(c), 1):
            raise ValueError(f"reset index {loc.index!r} outside 1..{_n(c)}")
    return locs


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


def seed_group_ids(step: int, item_id: str, j: int) -> tuple[str, str]:
    """The group ids of a prompt's j-th seed and of the suffixes sampled from its reset."""
    return f"{step}:{item_id}:seed{j}", f"{step}:{item_id}:sp{j}"


def suffix_group_id(seed_group_id: str) -> str:
    """The suffix group id of a seed's group id (seed_group_ids' pair)."""
    head, _, j = seed_group_id.rpartition(":seed")
    return f"{head}:sp{j}"


def build_records(task: Task, step: int, states: list[PromptState], locs: list[Localization], suffixes: list[list[Rollout]], score_unfinished: bool = False) -> list[Record]:
    """Records for every rollout (seeds included, marked `seed`), with their group ids; suffixes
    are scored here (chain_reward) and carry their seed's reset and judge."""
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
            judge = {"judge_first_error": loc.judge, "judge_status": loc.judge_status}
            seed_gid, sp = seed_group_ids(step, s.item.id, j)
            records.append(Record(seed.rollout, s.item, "seed", seed_gid, seed.reward, loc.index, oracle, loc.status, loc.output_tokens, **judge))
            for r in group:
                records.append(Record(r, s.item, "shared_prefix", sp, chain_reward(task, s.item, r, score_unfinished), loc.index, oracle, loc.status, **judge))
    return mark_steps_valid(task, records)


def mark_steps_valid(task: Task, records: list[Record]) -> list[Record]:
    """`steps_valid` of every record where the task has a step checker (else left None)."""
    if task.has_step_checker:
        for rec in records:
            rec.steps_valid = task.first_error(rec.item, rec.rollout.thoughts) is None
    return records

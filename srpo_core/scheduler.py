"""Event-driven rollout scheduling (`rollout.scheduler: events`): every prompt of a shard moves on
its own through algorithm 2 (seed search rounds -> base fill | localization -> suffixes) while the
others are still decoding, all requests sharing one continuous batch of the engine
(`engine.continuous_batch()`, srpo_core/engine/hf.py: rows join and leave as they start and
finish; a reset prefix x* is prefilled once and its KV cache expanded to its G suffix rows).

The batched path (srpo_core/methods/resets.py's phases) runs three sequential batched decodes,
each waiting for its slowest prompt; here a prompt whose seed search ends early is localized and
its suffixes sampled while slower prompts still search, so the batch stays full.

A prompt's work is a generator (a "flow") that yields operations and receives their results:

    Sample(requests, limits, sampling, salt)   -> list[list[Rollout]]  (one list per request)
    Complete(prompts, max_tokens, sampling, salt) -> list[Completion]
    Spawn(flow)                                -> None (runs `flow` alongside, e.g. the base fill)

`drive` submits every yielded operation to the continuous batch and resumes its flow when the
batch reports it done; everything between two yields (verification, bookkeeping) runs on the
driving thread between decode steps, so a run is deterministic.

Same records as the batched path: the engine keys each chain's randomness by (sampling seed,
context, salt, chain index), not by batch position, and a flow issues exactly the requests the
batched path issues for its prompt, with the same sampling seeds (round r of the seed search uses
round r's seed, whichever round the other prompts are in). Float arithmetic is the one difference
(a row's logits depend in their last bits on its batch; tests/test_scheduler.py says how much).
Exceptions: the `random` localizer draws h* from one RNG per prompt here (the batched path draws
them in sequence from one RNG over the shard's seeds, which ties a prompt's reset to every earlier
prompt's seed), and a question that occurs twice in a shard is salted by its occurrence so its
chains stay independent of its twin's. Both keep the distribution; they change which draw a record
gets. Timings: the phases overlap, so `time/generation` is the whole scheduled sampling (seed
search, fill, self-localization, suffixes) minus the verification done in between;
`time/localization` holds only localizers run synchronously (oracle, divergence, random).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Generator

from srpo_core import rollouts as R
from srpo_core import templates
from srpo_core.engine.base import SamplingParams, ThoughtLimits, ThoughtRequest


@dataclass(frozen=True)
class Sample:
    requests: list[ThoughtRequest]
    limits: ThoughtLimits
    sampling: SamplingParams
    salt: int = 0


@dataclass(frozen=True)
class Complete:
    prompts: list[list[int]]
    max_tokens: int
    sampling: SamplingParams
    salt: int = 0


@dataclass(frozen=True)
class Spawn:
    flow: Generator


Flow = Generator  # yields Sample | Complete | Spawn, receives their results


def supports_events(engine) -> bool:
    return callable(getattr(engine, "continuous_batch", None))


def drive(batch, flows: list[Flow]) -> None:
    """Run the flows to completion on one continuous batch (see the module docstring)."""
    waiting: dict[int, tuple[object, Flow]] = {}

    def advance(flow: Flow, value) -> None:
        while True:
            try:
                op = flow.send(value)
            except StopIteration:
                return
            if isinstance(op, Spawn):
                advance(op.flow, None)
                value = None
                continue
            if isinstance(op, Sample):
                handle = batch.submit_thoughts(op.requests, op.limits, op.sampling, op.salt)
            elif isinstance(op, Complete):
                handle = batch.submit_complete(op.prompts, op.max_tokens, op.sampling, op.salt)
            else:
                raise TypeError(f"a rollout flow yielded {op!r}; expected Sample, Complete or Spawn")
            if handle.done:  # nothing to decode (every row ended before its first token)
                value = handle.result
                continue
            waiting[id(handle)] = (handle, flow)
            return

    for flow in flows:
        advance(flow, None)
    while waiting:
        if not batch.busy:
            raise RuntimeError(f"rollout scheduler: {len(waiting)} operations wait on an idle batch")
        for handle in batch.step():
            entry = waiting.pop(id(handle), None)
            if entry is not None:
                advance(entry[1], handle.result)


def occurrence_salts(prompts: list[list[int]]) -> list[int]:
    """0 for the first occurrence of a prompt in the shard, k for its (k+1)-th."""
    seen: dict[tuple[int, ...], int] = {}
    out = []
    for p in prompts:
        key = tuple(p)
        out.append(seen.get(key, 0))
        seen[key] = out[-1] + 1
    return out


# ---- algorithm 2, one prompt at a time -----------------------------------------------------------


@dataclass
class _ResetRun:
    """The shared inputs and per-prompt outputs of one scheduled reset step."""

    ctx: object  # shard.PhaseContext
    shard: object  # shard.Shard
    search: R.SeedSearch
    lctx: R.LocalizeContext
    localizer: str
    n_suffixes: int
    fills: list
    locs: list
    suffixes: list
    rounds: list
    sync_localization: float = 0.0


def _fill_flow(run: _ResetRun, i: int, n: int, salt: int) -> Flow:
    state, ctx = run.shard.states[i], run.ctx
    (chains,) = yield Sample([ThoughtRequest(tuple(state.prompt_ids), n=n)], ctx.limits, R.round_sampling(ctx.sampling("generate"), R.FILL_ROUND), salt)
    run.fills[i] = chains  # scored with the suffixes by the method's verify_suffix, as in the batched path


def _localize_flow(run: _ResetRun, i: int, cases: list[R.SeedCase], salt: int) -> Flow:
    lctx = run.lctx
    if run.localizer == "self":  # rollouts.self_localizer, one prompt's seeds at a time
        texts = [templates.localization_prompt(lctx.template, c.item.question, c.seed.thoughts) for c in cases]
        encode = lctx.engine.encode_chat if lctx.use_chat_template else lctx.engine.encode
        completions = yield Complete([encode(t) for t in texts], lctx.max_tokens, SamplingParams(temperature=lctx.temperature, seed=lctx.seed), salt)
        return [R.Localization(*R.parse_localization(comp.text, len(c.seed.spans)), len(comp.ids), comp.text) for c, comp in zip(cases, completions)]
    start = time.perf_counter()
    if run.localizer == "random":  # one RNG per prompt (see the module docstring)
        rng = random.Random(lctx.seed * 1_000_003 + i)
        out = [R.Localization(rng.randint(1, len(c.seed.spans)), "random") for c in cases]
    else:  # oracle (pure) and divergence (one teacher-forced pass): run in place
        out = R.LOCALIZERS[run.localizer](cases, lctx)
    run.sync_localization += time.perf_counter() - start
    return out


def _prompt_flow(run: _ResetRun, i: int, salt: int) -> Flow:
    ctx, search, state = run.ctx, run.search, run.shard.states[i]
    generate = ctx.sampling("generate")
    r = 0
    while (n := R.wanted_attempts(state, search.spec, search.budget)) > 0:
        (chains,) = yield Sample([ThoughtRequest(tuple(state.prompt_ids), n=n)], ctx.limits, R.round_sampling(generate, r), salt)
        R.absorb(state, R.verify(ctx.task, state.item, chains, run.shard.timings), search.spec, search.incorrect_threshold)
        r += 1
    run.rounds[i] = r
    (fill,) = R.finalize_base([state], search.spec, search.rollouts_per_prompt)
    if fill:
        yield Spawn(_fill_flow(run, i, fill, salt))
    cases = [R.SeedCase(state.item, state.prompt_ids, a.rollout) for a in state.seeds]
    if not cases:
        return
    run.locs[i] = yield from _localize_flow(run, i, cases, salt)
    run.suffixes[i] = yield Sample([R.reset_request(c, loc.index, run.n_suffixes) for c, loc in zip(cases, run.locs[i])], ctx.limits, ctx.sampling("suffix"), salt)


def run_reset_step(ctx, shard, search: R.SeedSearch) -> None:
    """Seed search, base fill, localization and suffixes of every prompt of `shard`, scheduled by
    events on the policy's continuous batch. Leaves the shard as the batched phases generate,
    verify, localize and suffix leave it (fill chains and suffixes unscored, `locs` and
    `suffixes` in `rollouts.seed_cases` order), ready for the method's `verify_suffix`."""
    cfg, m = ctx.cfg, ctx.cfg.method
    engine = ctx.policy
    if not supports_events(engine):
        raise ValueError(f"rollout.scheduler: events needs an engine with a continuous batch (the HF engine); {type(engine).__name__} has none")
    n = len(shard.states)
    lctx = R.LocalizeContext(engine, ctx.task, m.localization_template, m.resolved_localization_temperature, m.localization_max_tokens, cfg.model.chat_template_for_localization, ctx.seed("localize"))
    run = _ResetRun(ctx, shard, search, lctx, m.resolved_localizer, search.spec.suffixes, [[] for _ in range(n)], [[] for _ in range(n)], [[] for _ in range(n)], [0] * n)
    salts = occurrence_salts([s.prompt_ids for s in shard.states])
    verified = shard.timings.get("verification", 0.0)
    start = time.perf_counter()
    drive(engine.continuous_batch(), [_prompt_flow(run, i, salts[i]) for i in range(n)])
    wall = time.perf_counter() - start
    in_flows = shard.timings.get("verification", 0.0) - verified
    shard.timings["generation"] = shard.timings.get("generation", 0.0) + wall - in_flows - run.sync_localization
    shard.timings["localization"] = shard.timings.get("localization", 0.0) + run.sync_localization
    shard.rounds = max([1, *run.rounds])
    shard.pending = []
    shard.fill = run.fills
    shard.locs = [loc for locs in run.locs for loc in locs]
    shard.suffixes = [group for groups in run.suffixes for group in groups]

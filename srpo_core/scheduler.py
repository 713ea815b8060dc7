"""Event-driven rollout scheduling (`rollout.scheduler: events`): every prompt of a shard moves on
its own through algorithm 2 (seed search rounds -> base fill | localization -> suffixes) while the
others are still decoding, all requests sharing one continuous batch of the engine
(`engine.continuous_batch()`: the HF engine's, srpo_core/engine/hf.py, rows join and leave as
they start and finish; or vLLM's engine loop, engine/vllm.py `StepBatch`, every thought its own
request, prefixes reused by vLLM's prefix cache). On the HF engine a reset prefix x* is not
prefilled again, being a prefix of its seed chain: the seed search keeps each chain's KV cache
until the chain is verified in sampling order (`Sample(retain=True)`; a chain that is no seed frees
it then, and once a prompt has its seeds its chains keep none), and the suffixes start from the
seed's (`Sample(reuse=...)`: one one-token forward for the G suffix rows instead of a prefill).

The batched path (srpo_core/methods/resets.py's phases) runs three sequential batched decodes,
each waiting for its slowest prompt; here a prompt whose seed search ends early is localized and
its suffixes sampled while slower prompts still search, so the batch stays full.

What it buys, measured (bench/method_overhead.py, README "What a reset method costs"): fewer
sequential decode steps where prompts differ in how many seed-search rounds they need or wait for
room in a full batch (1.08x GRPO's instead of the batched path's 1.66x at 128 prompts x 8 rows
on the 256-row batch), and no prefill of x*; but little time on CPU: rows that join late cost
extra prefills and either padding or forwards of their own (cohorts, engine/hf.py), and the
self-localization prompts (the whole seed chain) must be prefilled whichever path runs: 1.32x
GRPO's generation time at 128 prompts for both paths. Both paths are bound below by the same
critical path, the slowest prompt's seed chain -> its localization -> its suffixes; on the tiny
preset every chain of a prompt has about the same length, so at 16 prompts that path is the whole
story (1.96x GRPO's decode steps either way, 90 per step against 46) and the event path's extra
model calls make it the slower one there. An engine with a paged KV cache (vLLM) would pay neither
the padding nor the separate forwards of late rows.

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
from collections import deque
from dataclasses import dataclass, field
from typing import Generator

from srpo_core import audit, templates
from srpo_core import rollouts as R
from srpo_core.engine.base import SamplingParams, ThoughtLimits, ThoughtRequest


@dataclass(frozen=True)
class Sample:
    """Sample chains: the flow gets list[list[Rollout]] once all are done, or (wait=False) the
    DecodeHandle at once, to `Next` its chains as they finish or `Join` it later."""

    requests: list[ThoughtRequest]
    limits: ThoughtLimits
    sampling: SamplingParams
    salt: int = 0
    seen: dict | None = None  # chain numbering shared across submissions (see ContinuousBatch)
    wait: bool = True
    retain: bool = False  # keep finished chains' KV (handle.take_kv / drop_kv)
    reuse: tuple | None = None  # per request, a PrefixKV its context starts from (or None)


@dataclass(frozen=True)
class Complete:
    prompts: list[list[int]]
    max_tokens: int
    sampling: SamplingParams
    salt: int = 0
    seen: dict | None = None


@dataclass(frozen=True)
class Next:
    """Chain j of request i of a handle, as soon as it has finished -> Rollout."""

    handle: object
    request: int
    chain: int


@dataclass(frozen=True)
class Join:
    handle: object  # -> the handle's result


@dataclass(frozen=True)
class Spawn:
    flow: Generator  # runs alongside; the spawning flow goes on at once


@dataclass(frozen=True)
class Await:
    future: "Future"  # -> its value


class Future:
    """A value one flow sets (`set`) and others `Await`."""

    def __init__(self, driver: "Driver"):
        self.driver, self.done, self.value, self.waiters = driver, False, None, []

    def set(self, value) -> None:
        if self.done:
            raise RuntimeError("a rollout-scheduler future was set twice")
        self.done, self.value = True, value
        self.driver.waiting_future -= len(self.waiters)
        self.driver.ready.extend((flow, value) for flow in self.waiters)
        self.waiters.clear()


Flow = Generator  # yields the operations above, receives their results


def supports_events(engine) -> bool:
    return callable(getattr(engine, "continuous_batch", None))


def require_events(engine) -> None:
    if not supports_events(engine):
        raise ValueError(f"rollout.scheduler: events needs an engine with a continuous batch (the HF engine, or vLLM's engine loop); {type(engine).__name__} has none")


class Driver:
    """Runs flows on one continuous batch: resumes every flow whose operation is done, then lets
    the batch take one decode step, until no flow waits (see the module docstring)."""

    def __init__(self, batch):
        self.batch = batch
        self.ready: deque[tuple[Flow, object]] = deque()
        self.on_handle: dict[int, list[Flow]] = {}
        self.on_row: dict[tuple[int, int, int], list[Flow]] = {}
        self.waiting_batch = 0
        self.waiting_future = 0

    def future(self) -> Future:
        return Future(self)

    def start(self, flow: Flow) -> None:
        self.ready.append((flow, None))

    def _advance(self, flow: Flow, value) -> None:
        batch = self.batch
        while True:
            try:
                op = flow.send(value)
            except StopIteration:
                return
            value = None
            if isinstance(op, Spawn):
                self.ready.append((op.flow, None))
                continue
            if isinstance(op, Await):
                if op.future.done:
                    value = op.future.value
                    continue
                op.future.waiters.append(flow)
                self.waiting_future += 1
                return
            if isinstance(op, Next):
                if op.handle.row_done(op.request, op.chain):
                    value = op.handle.row_rollout(batch.engine, op.request, op.chain)
                    continue
                self.on_row.setdefault((id(op.handle), op.request, op.chain), []).append(flow)
                self.waiting_batch += 1
                return
            if isinstance(op, Sample):
                handle = batch.submit_thoughts(op.requests, op.limits, op.sampling, op.salt, op.seen, stream=not op.wait, retain=op.retain, reuse=op.reuse)
                if not op.wait:
                    value = handle
                    continue
            elif isinstance(op, Complete):
                handle = batch.submit_complete(op.prompts, op.max_tokens, op.sampling, op.salt, op.seen)
            elif isinstance(op, Join):
                handle = op.handle
            else:
                raise TypeError(f"a rollout flow yielded {op!r}; expected Sample, Complete, Next, Join, Spawn or Await")
            if handle.done:
                value = handle.result
                continue
            self.on_handle.setdefault(id(handle), []).append(flow)
            self.waiting_batch += 1
            return

    def run(self) -> None:
        batch = self.batch
        while True:
            while self.ready:
                self._advance(*self.ready.popleft())
            if not self.waiting_batch:
                break
            if not batch.busy:
                raise RuntimeError(f"rollout scheduler: {self.waiting_batch} operations wait on an idle batch")
            for handle in batch.step():
                for flow in self.on_handle.pop(id(handle), []):
                    self.waiting_batch -= 1
                    self.ready.append((flow, handle.result))
            for handle, i, j in batch.finished_rows:
                for flow in self.on_row.pop((id(handle), i, j), []):
                    self.waiting_batch -= 1
                    self.ready.append((flow, handle.row_rollout(batch.engine, i, j)))
            batch.finished_rows.clear()
        if self.waiting_future:
            raise RuntimeError(f"rollout scheduler: {self.waiting_future} flows wait on futures nobody sets")


def drive(batch, flows: list[Flow]) -> None:
    """Run the flows to completion on one continuous batch."""
    driver = Driver(batch)
    for flow in flows:
        driver.start(flow)
    driver.run()


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
    driver: Driver
    search: R.SeedSearch
    lctx: R.LocalizeContext
    localizer: str
    fills: list
    locs: list
    suffixes: list
    rounds: list
    sync_localization: float = 0.0
    kept: dict = field(default_factory=dict)  # (prompt, seed index) -> the seed chain's PrefixKV, popped by the reset flow


def _localize_flow(run: _ResetRun, i: int, case: R.SeedCase, salt: int, seen: dict, rng: random.Random) -> Flow:
    """h* of one seed, with the method's localizer."""
    lctx = run.lctx
    if run.localizer == "self":  # rollouts.self_localizer, one seed at a time
        encode = lctx.engine.encode_chat if lctx.use_chat_template else lctx.engine.encode
        prompt = encode(templates.localization_prompt(lctx.template, case.item.question, case.seed.thoughts))
        (comp,) = yield Complete([prompt], lctx.max_tokens, SamplingParams(temperature=lctx.temperature, seed=lctx.seed), salt, seen)
        try:
            return R.Localization(*R.parse_localization(comp.text, len(case.seed.spans)), len(comp.ids), comp.text)
        except Exception as exc:  # noqa: BLE001 - as rollouts.localize: any localization error -> thought 1
            return R.Localization(1, R.ERROR_STATUS, raw=f"{type(exc).__name__}: {exc}")
    start = time.perf_counter()
    if run.localizer == "random":  # one RNG per prompt (see the module docstring)
        out = R.Localization(rng.randint(1, len(case.seed.spans)), "random")
    else:  # oracle (pure) and divergence (one teacher-forced pass): run in place, errors -> thought 1
        (out,) = R.localize(run.localizer, [case], lctx)
    run.sync_localization += time.perf_counter() - start
    return out


def _reset_flow(run: _ResetRun, i: int, salt: int, seeds: list[Future]) -> Flow:
    """Each seed of prompt i, in order, as soon as the search names it: localize it, then queue
    its G suffixes from x*; finally wait for them."""
    ctx, state = run.ctx, run.shard.states[i]
    loc_seen, suffix_seen, handles = {}, {}, []
    rng = random.Random(run.lctx.seed * 1_000_003 + i)
    for k, future in enumerate(seeds):
        seed = yield Await(future)
        if seed is None:
            break
        case = R.SeedCase(state.item, state.prompt_ids, seed)
        loc = yield from _localize_flow(run, i, case, salt, loc_seen, rng)
        run.locs[i].append(loc)
        request = R.reset_request(case, loc.index, run.search.spec.suffixes)  # x* is a prefix of the seed: start from its KV
        handles.append((yield Sample([request], ctx.limits, ctx.sampling("suffix"), salt, suffix_seen, wait=False, reuse=(run.kept.pop((i, k), None),))))
    for handle in handles:
        (chains,) = yield Join(handle)
        run.suffixes[i].append(chains)


def _prompt_flow(run: _ResetRun, i: int, salt: int) -> Flow:
    """Prompt i's seed search, chain by chain in sampling order (a seed is handed to the reset flow
    the moment the chains before it are known correct, while the rest of its round decodes), then
    its base fill."""
    ctx, search, state = run.ctx, run.search, run.shard.states[i]
    seeds = [run.driver.future() for _ in range(search.spec.seeds)]
    yield Spawn(_reset_flow(run, i, salt, seeds))
    generate = ctx.sampling("generate")
    r = 0
    while (n := R.wanted_attempts(state, search.spec, search.budget)) > 0:
        handle = yield Sample([ThoughtRequest(tuple(state.prompt_ids), n=n)], ctx.limits, R.round_sampling(generate, r), salt, wait=False, retain=True)
        for j in range(n):
            chain = yield Next(handle, 0, j)
            found = len(state.seeds)
            R.absorb(ctx.task, state, R.verify(ctx.task, state.item, [chain], run.shard.timings, search.score_unfinished), search)
            if len(state.seeds) > found:  # chain j is the next seed: its KV is kept for the suffixes' x*
                run.kept[(i, found)] = handle.take_kv(0, j)
                seeds[found].set(state.seeds[found].rollout)
            else:
                handle.drop_kv(0, j)
            if len(state.seeds) == search.spec.seeds:  # no later chain can be a seed
                handle.stop_retaining()
        r += 1
    run.rounds[i] = r
    for future in seeds[len(state.seeds):]:
        future.set(None)
    (fill,) = R.finalize_base([state], search.spec, search.rollouts_per_prompt)
    if fill:
        (run.fills[i],) = yield Sample([ThoughtRequest(tuple(state.prompt_ids), n=fill)], ctx.limits, R.round_sampling(generate, R.FILL_ROUND), salt)


def run_reset_step(ctx, shard, search: R.SeedSearch) -> None:
    """Seed search, base fill, localization and suffixes of every prompt of `shard`, scheduled by
    events on the policy's continuous batch. Leaves the shard as the batched phases generate,
    verify, localize and suffix leave it (fill chains and suffixes unscored, `locs` and
    `suffixes` in `rollouts.seed_cases` order), ready for the method's `verify_suffix`."""
    cfg, m = ctx.cfg, ctx.cfg.method
    engine = ctx.policy
    require_events(engine)
    n = len(shard.states)
    lctx = R.LocalizeContext(engine, ctx.task, m.localization_template, m.resolved_localization_temperature, m.localization_max_tokens, cfg.model.chat_template_for_localization, ctx.seed("localize"))
    driver = Driver(engine.continuous_batch())
    run = _ResetRun(ctx, shard, driver, search, lctx, m.resolved_localizer, [[] for _ in range(n)], [[] for _ in range(n)], [[] for _ in range(n)], [0] * n)
    for i, salt in enumerate(occurrence_salts([s.prompt_ids for s in shard.states])):
        driver.start(_prompt_flow(run, i, salt))
    verified = shard.timings.get("verification", 0.0)
    start = time.perf_counter()
    try:
        driver.run()
    finally:
        close = getattr(driver.batch, "close", None)  # vLLM's step batch: abort what an error left in flight
        if close is not None:
            close()
    wall = time.perf_counter() - start
    in_flows = shard.timings.get("verification", 0.0) - verified
    shard.timings["generation"] = shard.timings.get("generation", 0.0) + wall - in_flows - run.sync_localization
    shard.timings["localization"] = shard.timings.get("localization", 0.0) + run.sync_localization
    shard.rounds = max([1, *run.rounds])
    shard.pending = []
    shard.fill = run.fills
    shard.locs = [loc for locs in run.locs for loc in locs]
    shard.suffixes = [group for groups in run.suffixes for group in groups]
    start = time.perf_counter()  # the localization audit's verdicts, over the shard's seeds as the batched path does
    shard.locs = audit.judge_seeds(R.seed_cases(shard.states), shard.locs, cfg, ctx.task, ctx.seed("localize"))
    shard.timings["audit"] = shard.timings.get("audit", 0.0) + time.perf_counter() - start

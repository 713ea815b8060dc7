"""The step algorithm: one epoch step of any registered method as pure phase functions over a
shard of its prompts, called in memory by the plain loop (`srpo train`, `srpo compare`) and
through the artifact store by the flow's steps (srpo_core/flow_phases.py):

    start(items) -> generate -> verify -> localize -> suffix -> verify_suffix -> finish
                                                           (advantages, metrics; then the learner)

Each phase takes a shard.PhaseContext (config, task, step, shard index, and the policy's engine
for the phases that sample) and a shard.Shard, and dispatches to the configured method
(srpo_core/methods/). A phase the method does not use does nothing and says so (`run_phase`
returns False). Seeds come from the context (shard.py's one seed scheme), so a step sampled in
memory and the same step sampled by the flow (one shard) give identical records.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from srpo_core import metrics as M
from srpo_core import rollouts as R
from srpo_core import templates
from srpo_core.config import Config
from srpo_core.engine.base import RolloutEngine
from srpo_core.shard import PhaseContext, Shard, record_from_dict
from srpo_core.tasks import Task, TaskItem

PHASES = ("generate", "verify", "localize", "suffix", "verify_suffix")


def encode_prompts(engine: RolloutEngine, cfg: Config, items: list[TaskItem], source: str = "prompts") -> list[list[int]]:
    out = []
    for it in items:
        ids = engine.encode(templates.rollout_prompt(cfg.rollout.template, it.question))
        if len(ids) > cfg.rollout.max_prompt_tokens:
            raise ValueError(f"{source}: item {it.id!r} has {len(ids)} prompt tokens > rollout.max_prompt_tokens={cfg.rollout.max_prompt_tokens}")
        out.append(ids)
    return out


def start(ctx: PhaseContext, items: list[TaskItem]) -> Shard:
    """A shard of the step's prompts, encoded with the policy's tokenizer."""
    return Shard([R.PromptState(it, ids) for it, ids in zip(items, encode_prompts(ctx.policy, ctx.cfg, items))])


def uses(cfg: Config, phase: str) -> bool:
    return phase in cfg.method.spec.phases


def needs_model(cfg: Config, phase: str) -> bool:
    """Whether `phase` samples from the policy for the configured method (the flow loads it then)."""
    return phase in cfg.method.spec.model_phases


def run_phase(phase: str, ctx: PhaseContext, shard: Shard) -> bool:
    """Run one phase of the configured method on the shard; False if the method has no work in it."""
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; one of {PHASES}")
    method = ctx.cfg.method.spec
    if phase not in method.phases:
        return False
    begin = time.perf_counter()
    getattr(method, phase)(ctx, shard)
    if phase == "generate":
        shard.timings["generation"] = shard.timings.get("generation", 0.0) + time.perf_counter() - begin
    return True


@dataclass
class StepResult:
    records: list[R.Record]
    metrics: dict[str, float]
    timings: dict[str, float] = field(default_factory=dict)


def finish(cfg: Config, task: Task, shards: list[Shard]) -> StepResult:
    """Gather the shards (run in parallel: a phase's time is its slowest shard's), compute the
    method's advantages over all records and the step's metrics."""
    records = [record_from_dict(d) for sh in shards for d in sh.records]
    states = [s for sh in shards for s in sh.states]
    timings: dict[str, float] = {}
    for sh in shards:
        for k, v in sh.timings.items():
            timings[k] = max(timings.get(k, 0.0), v)
    cfg.method.spec.advantages(records)
    return StepResult(records, M.step_metrics(records, states, task, timings, cfg.method.resolved_localizer), timings)


def scheduled_by_events(cfg: Config, engine: RolloutEngine) -> bool:
    """Whether an in-memory step runs the method's event-driven path (`rollout.scheduler`; auto:
    where the method has one and the engine has a continuous batch)."""
    from srpo_core.scheduler import require_events, supports_events

    has_path = callable(getattr(cfg.method.spec, "run_events", None))
    if cfg.rollout.scheduler == "events":
        require_events(engine)
    auto = supports_events(engine) and getattr(engine, "events_by_default", True)
    return has_path and (cfg.rollout.scheduler == "events" or (cfg.rollout.scheduler == "auto" and auto))


def run_rollout_phases(engine: RolloutEngine, task: Task, cfg: Config, items: list[TaskItem], step: int) -> StepResult:
    """Everything of a step but the update, in memory: every phase on one shard (or the method's
    event-driven path, see `scheduled_by_events`), then `finish`."""
    ctx = PhaseContext(cfg, task, step, 0, engine)
    shard = start(ctx, items)
    if scheduled_by_events(cfg, engine):
        cfg.method.spec.run_events(ctx, shard)
    else:
        for phase in PHASES:
            run_phase(phase, ctx, shard)
    return finish(cfg, task, [shard])


def train_sequences(cfg: Config, records: list[R.Record]) -> list:
    """The learner's sequences of the step's records (what the method trains on); a method with
    `trains_with_options` also gets its `method.options`."""
    spec = cfg.method.spec
    if getattr(spec, "trains_with_options", False):
        return spec.train_sequences(records, cfg.method.parsed_options)
    return spec.train_sequences(records)

"""The work of one epoch step over a shard of its prompts: the state the phases pass along, the
context a phase runs in (with the one seed scheme), and the state's JSON codec.

The plain loop keeps a Shard in memory (one shard: all prompts of the step); the flow stores it
between its Metaflow steps (`shard_to_bytes` / `shard_from_bytes`). Both call the same phase
functions (srpo_core/step.py), so a seeded step gives identical records either way.

Seed scheme: the sampling seed of phase p (1 generate/seed search, 2 localization, 3 suffixes) of
epoch step s in shard k is ((train.seed * 1_000_003 + s * 101 + p) mod 2^31) + 7919 k; a resumed
or retried phase therefore samples exactly as the first attempt did.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from srpo_core import rollouts as R
from srpo_core.config import Config
from srpo_core.engine.base import Rollout, RolloutEngine, SamplingParams, ThoughtLimits
from srpo_core.tasks import Task, TaskItem

PHASE_SEED = {"generate": 1, "localize": 2, "suffix": 3}


@dataclass
class Shard:
    """What the phases of one shard have produced so far (JSON-able)."""

    states: list[R.PromptState]
    pending: list[list[Rollout]] = field(default_factory=list)  # unscored chains per state
    fill: list[list[Rollout]] = field(default_factory=list)  # unscored base-fill chains per state
    locs: list[R.Localization] = field(default_factory=list)
    suffixes: list[list[Rollout]] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)  # R.Record as dicts (verify_suffix on)
    timings: dict[str, float] = field(default_factory=dict)
    rounds: int = 0
    extra: dict = field(default_factory=dict)  # JSON-able state of methods that need more


def step_seed(cfg: Config, step: int, phase: int) -> int:
    """Seeds derived from (training seed, step, phase) so a resumed step samples the same way."""
    return (cfg.train.seed * 1_000_003 + step * 101 + phase) % (2**31)


def limits_of(cfg: Config) -> ThoughtLimits:
    r = cfg.rollout
    return ThoughtLimits(stop=r.stop, max_thoughts=r.max_thoughts, max_thought_tokens=r.max_thought_tokens, max_response_tokens=r.max_response_tokens, max_model_len=cfg.model.max_model_len)


def sampling_of(cfg: Config, seed: int) -> SamplingParams:
    r = cfg.rollout
    return SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, seed=seed)


@dataclass
class PhaseContext:
    """What a phase runs with: the config, the task, where it is (step, shard) and, for the phases
    that sample, the engine holding the policy of the step's parent checkpoint."""

    cfg: Config
    task: Task
    step: int
    shard_index: int = 0
    engine: RolloutEngine | None = None

    def seed(self, phase: str) -> int:
        return step_seed(self.cfg, self.step, PHASE_SEED[phase]) + 7919 * self.shard_index

    def sampling(self, phase: str) -> SamplingParams:
        return sampling_of(self.cfg, self.seed(phase))

    @property
    def limits(self) -> ThoughtLimits:
        return limits_of(self.cfg)

    @property
    def policy(self) -> RolloutEngine:
        if self.engine is None:
            raise RuntimeError(f"step {self.step} shard {self.shard_index}: this phase samples but was given no engine")
        return self.engine


# ---- the JSON codec -------------------------------------------------------------------------------


def rollout_from_dict(d: dict) -> Rollout:
    return Rollout(**{**d, "spans": [tuple(s) for s in d["spans"]]})


def _attempt(d: dict) -> R.Attempt:
    return R.Attempt(rollout_from_dict(d["rollout"]), d["reward"])


def _state(d: dict) -> R.PromptState:
    return R.PromptState(
        item=TaskItem(**d["item"]), prompt_ids=d["prompt_ids"], collected=[_attempt(a) for a in d["collected"]],
        seeds=[_attempt(a) for a in d["seeds"]], attempts=d["attempts"], dropped=d["dropped"],
        dropped_tokens=d["dropped_tokens"], base=[_attempt(a) for a in d["base"]],
    )


def record_from_dict(d: dict) -> R.Record:
    return R.Record(**{**d, "rollout": rollout_from_dict(d["rollout"]), "item": TaskItem(**d["item"])})


def shard_to_bytes(shard: Shard) -> bytes:
    return json.dumps(dataclasses.asdict(shard)).encode()


def shard_from_bytes(data: bytes) -> Shard:
    d = json.loads(data)
    return Shard(
        states=[_state(s) for s in d["states"]],
        pending=[[rollout_from_dict(r) for r in rs] for rs in d["pending"]],
        fill=[[rollout_from_dict(r) for r in rs] for rs in d["fill"]],
        locs=[R.Localization(**l) for l in d["locs"]],
        suffixes=[[rollout_from_dict(r) for r in rs] for rs in d["suffixes"]],
        records=d["records"], timings=d["timings"], rounds=d["rounds"], extra=d.get("extra", {}),
    )

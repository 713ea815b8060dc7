"""GRPO: G = method.rollouts_per_prompt iid chains per prompt, one advantage group.

    generate       sample G chains from each prompt (unscored)
    verify         score them: the prompt's group (a chain with no thought gets reward 0)
    verify_suffix  records, group `base`, one group id per prompt
"""

from __future__ import annotations

from srpo_core import rollouts as R
from srpo_core.methods import register
from srpo_core.methods.base import Method, records_to_shard


def sample_iid(ctx, shard, n: int) -> None:
    """Sample up to `n` iid chains from each prompt of the shard (unscored, in `shard.pending`)."""
    shard.pending = R.sample(ctx.policy, shard.states, [n - s.attempts for s in shard.states], ctx.limits, R.round_sampling(ctx.sampling("generate"), 0))
    shard.rounds = 1


def verify_first_attempts(ctx, shard) -> None:
    """Score the pending first attempts as each prompt's `base` (SCoRe's y1, Critique-GRPO's
    originals; unlike GRPO's group, a chain with no thought keeps the verifier's reward)."""
    for state, rollouts in zip(shard.states, shard.pending):
        state.base = R.verify(ctx.task, state.item, rollouts, shard.timings, ctx.cfg.rollout.score_unfinished)
        state.attempts = len(rollouts)
    shard.pending = []


def verify_iid(ctx, shard) -> None:
    """Score the pending chains into each prompt's group (a chain with no thought gets reward 0)."""
    for state, rollouts in zip(shard.states, shard.pending):
        for att in R.verify(ctx.task, state.item, rollouts, shard.timings, ctx.cfg.rollout.score_unfinished):
            state.attempts += 1
            if not att.rollout.spans:
                att.reward = 0.0
            state.base.append(att)
    shard.pending = []


class GRPO(Method):
    name = "grpo"
    description = "8 iid rollouts, one group"
    phases = frozenset({"generate", "verify", "verify_suffix"})
    model_phases = frozenset({"generate"})
    localizers = ("random",)  # no resets; "random" is the localizer its records and tags have always carried

    def validate(self, m) -> list[tuple[str, str]]:
        return [] if m.rollouts_per_prompt > 1 else [("method.rollouts_per_prompt", "must be > 1 (a group of one has no advantage)")]

    def generate(self, ctx, shard) -> None:
        sample_iid(ctx, shard, ctx.cfg.method.rollouts_per_prompt)

    def verify(self, ctx, shard) -> None:
        verify_iid(ctx, shard)

    def verify_suffix(self, ctx, shard) -> None:
        records = [R.Record(a.rollout, s.item, "base", f"{ctx.step}:{s.item.id}:base", a.reward) for s in shard.states for a in s.base]
        records_to_shard(shard, R.mark_steps_valid(ctx.task, records))


register(GRPO())

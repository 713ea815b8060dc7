"""Reset methods, paper algorithm 2: RRPO (random resets) and SRPO (localized resets).

    generate       first round of the seed search, unscored
    verify         score it: seeds (first incorrect chains) and base candidates
    localize       finish the seed search (further rounds scored in-process), close the base
                   groups (fill chains sampled, unscored), pick each seed's reset h* (a seed
                   whose localization raises resets at thought 1, status `error`), and the
                   localization audit's judge verdict per seed (srpo_core/audit.py)
    suffix         sample the G suffixes of each reset prefix x* (prefix encoded once per seed)
    verify_suffix  score fill chains and suffixes; records (base / shared_prefix / fallback / seed)

The building blocks are srpo_core/rollouts.py's; the localizers are `rollouts.LOCALIZERS`.
"""

from __future__ import annotations

import logging
import time

from srpo_core import audit
from srpo_core import rollouts as R
from srpo_core.methods import register
from srpo_core.methods.base import Method, Variant, records_to_shard

log = logging.getLogger(__name__)


def seed_search(cfg) -> R.SeedSearch:
    m = cfg.method
    return R.SeedSearch(R.SPLITS[m.split], m.seed_search_budget, m.rollouts_per_prompt, m.incorrect_threshold, cfg.rollout.score_unfinished)


class ResetMethod(Method):
    phases = frozenset({"generate", "verify", "localize", "suffix", "verify_suffix"})
    model_phases = frozenset({"generate", "localize", "suffix"})
    uses_split = True

    def validate(self, m) -> list[tuple[str, str]]:
        out = []
        if m.rollouts_per_prompt != 8:
            out.append(("method.rollouts_per_prompt", "the reset splits are defined for a budget of 8"))
        return out

    def label(self, variant: Variant, several_splits: bool, several_localizers: bool) -> str:
        extra = [variant.split.replace("x", "×")] if several_splits else []
        return variant.method.upper() + (f" ({', '.join(extra)})" if extra else "")

    def generate(self, ctx, shard) -> None:
        search = seed_search(ctx.cfg)
        counts = R.round_counts(shard.states, search.spec, search.budget)
        shard.pending = R.sample(ctx.policy, shard.states, counts, ctx.limits, R.round_sampling(ctx.sampling("generate"), 0))
        shard.rounds = 1

    def verify(self, ctx, shard) -> None:
        search = seed_search(ctx.cfg)
        R.absorb_round(ctx.task, shard.states, shard.pending, search, shard.timings)
        shard.pending = []

    def localize(self, ctx, shard) -> None:
        cfg, m = ctx.cfg, ctx.cfg.method
        verified = shard.timings.get("verification", 0.0)
        start = time.perf_counter()
        shard.rounds, shard.fill = R.finish_seed_search(ctx.policy, ctx.task, shard.states, seed_search(cfg), ctx.limits, ctx.sampling("generate"), shard.rounds, shard.timings)
        in_search = shard.timings.get("verification", 0.0) - verified  # scored in-process: verification, not generation
        shard.timings["generation"] = shard.timings.get("generation", 0.0) + time.perf_counter() - start - in_search
        cases = R.seed_cases(shard.states)
        lctx = R.LocalizeContext(
            ctx.policy, ctx.task, m.localization_template, m.resolved_localization_temperature, m.localization_max_tokens, cfg.model.chat_template_for_localization, ctx.seed("localize")
        )
        start = time.perf_counter()
        shard.locs = R.localize(m.resolved_localizer, cases, lctx)
        shard.timings["localization"] = shard.timings.get("localization", 0.0) + time.perf_counter() - start
        start = time.perf_counter()
        shard.locs = audit.judge_seeds(cases, shard.locs, cfg, ctx.task, ctx.seed("localize"))
        shard.timings["audit"] = shard.timings.get("audit", 0.0) + time.perf_counter() - start

    def suffix(self, ctx, shard) -> None:
        start = time.perf_counter()
        shard.suffixes = R.sample_suffixes(ctx.policy, R.seed_cases(shard.states), shard.locs, R.SPLITS[ctx.cfg.method.split].suffixes, ctx.limits, ctx.sampling("suffix"))
        shard.timings["suffix"] = shard.timings.get("suffix", 0.0) + time.perf_counter() - start

    def verify_suffix(self, ctx, shard) -> None:
        start = time.perf_counter()
        for state, rollouts in zip(shard.states, shard.fill):
            state.base.extend(R.verify(ctx.task, state.item, rollouts, score_unfinished=ctx.cfg.rollout.score_unfinished))
        shard.fill = []
        records = R.build_records(ctx.task, ctx.step, shard.states, shard.locs, shard.suffixes, ctx.cfg.rollout.score_unfinished)
        shard.timings["verification"] = shard.timings.get("verification", 0.0) + time.perf_counter() - start
        records_to_shard(shard, records)


class RRPO(ResetMethod):
    name = "rrpo"
    description = "seed search; base group of 4; 4 suffixes from a reset at a uniform thought"
    localizers = ("random",)

    def validate(self, m) -> list[tuple[str, str]]:
        out = super().validate(m)
        if m.resolved_localizer != "random":
            out.append(("method.localizer", "rrpo resets at random; use srpo for other localizers"))
        return out

    def variants(self, splits, localizers) -> list[Variant]:
        return [Variant(self.name, s, "random") for s in splits]


class SRPO(ResetMethod):
    name = "srpo"
    description = "as rrpo, reset at the first wrong thought named by a localizer"
    localizers = ("self", "oracle", "divergence")

    def validate(self, m) -> list[tuple[str, str]]:
        out = super().validate(m)
        if m.resolved_localizer == "random":
            out.append(("method.localizer", "srpo with random resets is rrpo"))
        return out

    def variants(self, splits, localizers) -> list[Variant]:
        locs = [loc for loc in localizers if loc != "random"]
        if not locs:
            raise ValueError("srpo needs a localizer other than 'random' (random resets are rrpo)")
        return [Variant(self.name, s, loc) for s in splits for loc in locs]

    def label(self, variant: Variant, several_splits: bool, several_localizers: bool) -> str:
        extra = [variant.split.replace("x", "×")] if several_splits else []
        if several_localizers:
            extra.append(variant.localizer)
        return variant.method.upper() + (f" ({', '.join(extra)})" if extra else "")


register(RRPO())
register(SRPO())

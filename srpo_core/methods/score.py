"""SCoRe (Kumar et al. 2024), a table-3 baseline: a first attempt y1 from the question, a second
attempt y2 written by the policy from the question, y1 and an instruction, trained in that context.

    generate       sample the first attempts: rollouts_per_prompt / 2 per prompt (4 pairs in a budget of 8)
    verify         score them (a chain with no thought gets reward 0)
    suffix         one second attempt per first attempt with >= 1 thought (a y1 with no thought
                   gets none): context = the rollout prompt + y1's response tokens + the
                   instruction (`options.instruction_template`, REFERENCE "Baselines of table 3")
    verify_suffix  score them; records with the rewards the update uses (algos.score_shaped_rewards):
                   stage II: y1 gets R(y1), y2 gets R(y2) + alpha (R(y2) - R(y1));
                   stage I (epoch steps < options.stage1_steps): y1 gets 0, y2 gets R(y2)

Advantage: the trained reward itself (no baseline, no group), minus the KL to the reference
policy, kl_coef * (1/T) sum_t (log pi_old - log pi_ref), computed by the learner with the LoRA
adapter disabled (learner.reference_kl_advantages); kl_coef is options.kl_coef, and
options.kl_coef_stage1_first on y1 in stage I. Loss: the configured one (the authors': PPO-clip).

Evaluation scores the first attempt (table 3); `second_attempt_accuracy` scores the second.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from srpo_core import rollouts as R
from srpo_core import templates
from srpo_core.engine.base import Rollout, SamplingParams, ThoughtRequest
from srpo_core.methods import register
from srpo_core.methods.base import Method, Variant, records_to_shard
from srpo_core.methods.grpo import sample_iid, verify_first_attempts


@dataclass(frozen=True)
class LossVariant(Variant):
    """A comparison row that also sets the loss its method trains with (`loss.loss`)."""

    loss: str = ""

    def overrides(self) -> dict:
        return {**super().overrides(), **({"loss.loss": self.loss} if self.loss else {})}


@dataclass(frozen=True)
class ScoreOptions:
    alpha: float = 10.0  # stage II bonus for correcting: y2 gets R(y2) + alpha (R(y2) - R(y1))
    stage1_steps: int = 0  # epoch steps of stage I before stage II (the authors ran stage II only)
    kl_coef: float = 0.01  # KL to the reference subtracted from every reward
    kl_coef_stage1_first: float = 0.1  # the stronger KL on y1 in stage I
    instruction_template: str = ""  # appended after y1 (templates/ or a .txt path); "": score_instruction_v1, tiny_score_instruction_v1 with a tiny_ rollout template
    eval_second_attempt: bool = False  # evaluations also score the second attempt (eval/<benchmark>/second_attempt_accuracy); table 3 scores the first

    def __post_init__(self):
        from srpo_core.config import ConfigError

        if self.alpha < 0:
            raise ConfigError("method.options.alpha: must be >= 0")
        if self.stage1_steps < 0:
            raise ConfigError("method.options.stage1_steps: must be >= 0")
        if self.kl_coef < 0 or self.kl_coef_stage1_first < 0:
            raise ConfigError("method.options.kl_coef, kl_coef_stage1_first: must be >= 0")
        try:
            self.instruction_template and templates.load_template(self.instruction_template)
        except FileNotFoundError as exc:
            raise ConfigError(f"method.options.instruction_template: {exc}") from None


def tiny_scale(cfg) -> bool:
    """Whether the config samples with a tiny_ rollout template (the embedded default): the
    baselines' scale-paired defaults (templates, segment length) follow it, as the localization
    template does in the tiny preset."""
    from pathlib import Path

    return Path(cfg.rollout.template).name.startswith("tiny_")


def paired_template(cfg, name: str, default: str) -> str:
    """`name`, else `default` (with a tiny_ prefix at tiny scale)."""
    return name or (f"tiny_{default}" if tiny_scale(cfg) else default)


def stage_of(step: int, options: ScoreOptions) -> int:
    return 1 if step < options.stage1_steps else 2


def second_attempt_prompt(engine, prompt_ids: list[int], first: Rollout, question: str, instruction_template: str) -> list[int]:
    """The context of a second attempt: the rollout prompt, y1's response tokens (token-exact),
    then the instruction."""
    return list(prompt_ids) + list(first.response_ids) + engine.encode(templates.render(templates.load_template(instruction_template), question=question))


def with_second(state: R.PromptState) -> list[int]:
    """Indices of the prompt's first attempts that get a second one (those with >= 1 thought)."""
    return [j for j, a in enumerate(state.base) if a.rollout.spans]


class Score(Method):
    name = "score"
    description = "4 pairs (y1, y2): y2 from question + y1 + instruction; shaped reward R(y2) + alpha (R(y2) - R(y1)), KL to the base"
    phases = frozenset({"generate", "verify", "suffix", "verify_suffix"})
    model_phases = frozenset({"generate", "suffix"})
    losses = ("clip", "pg")
    localizers = ("random",)  # no resets; the value config.py requires of every method (as grpo)
    options_class = ScoreOptions

    def extra_evaluation(self, engine, task, items, cfg) -> dict[str, float]:
        """With `eval_second_attempt`: the greedy second attempt's accuracy beside the first's."""
        if not cfg.method.parsed_options.eval_second_attempt:
            return {}
        out = second_attempt_accuracy(engine, task, items, cfg)
        return {"first_attempt_accuracy": out["first"], "second_attempt_accuracy": out["second"]}

    def validate(self, m) -> list[tuple[str, str]]:
        return [] if m.rollouts_per_prompt % 2 == 0 else [("method.rollouts_per_prompt", "score samples pairs (y1, y2): must be even")]

    def variants(self, splits, localizers) -> list[Variant]:
        return [LossVariant(self.name, loss="clip")]

    def label(self, variant, several_splits, several_localizers) -> str:
        return "SCoRe"

    def generate(self, ctx, shard) -> None:
        sample_iid(ctx, shard, ctx.cfg.method.rollouts_per_prompt // 2)  # the first attempts y1, one per pair

    def verify(self, ctx, shard) -> None:
        verify_first_attempts(ctx, shard)

    def suffix(self, ctx, shard) -> None:
        start = time.perf_counter()
        opts = ctx.cfg.method.parsed_options
        requests, where = [], []
        for i, state in enumerate(shard.states):
            for j in with_second(state):
                instruction = paired_template(ctx.cfg, opts.instruction_template, "score_instruction_v1")
                requests.append(ThoughtRequest(tuple(second_attempt_prompt(ctx.policy, state.prompt_ids, state.base[j].rollout, state.item.question, instruction)), n=1))
                where.append(i)
        out = ctx.policy.generate_thoughts(requests, ctx.limits, ctx.sampling("suffix")) if requests else []
        shard.suffixes = [[] for _ in shard.states]
        for i, rs in zip(where, out):
            shard.suffixes[i].extend(rs)
        shard.timings["suffix"] = shard.timings.get("suffix", 0.0) + time.perf_counter() - start

    def verify_suffix(self, ctx, shard) -> None:
        import torch

        from srpo_core.algos import score_shaped_rewards

        opts = ctx.cfg.method.parsed_options
        stage = stage_of(ctx.step, opts)
        records: list[R.Record] = []
        for state, seconds in zip(shard.states, shard.suffixes or [[] for _ in shard.states]):
            gid = f"{ctx.step}:{state.item.id}:score"
            second = dict(zip(with_second(state), R.verify(ctx.task, state.item, seconds, shard.timings, ctx.cfg.rollout.score_unfinished)))
            r1 = torch.tensor([a.reward for a in state.base], dtype=torch.float64)
            r2 = torch.tensor([second[j].reward if j in second else 0.0 for j in range(len(state.base))], dtype=torch.float64)
            t1, t2 = score_shaped_rewards(r1, r2, opts.alpha, stage)
            kl1 = opts.kl_coef_stage1_first if stage == 1 else opts.kl_coef
            for j, a in enumerate(state.base):
                records.append(R.Record(a.rollout, state.item, "base", gid, a.reward, role="attempt1", node=f"pair{j}", trained_reward=float(t1[j]), kl_coef=kl1))
                if j in second:
                    records.append(R.Record(second[j].rollout, state.item, "base", gid, second[j].reward, role="attempt2", node=f"pair{j}", trained_reward=float(t2[j]), kl_coef=opts.kl_coef))
        shard.suffixes = []
        records_to_shard(shard, R.mark_steps_valid(ctx.task, records))

    def advantages(self, records: list[R.Record]) -> None:
        """No baseline: the advantage is the trained (shaped) reward; the KL is the learner's."""
        for r in records:
            if r.trainable:
                r.advantage = r.reward if r.trained_reward is None else r.trained_reward

    def train_sequences(self, records: list[R.Record]) -> list:
        from srpo_core.learner import TrainSequence

        index = {pid: i for i, pid in enumerate(dict.fromkeys(r.item.id for r in records))}
        return [
            TrainSequence(r.rollout.prompt_ids, r.rollout.response_ids, r.rollout.prefix_len, r.advantage, r.rollout.logprobs, index[r.item.id], kl_coef=r.kl_coef)
            for r in records if r.trainable
        ]  # fmt: skip


def second_attempt_accuracy(engine, task, items, cfg, instruction_template: str | None = None) -> dict[str, float]:
    """Greedy first and second attempts on `items` (the evaluation's rules: rollout prompt,
    rollouts.chain_reward): {"first": accuracy of y1, "second": accuracy of y2, "n": items}. A
    first attempt with no thought gets no second one (scored 0), as in training."""
    from srpo_core.evaluate import fit_prompt
    from srpo_core.shard import limits_of

    if instruction_template is None:
        instruction_template = paired_template(cfg, cfg.method.parsed_options.instruction_template if cfg.method.method == "score" else "", "score_instruction_v1")
    greedy = SamplingParams(temperature=0.0)
    prompts = [fit_prompt(engine, cfg, it).ids for it in items]
    kept = [i for i, p in enumerate(prompts) if p is not None]
    firsts = engine.generate_thoughts([ThoughtRequest(tuple(prompts[i]), n=1) for i in kept], limits_of(cfg), greedy)
    y1 = {i: rs[0] for i, rs in zip(kept, firsts)}
    again = [i for i in kept if y1[i].spans]
    requests = [ThoughtRequest(tuple(second_attempt_prompt(engine, prompts[i], y1[i], items[i].question, instruction_template)), n=1) for i in again]
    seconds = engine.generate_thoughts(requests, limits_of(cfg), greedy) if again else []
    y2 = {i: rs[0] for i, rs in zip(again, seconds)}
    first = sum(R.chain_reward(task, items[i], y1[i], cfg.rollout.score_unfinished) >= 1.0 for i in kept)
    second = sum(R.chain_reward(task, items[i], y2[i], cfg.rollout.score_unfinished) >= 1.0 for i in again)
    n = max(len(kept), 1)
    return {"first": first / n, "second": second / n, "n": float(len(kept))}


register(Score())

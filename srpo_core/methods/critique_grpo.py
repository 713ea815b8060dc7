"""Critique-GRPO (Zhang et al. 2025), a table-3 baseline: G chains, the checker's critique of each,
one policy refinement per chain, the best refinement in place of one original.

    generate       sample G = method.rollouts_per_prompt chains per prompt
    verify         score them; each gets the checker's critique sentence ("The generated
                   solution is correct." / "... incorrect.", by the task's rule of a wrong chain)
    suffix         one refinement of every chain (G more generations, 2G in all), sampled from the
                   refinement prompt (`options.refinement_template`: question, the chain's text,
                   its critique; raw text, no rollout template)
    verify_suffix  score them; trained: originals 1..G-1 and the first correct refinement (else
                   the first one); original G and the other refinements are recorded, not trained

Advantage: reward minus the mean of the prompt's G trained rewards, no std (algos.mean_advantages).
Loss (algos "critique" / "critique_refinement"): original tokens -A exp(log pi - log pi_old)
(unclipped ratio); refinement tokens -A f(pi), f(p) = p / (p + gamma); each minus
options.entropy_coef times the entropy surrogate. The refinement is trained in its own context
(the refinement prompt) by default; options.refinement_context = "question" trains it after the
question-only prompt, as the authors' release does.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from srpo_core import rollouts as R
from srpo_core import templates
from srpo_core.engine.base import ThoughtRequest
from srpo_core.methods import register
from srpo_core.methods.base import Method, Variant, records_to_shard
from srpo_core.methods.grpo import sample_iid, verify_first_attempts
from srpo_core.methods.score import LossVariant, paired_template
from srpo_core.tasks.base import is_incorrect

CRITIQUES = {True: "The generated solution is correct.", False: "The generated solution is incorrect."}
_FIELD = re.compile(r"\{(question|failed_solution|critique)\}")


@dataclass(frozen=True)
class CritiqueOptions:
    gamma: float = 0.1  # f(p) = p / (p + gamma) on refinement tokens
    entropy_coef: float = 0.001
    refinement_template: str = ""  # "": critique_refinement_v1, tiny_critique_refinement_v1 with a tiny_ rollout template
    refinement_context: str = "refinement"  # "refinement": trained after its own prompt; "question": after the question-only prompt (the authors')

    def __post_init__(self):
        from srpo_core.config import ConfigError

        if self.gamma <= 0:
            raise ConfigError("method.options.gamma: must be > 0")
        if self.entropy_coef < 0:
            raise ConfigError("method.options.entropy_coef: must be >= 0")
        if self.refinement_context not in ("refinement", "question"):
            raise ConfigError("method.options.refinement_context: refinement|question")
        try:
            self.refinement_template and templates.load_template(self.refinement_template)
        except FileNotFoundError as exc:
            raise ConfigError(f"method.options.refinement_template: {exc}") from None


def refinement_prompt(template_name: str, question: str, solution: str, critique: str) -> str:
    """The refinement prompt, fields substituted in one pass (a solution holding `{question}`
    stays as written)."""
    values = {"question": question, "failed_solution": solution, "critique": critique}
    return _FIELD.sub(lambda m: values[m.group(1)], templates.load_template(template_name))


def choose_refinement(rewards: list[float], correct: list[bool]) -> int:
    """Index of the refinement that enters the buffer: the first correct one, else the first."""
    if not rewards:
        raise ValueError("choose_refinement: no refinement to choose from")
    return next((j for j, ok in enumerate(correct) if ok), 0)


class CritiqueGRPO(Method):
    name = "critique_grpo"
    description = "8 chains + a critique-conditioned refinement of each; the best refinement replaces original 8; mean-only advantages, p/(p+gamma) on its tokens"
    phases = frozenset({"generate", "verify", "suffix", "verify_suffix"})
    model_phases = frozenset({"generate", "suffix"})
    losses = ("critique",)
    localizers = ("random",)  # no resets; the value config.py requires of every method (as grpo)
    options_class = CritiqueOptions
    trains_with_options = True  # step.train_sequences passes method.options

    def variants(self, splits, localizers) -> list[Variant]:
        return [LossVariant(self.name, loss="critique")]

    def label(self, variant, several_splits, several_localizers) -> str:
        return "Critique-GRPO"

    def generate(self, ctx, shard) -> None:
        sample_iid(ctx, shard, ctx.cfg.method.rollouts_per_prompt)

    def verify(self, ctx, shard) -> None:
        verify_first_attempts(ctx, shard)

    def suffix(self, ctx, shard) -> None:
        start = time.perf_counter()
        opts = ctx.cfg.method.parsed_options
        template = paired_template(ctx.cfg, opts.refinement_template, "critique_refinement_v1")
        requests = []
        for state in shard.states:
            for a in state.base:
                critique = CRITIQUES[not is_incorrect(ctx.task, state.item, a.reward)]
                requests.append(ThoughtRequest(tuple(ctx.policy.encode(refinement_prompt(template, state.item.question, a.rollout.text, critique))), n=1))
        out = ctx.policy.generate_thoughts(requests, ctx.limits, ctx.sampling("suffix")) if requests else []
        shard.suffixes, k = [], 0
        for state in shard.states:
            shard.suffixes.append([rs[0] for rs in out[k : k + len(state.base)]])
            k += len(state.base)
        shard.timings["suffix"] = shard.timings.get("suffix", 0.0) + time.perf_counter() - start

    def verify_suffix(self, ctx, shard) -> None:
        records: list[R.Record] = []
        for state, refinements in zip(shard.states, shard.suffixes):
            gid = f"{ctx.step}:{state.item.id}:base"
            scored = R.verify(ctx.task, state.item, refinements, shard.timings, ctx.cfg.rollout.score_unfinished)
            best = choose_refinement([a.reward for a in scored], [not is_incorrect(ctx.task, state.item, a.reward) for a in scored]) if scored else None
            last = len(state.base) - 1 if best is not None else None  # the original the refinement replaces
            for role, attempts, kept in (("original", state.base, [j != last for j in range(len(state.base))]), ("refinement", scored, [j == best for j in range(len(scored))])):
                for j, (a, trained) in enumerate(zip(attempts, kept)):
                    group, group_id = ("base", gid) if trained else ("generated", f"{gid}:untrained")
                    records.append(R.Record(a.rollout, state.item, group, group_id, a.reward, role=role, node=f"chain{j}", trained=trained))
        shard.suffixes = []
        records_to_shard(shard, R.mark_steps_valid(ctx.task, records))

    def advantages(self, records: list[R.Record]) -> None:
        import torch

        from srpo_core.algos import mean_advantages

        train = [r for r in records if r.trainable]
        if not train:
            return
        gids = {g: i for i, g in enumerate(dict.fromkeys(r.group_id for r in train))}
        adv = mean_advantages(torch.tensor([r.reward for r in train], dtype=torch.float64), torch.tensor([gids[r.group_id] for r in train]))
        for r, a in zip(train, adv.tolist()):
            r.advantage = a

    def train_sequences(self, records: list[R.Record], options: CritiqueOptions | None = None) -> list:
        from srpo_core.learner import TrainSequence

        opts = options or CritiqueOptions()
        index = {pid: i for i, pid in enumerate(dict.fromkeys(r.item.id for r in records))}
        question_prompt = {r.item.id: r.rollout.prompt_ids for r in records if r.role == "original"}
        entropy = (("entropy_coef", opts.entropy_coef),)
        out = []
        for r in records:
            if not r.trainable:
                continue
            if r.role == "refinement":
                prompt = question_prompt[r.item.id] if opts.refinement_context == "question" else r.rollout.prompt_ids
                shaping = (("gamma", opts.gamma), *entropy)
                out.append(TrainSequence(prompt, r.rollout.response_ids, r.rollout.prefix_len, r.advantage, r.rollout.logprobs, index[r.item.id], loss="critique_refinement", loss_kwargs=shaping))
            else:
                out.append(TrainSequence(r.rollout.prompt_ids, r.rollout.response_ids, r.rollout.prefix_len, r.advantage, r.rollout.logprobs, index[r.item.id], loss="critique", loss_kwargs=entropy))
        return out


register(CritiqueGRPO())

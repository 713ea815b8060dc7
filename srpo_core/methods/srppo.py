"""SR-PPO: single-rollout PPO with a Monte Carlo Pass@k credit critic (the Pass@k critic summary).

    generate       sample `method.options.rollouts` chains (default 1) from each prompt (unscored)
    verify         score them (a chain with no thought gets reward 0)
    verify_suffix  records, group `base`, one group id per prompt; with a step checker each
                   record carries its first wrong thought (`oracle_first_error`) for the exact
                   critics and the credit metrics
    learner step   (`prepare_update`, where the learner holds the policy) the critic's values at
                   the boundaries, token-level credits (srpo_core/critic.py), the critic's update on
                   the same batch, then the PPO-clip update of the LoRA policy on the credits

Choices (stated here and in the README):
  - the learned critic is a value head on the policy's detached last hidden states with its own
    AdamW optimizer (why: srpo_core/critic.py); its weights and optimizer state are
    `critic/critic.pt` in the step checkpoint (beside adapter/, hashed by the store's manifest),
    with `critic/credits.json` (per trained rollout: credit per thought, P_k at each boundary);
  - credits follow the summary: c = P_k(after) - P_k(before) plus the terminal correction
    R - P_k(T), lambda = 0, no normalisation, token granularity; k = 8 by default (a choice: the
    summary fixes none; 8 is the attempts GRPO's group buys per prompt);
  - the policy loss is PPO's dual-clipped surrogate on the token credits (`options.loss`,
    default "clip"; loss.clip_eps / loss.dual_clip apply), whatever `loss.loss` says (it serves
    the other methods); credits go to the learner as T_i * c_t so that the loss is -sum_t c_t rho_t;
  - `advantage` of a record is its credit sum, R - P_k(prompt), once the update ran;
  - an equal rollout budget against grpo means 8x the prompts per step (presets/srppo.yaml;
    `srpo compare` scales them itself from `rollouts_per_prompt`, compare/plan.py).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from srpo_core import rollouts as R
from srpo_core.methods import register
from srpo_core.methods.base import Method, records_to_shard
from srpo_core.methods.grpo import sample_iid, verify_iid

CRITICS = ("learned", "reachability", "exact")
GRANULARITIES = ("token", "thought")
NORMALIZATIONS = ("none", "std", "whiten")
CRITIC_DIR = "critic"


@dataclass(frozen=True)
class SRPPOOptions:
    rollouts: int = 1  # chains per prompt
    k: float = 8.0  # Pass@k of the critic's Pass@1 (1: a plain MC value baseline; .inf: reachability)
    granularity: str = "token"  # token | thought
    lam: float = 0.0  # 0: the differences (the summary); 1: R - P_k(before the unit)
    normalize: str = "none"  # none | std (divide the batch's credits by their std) | whiten (also subtract the mean)
    critic: str = "learned"  # learned | reachability | exact
    critic_hidden: int = 256  # the value head's hidden width (0: linear)
    critic_lr: float = 1.0e-3
    critic_steps: int = 8  # full-batch AdamW steps of the head per training step
    loss: str = "clip"  # the policy loss on the credits (algos.LOSSES)

    def __post_init__(self):
        from srpo_core.algos import LOSSES
        from srpo_core.config import ConfigError

        def need(cond: bool, key: str, reason: str) -> None:
            if not cond:
                raise ConfigError(f"method.options.{key}: {reason}")

        need(self.rollouts >= 1, "rollouts", "must be >= 1")
        need(self.k >= 1 and not math.isnan(self.k), "k", "must be >= 1 (.inf: Pass@infinity)")
        need(self.granularity in GRANULARITIES, "granularity", f"one of {GRANULARITIES}")
        need(0.0 <= self.lam <= 1.0, "lam", "must be in [0, 1]")
        need(self.normalize in NORMALIZATIONS, "normalize", f"one of {NORMALIZATIONS}")
        need(self.critic in CRITICS, "critic", f"one of {CRITICS}")
        need(self.critic == "learned" or self.granularity == "thought", "granularity", f"critic {self.critic!r} gives values at thought boundaries only: set granularity: thought")
        need(self.critic_hidden >= 0, "critic_hidden", "must be >= 0 (0: a linear head)")
        need(self.critic_lr > 0, "critic_lr", "must be > 0")
        need(self.critic_steps >= 1, "critic_steps", "must be >= 1")
        need(self.loss in LOSSES, "loss", f"one of {tuple(LOSSES)}")


CREDIT_FIELDS = ("reward", "spans", "first_error", "has_checker", "question", "gold", "item_id")
_CREDIT_CLASS: list[type] = []


def credit_sequence_class() -> type:
    """`CreditSequence`: a learner.TrainSequence with what the critic needs (JSON-able: it crosses
    to torchrun workers). Built on first use, so that registering the method imports no torch."""
    if not _CREDIT_CLASS:
        from srpo_core.learner import TrainSequence

        @dataclass(frozen=True)
        class CreditSequence(TrainSequence):
            reward: float = 0.0
            spans: tuple = ()  # the rollout's thought spans (response token indices)
            first_error: int | None = None  # the step checker's first wrong thought (None: none, or no checker)
            has_checker: bool = False
            question: str = ""  # the task item (the exact critic: the synthetic task's gold chain)
            gold: str = ""
            item_id: str = ""

        _CREDIT_CLASS.append(CreditSequence)
    return _CREDIT_CLASS[0]


def is_credit_sequence(s) -> bool:
    return all(hasattr(s, f) for f in CREDIT_FIELDS)


def sequence_from_dict(d: dict):
    """A learner sequence from its JSON form (asdict): a CreditSequence when it carries the
    critic's fields, else a TrainSequence."""
    from srpo_core.learner import TrainSequence

    tokens = tuple(d["token_advantages"]) if d.get("token_advantages") is not None else None
    d = {**d, "token_advantages": tokens, "loss_kwargs": tuple(tuple(kv) for kv in d.get("loss_kwargs", ()))}  # JSON lists back to tuples
    if all(f in d for f in CREDIT_FIELDS):
        return credit_sequence_class()(**{**d, "spans": tuple(tuple(sp) for sp in d["spans"])})
    return TrainSequence(**d)


class SRPPO(Method):
    name = "srppo"
    description = "1 rollout per prompt; PPO-clip on token credits from a Monte Carlo Pass@k critic"
    phases = frozenset({"generate", "verify", "verify_suffix"})
    model_phases = frozenset({"generate"})
    localizers = ("random",)  # no resets; as grpo, the name its records and tags carry (config needs one of rollouts.LOCALIZERS)
    options_class = SRPPOOptions

    def label(self, variant, several_splits: bool, several_localizers: bool) -> str:
        return "SR-PPO"

    def rollouts_per_prompt(self, cfg) -> int:
        return self.options(cfg.method).rollouts

    def generate(self, ctx, shard) -> None:
        sample_iid(ctx, shard, self.options(ctx.cfg.method).rollouts)

    def verify(self, ctx, shard) -> None:
        verify_iid(ctx, shard)

    def verify_suffix(self, ctx, shard) -> None:
        task = ctx.task
        records = []
        for s in shard.states:
            for a in s.base:
                first = task.first_error(s.item, a.rollout.thoughts) if task.has_step_checker else None
                records.append(R.Record(a.rollout, s.item, "base", f"{ctx.step}:{s.item.id}:base", a.reward, oracle_first_error=first))
        records_to_shard(shard, R.mark_steps_valid(task, records))

    def advantages(self, records: list[R.Record]) -> None:
        """Nothing before the update: the credits come from the critic in the learner step."""

    def train_sequences(self, records: list[R.Record]) -> list:
        index = {pid: i for i, pid in enumerate(dict.fromkeys(r.item.id for r in records))}
        seq = credit_sequence_class()
        return [
            seq(
                r.rollout.prompt_ids, r.rollout.response_ids, r.rollout.prefix_len, 0.0, r.rollout.logprobs, index[r.item.id],
                reward=r.reward, spans=tuple(tuple(sp) for sp in r.rollout.spans), first_error=r.oracle_first_error, has_checker=r.steps_valid is not None,
                question=r.item.question, gold=r.item.gold, item_id=r.item.id,
            )
            for r in records if r.trainable
        ]

    # ---- the learner step ------------------------------------------------------------------------
    def prepare_update(self, learner, cfg, seqs: list, parent_dir=None) -> tuple[list, dict[str, float]]:
        """Values at the boundaries (critic before its update), credits, the critic's update on the
        same batch; the sequences with their token credits and the critic/* metrics."""
        import torch

        from srpo_core import critic as C
        from srpo_core.learner import last_hidden_states

        opts = self.options(cfg.method)
        if not all(is_credit_sequence(s) for s in seqs):
            raise TypeError("srppo's learner step needs the sequences of SRPPO.train_sequences (CreditSequence)")
        bad = [i for i, s in enumerate(seqs) if s.prefix_len != 0]
        if bad:
            raise ValueError(f"srppo trains whole rollouts; sequences {bad[:5]} have a reset prefix")
        metrics: dict[str, float] = {}
        k = math.inf if opts.critic == "reachability" else opts.k
        feats = p1 = None
        if opts.critic == "learned":
            feats = last_hidden_states(learner, seqs, cfg.train.micro_batch_sequences)
            critic = getattr(learner, "critic", None)
            settings = C.CriticSettings(opts.critic_hidden, opts.critic_lr, opts.critic_steps, cfg.train.seed)
            if critic is None:
                critic = C.CreditCritic.load(Path(parent_dir) / CRITIC_DIR, settings) if parent_dir is not None else C.CreditCritic(feats[0].shape[-1] if feats else 1, settings)
                learner.critic = critic
            p1 = critic.predict(feats)  # [T_i + 1] each, before the head sees this batch
            boundary_values = [C.pass_at_k(p, k) for p in p1]
        else:
            boundary_values = self._exact_values(learner, cfg, seqs, opts, k)
        ends_all, unit_all = [], []
        for s, v in zip(seqs, boundary_values):
            ends = C.thought_ends(s.spans, len(s.response_ids))
            if not s.response_ids:  # nothing generated: nothing to credit
                units = torch.zeros(0, dtype=torch.float64)
            elif opts.granularity == "token":
                units = C.unit_credits(v.double(), s.reward, opts.lam)  # [T]
            else:
                bv = v.double()[torch.tensor([0, *ends])] if opts.critic == "learned" else v.double()  # [H + 1]
                units = C.unit_credits(bv, s.reward, opts.lam)  # [H]
            ends_all.append(ends)
            unit_all.append(units)
        flat = torch.cat(unit_all) if unit_all else torch.zeros(0, dtype=torch.float64)
        shift = float(flat.mean()) if opts.normalize == "whiten" and flat.numel() else 0.0
        scale = float(flat.std(unbiased=False)) if opts.normalize != "none" and flat.numel() > 1 else 1.0
        scale = scale if scale > 1e-12 else 1.0
        out, record_rows, thought_cr = [], [], []
        for s, v, ends, units in zip(seqs, boundary_values, ends_all, unit_all):
            units = (units - shift) / scale
            if opts.granularity == "token":
                tok, per = units, (C.per_thought(units, ends) if units.numel() else units)
            else:
                tok, per = (C.token_credits(units, ends) if units.numel() else units), units
            values = v.double()
            pk = [float(values[0]), *([float(values[e]) for e in ends] if opts.critic == "learned" else [float(x) for x in values[1:]])]
            thought_cr.append([float(x) for x in per])
            record_rows.append({"thought_credits": thought_cr[-1], "boundary_pk": pk, "advantage": float(per.sum()) if per.numel() else 0.0})
            n = len(s.response_ids)
            out.append(dataclasses.replace(s, token_advantages=tuple(float(x) * n for x in tok), loss=opts.loss))
        if opts.lam == 0.0 and opts.normalize == "none":  # the sum property: credits sum to R - P_k(prompt)
            metrics["critic/credit_sum_error_max"] = max((abs(r["advantage"] - (s.reward - r["boundary_pk"][0])) for s, r in zip(seqs, record_rows)), default=0.0)
        prompt_p1 = [float(p[0]) for p in p1] if p1 is not None else [float(v[0]) for v in boundary_values]
        all_p1 = [p.tolist() for p in p1] if p1 is not None else [v.tolist() for v in boundary_values]
        metrics.update(C.critic_metrics(prompt_p1, all_p1, [s.reward for s in seqs], thought_cr, [s.first_error for s in seqs], any(s.has_checker for s in seqs)))
        metrics["critic/pk_prompt_mean"] = sum(r["boundary_pk"][0] for r in record_rows) / len(record_rows) if record_rows else float("nan")
        if feats is not None:
            before, after = learner.critic.fit(feats, [min(max(s.reward, 0.0), 1.0) for s in seqs])
            metrics["critic/loss"], metrics["critic/loss_after"] = before, after
            learner.critic.rows = record_rows
        else:
            learner.critic_rows = record_rows
        return out, metrics

    def _exact_values(self, learner, cfg, seqs: list, opts: SRPPOOptions, k: float) -> list:
        """P_k at thought boundaries from the step checker's state graph (critic.py module doc)."""
        import torch

        from srpo_core import critic as C

        missing = [s.item_id for s in seqs if not s.has_checker]
        if missing:
            raise ValueError(f"method.options.critic={opts.critic!r} needs a task with a step checker; items {missing[:3]} of task {cfg.data.task!r} have none")
        node_values: dict[str, list[float]] = {}
        if opts.critic == "reachability":
            for s in seqs:
                if s.item_id not in node_values:
                    node_values[s.item_id] = [1.0 if r else 0.0 for r in C.chain_reachable(len(gold_thoughts(cfg, s)))]
        else:
            for s in seqs:
                if s.item_id not in node_values:
                    p = C.chain_success_probability(gold_log_q(learner, cfg, s))
                    node_values[s.item_id] = [float(x) for x in C.pass_at_k(torch.tensor(p, dtype=torch.float64), k)]
        return [torch.tensor(C.exact_boundary_values(s.first_error, len(C.thought_ends(s.spans, len(s.response_ids))), node_values[s.item_id]), dtype=torch.float64) for s in seqs]

    def save_update_state(self, learner, out_dir) -> None:
        from srpo_core import critic as C
        from srpo_core.fsdp import world

        if world()[0] != 0:
            return
        directory = Path(out_dir) / CRITIC_DIR
        critic = getattr(learner, "critic", None)
        if critic is not None:
            critic.save(directory)
            C.write_rows(directory, critic.rows)
        else:
            C.write_rows(directory, getattr(learner, "critic_rows", []))

    def finish_records(self, records: list[R.Record], learner=None, checkpoint_dir=None) -> None:
        from srpo_core import critic as C

        if learner is not None:
            critic = getattr(learner, "critic", None)
            rows = critic.rows if critic is not None else getattr(learner, "critic_rows", [])
        else:
            rows = C.read_rows(Path(checkpoint_dir) / CRITIC_DIR)
        train = [r for r in records if r.trainable]
        if len(rows) != len(train):
            raise ValueError(f"srppo: {len(rows)} credit rows for {len(train)} trained records")
        for rec, row in zip(train, rows):
            rec.thought_credits, rec.boundary_pk, rec.advantage = row["thought_credits"], row["boundary_pk"], row["advantage"]


def gold_thoughts(cfg, s) -> list[str]:
    """The gold chain of a synthetic-task item, any chain spec (the step checker's graph); other
    tasks have none."""
    from srpo_core.tasks import TASKS, SyntheticTask
    from srpo_core.tasks.synthetic import Problem, solution_thoughts

    synthetic = sorted(name for name, make in TASKS.items() if make is SyntheticTask or getattr(make, "__self__", None) is SyntheticTask)
    if cfg.data.task not in synthetic:
        raise ValueError(f"method.options.critic needs the gold chain of the step checker's graph; task {cfg.data.task!r} has none (the synthetic tasks have: {', '.join(synthetic)})")

    return solution_thoughts(Problem(s.item_id, s.question, s.gold))


def gold_log_q(learner, cfg, s) -> list[float]:
    """log q_i: the policy's log-probability (rollout temperature) of gold thought i given the
    prompt and gold thoughts < i, teacher-forced; each thought tokenized on its own (canonical
    tokenization: a lower bound on the string's probability)."""
    import torch

    from srpo_core.algos import token_logprobs

    thoughts = gold_thoughts(cfg, s)
    pieces = [learner.tokenizer.encode(t, add_special_tokens=False) for t in thoughts]
    ids = list(s.prompt_ids) + [t for p in pieces for t in p]
    with torch.no_grad():
        logits = learner.model(input_ids=torch.tensor([ids], device=learner.device), use_cache=False).logits[:, :-1]  # [1, L-1, V]
        lp = token_logprobs(logits, torch.tensor([ids[1:]], device=learner.device), cfg.rollout.temperature)[0].double().cpu()  # [L-1]
    out, pos = [], len(s.prompt_ids) - 1
    for p in pieces:
        out.append(float(lp[pos : pos + len(p)].sum()))
        pos += len(p)
    return out


register(SRPPO())

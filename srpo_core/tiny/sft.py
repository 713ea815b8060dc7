"""Supervised bootstrap of the tiny model: rollout traces and localization answers.

Two tasks share one model:

* rollout: ``rollout_prompt(q)`` -> the correct thoughts of ``solution_thoughts`` -> eos;
* localization: ``localization_prompt(q, chain)`` -> ``\\boxed{k}`` -> eos, where ``k`` is the oracle's
  first wrong thought (``synthetic.first_error``) of a wrong chain.

Losses are on response tokens only. Wrong chains for localization come from the policy itself (its
own temperature-1 samples that miss the answer, labelled by the oracle: on-policy data) and from
synthetic corruptions: arithmetic slips (``synthetic.corrupt``: one result is wrong, later steps
follow it) and copy slips (``copy_corrupt``: one step reads the wrong operand, operator or previous
value, later steps follow it). The tiny policy's own errors are almost all copy slips (the operand
of a neighbouring operation), which a 2-layer model cannot check locally; what it learns from the
on-policy data is where it tends to slip, given the question. Everything here is deterministic
given the seeds.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import torch

from srpo_core import templates
from srpo_core.tasks import synthetic
from srpo_core.tasks.synthetic import ADD_SUB, MOD, MUL, THOUGHT_END, Problem

IGNORE = -100


# ----------------------------------------------------------------------------- chains


def split_thoughts(text: str) -> list[str]:
    """Response text -> thoughts, each ending with ``</thought>`` (a trailing fragment is kept)."""
    parts = text.split(THOUGHT_END)
    thoughts = [p + THOUGHT_END for p in parts[:-1]]
    if parts[-1].strip():
        thoughts.append(parts[-1])
    return thoughts


def copy_corrupt(problem: Problem, rng: random.Random) -> tuple[list[str], int]:
    """A wrong chain whose first error is a copying slip at one step: the wrong operand, the wrong
    operator, or a left value that is not the previous result; the step's arithmetic is right and
    later steps follow it. Returns (thoughts, first_error)."""
    ops = problem.ops
    k = rng.randint(1, len(ops))
    value = problem.start
    thoughts = []
    for i, (op, b) in enumerate(ops, 1):
        a = value
        if i == k:
            kind = rng.randrange(3)
            if kind == 0:  # wrong operand: often a neighbouring step's operand, else any
                others = [bb for j, (oo, bb) in enumerate(ops) if j != i - 1 and bb != b]
                choices = MUL if op == "*" else ADD_SUB
                pool = [bb for bb in others if bb in choices] if rng.random() < 0.5 else []
                b = rng.choice(pool) if pool else rng.choice([c for c in choices if c != b])
            elif kind == 1:  # wrong operator (operand kept when it is valid for it)
                new_op = rng.choice([o for o in "+-*" if o != op])
                if new_op == "*" and b not in MUL:
                    b = rng.choice(MUL)
                op = new_op
            else:  # the previous result mis-copied
                a = (a + rng.randint(1, MOD - 1)) % MOD
        new = synthetic.apply(op, a, b)
        thoughts.append(f"{a}{op}{b}={new}{THOUGHT_END}")
        value = new
    thoughts.append(f"\\boxed{{{value}}}{THOUGHT_END}")
    fe = synthetic.first_error(problem, thoughts)
    return thoughts, fe if fe is not None else k


def first_confused_step(problem: Problem, confused: dict[tuple[int, str, int], int]) -> int | None:
    """1-based index of the first step of the correct chain that computes a confused fact (a, op, b)."""
    value = problem.start
    for k, (op, b) in enumerate(problem.ops, 1):
        if (value, op, b) in confused:
            return k
        value = synthetic.apply(op, value, b)
    return None


def has_confused_step(problem: Problem, confused: dict[tuple[int, str, int], int]) -> bool:
    return first_confused_step(problem, confused) is not None


def noisy_thoughts(problem: Problem, confused: dict[tuple[int, str, int], int], noise: float, rng: random.Random) -> list[str]:
    """A trace with label noise: a step computing a confused fact writes its confused result with
    probability `noise`; later steps follow the value written (as the policy's own slips do)."""
    value = problem.start
    thoughts = []
    for op, b in problem.ops:
        new = synthetic.apply(op, value, b)
        wrong = confused.get((value, op, b))
        if wrong is not None and rng.random() < noise:
            new = wrong
        thoughts.append(f"{value}{op}{b}={new}{THOUGHT_END}")
        value = new
    thoughts.append(f"\\boxed{{{value}}}{THOUGHT_END}")
    return thoughts


def oracle_label(problem: Problem, thoughts: list[str]) -> int | None:
    """The localization target for a chain: the first error, clipped into 1..len(thoughts)."""
    fe = synthetic.first_error(problem, thoughts)
    if fe is None or not thoughts:
        return None
    return min(fe, len(thoughts))


# ----------------------------------------------------------------------------- encoding


@dataclass(frozen=True)
class Example:
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]


class Encoder:
    def __init__(self, tokenizer, rollout_template: str, localization_template: str):
        self.tok = tokenizer
        self.rollout_template = rollout_template
        self.localization_template = localization_template
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id

    def ids(self, text: str) -> tuple[int, ...]:
        return tuple(self.tok(text, add_special_tokens=False)["input_ids"])

    def rollout_prompt(self, problem: Problem) -> str:
        return templates.rollout_prompt(self.rollout_template, problem.question)

    def localization_prompt(self, problem: Problem, thoughts: list[str]) -> str:
        return templates.localization_prompt(self.localization_template, problem.question, thoughts)

    def rollout(self, problem: Problem) -> Example:
        response = "".join(synthetic.solution_thoughts(problem))
        return Example(self.ids(self.rollout_prompt(problem)), self.ids(response) + (self.eos,))

    def response(self, problem: Problem, text: str, finished: bool = True) -> Example:
        """A rollout example with a given response (the policy's own sample, for anchoring)."""
        return Example(self.ids(self.rollout_prompt(problem)), self.ids(text) + ((self.eos,) if finished else ()))

    def localization(self, problem: Problem, thoughts: list[str], label: int) -> Example:
        return Example(self.ids(self.localization_prompt(problem, thoughts)), self.ids(f"\\boxed{{{label}}}") + (self.eos,))

    def collate(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        """Right-padded batch with labels on response tokens only."""
        length = max(len(e.prompt_ids) + len(e.response_ids) for e in examples)
        ids = torch.full((len(examples), length), self.pad, dtype=torch.long)
        labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(examples), length), dtype=torch.long)
        for i, e in enumerate(examples):
            seq = e.prompt_ids + e.response_ids
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
            labels[i, len(e.prompt_ids) : len(seq)] = torch.tensor(e.response_ids)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def response_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)).float(), batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE
    )


# ----------------------------------------------------------------------------- generation


@torch.no_grad()
def generate(model, enc: Encoder, prompts: list[str], max_new_tokens: int, sample: bool = False, batch_size: int = 256,
             return_finished: bool = False):
    """Batched left-padded generation of the decoded responses (special tokens dropped); with
    `return_finished`, also whether each response ended with eos (rather than the token cap)."""
    model.eval()
    tok = enc.tok
    texts: list[str] = []
    finished: list[bool] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        inputs = tok(chunk, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        kwargs = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if sample else dict(do_sample=False)
        gen = model.generate(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            max_new_tokens=max_new_tokens,
            eos_token_id=enc.eos,
            pad_token_id=enc.pad,
            **kwargs,
        )
        new = gen[:, inputs["input_ids"].shape[1] :]
        texts.extend(tok.batch_decode(new, skip_special_tokens=True))
        finished.extend((new == enc.eos).any(dim=1).tolist())
    model.train()
    return (texts, finished) if return_finished else texts


def rollout_max_new_tokens(max_ops: int) -> int:
    # a thought is at most 6 tokens ("7*3=1</thought>"), the answer thought 4, then eos
    return 6 * max_ops + 8


@dataclass
class RolloutEval:
    pass_at_1: float
    responses: list[str]
    rewards: list[float]


def eval_rollouts(model, enc: Encoder, problems: list[Problem], max_ops: int, sample: bool = False) -> RolloutEval:
    prompts = [enc.rollout_prompt(p) for p in problems]
    responses = generate(model, enc, prompts, rollout_max_new_tokens(max_ops), sample=sample)
    rewards = [synthetic.reward(p, r) for p, r in zip(problems, responses)]
    return RolloutEval(sum(rewards) / max(len(rewards), 1), responses, rewards)


def wrong_chains(problems: list[Problem], responses: list[str], rewards: list[float]) -> list[tuple[Problem, list[str], int]]:
    """(problem, thoughts, oracle label) for the responses with reward 0."""
    out = []
    for p, r, w in zip(problems, responses, rewards):
        if w > 0:
            continue
        thoughts = split_thoughts(r)
        label = oracle_label(p, thoughts)
        if label is not None:
            out.append((p, thoughts, label))
    return out


@dataclass
class LocalizationEval:
    n: int
    exact: float
    within1: float
    chance_exact: float
    chance_within1: float
    answered: float  # fraction of answers that parse as an integer
    best_constant: float  # exact agreement of the best fixed answer on these chains (a prior-only baseline)


def eval_localization(model, enc: Encoder, chains: list[tuple[Problem, list[str], int]]) -> LocalizationEval:
    if not chains:
        return LocalizationEval(0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    prompts = [enc.localization_prompt(p, t) for p, t, _ in chains]
    answers = generate(model, enc, prompts, max_new_tokens=6)
    exact = within1 = answered = 0
    chance_exact = chance_within1 = 0.0
    for (_, thoughts, label), text in zip(chains, answers):
        n = len(thoughts)
        chance_exact += 1.0 / n
        chance_within1 += sum(1 for k in range(1, n + 1) if abs(k - label) <= 1) / n
        got = synthetic.extract_answer(text)
        try:
            k = int(got) if got is not None else None
        except ValueError:
            k = None
        if k is None:
            continue
        answered += 1
        exact += k == label
        within1 += abs(k - label) <= 1
    m = len(chains)
    best = Counter(label for _, _, label in chains).most_common(1)[0][1]
    return LocalizationEval(m, exact / m, within1 / m, chance_exact / m, chance_within1 / m, answered / m, best / m)


def error_histogram(chains: list[tuple[Problem, list[str], int]]) -> dict[str, int]:
    """first_error position -> count, with the answer thought reported as 'answer'."""
    counts: Counter[str] = Counter()
    for p, _thoughts, label in chains:
        n_ops = len(p.ops)
        counts["answer" if label > n_ops else str(label)] += 1
    return dict(sorted(counts.items(), key=lambda kv: (kv[0] == "answer", kv[0].zfill(3))))

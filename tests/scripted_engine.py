"""A scripted RolloutEngine for testing algorithm 2's bookkeeping exactly: each prompt consumes
a queue of outcomes ("ok"; k for a chain whose k-th thought is the first wrong one; ("cut", m) for
a chain of the first m correct thoughts that stops there, without an answer). Suffixes from a reset
continue the correct chain, or, while the queue "<prompt id>/suffix" has entries, "ok" (correct) or
"bad" (the correct steps, then a wrong answer) in turn. Chains
are real synthetic-task token sequences from the tiny tokenizer."""

from __future__ import annotations

import random

from srpo_core.engine.base import Completion, Rollout, RolloutEngine, TokenScores
from srpo_core.tasks import synthetic
from srpo_core.tiny.tokenizer import build_tokenizer


def wrong_chain(problem: synthetic.Problem, k: int, rng: random.Random) -> list[str]:
    ops, value, thoughts = problem.ops, problem.start, []
    for i, (op, b) in enumerate(ops, 1):
        new = synthetic.apply(op, value, b)
        if i == k:
            new = (new + 1) % 10
        thoughts.append(f"{value}{op}{b}={new}</thought>")
        value = new
    if value == int(problem.answer):  # keep the chain wrong by reward
        value = (value + 1) % 10
    return thoughts + [f"\\boxed{{{value}}}</thought>"]


class ScriptedEngine(RolloutEngine):
    def __init__(self, problems: dict[str, synthetic.Problem], script: dict[str, list], localization_answer: str = "\\boxed{2}"):
        self.tok = build_tokenizer()
        self.by_prompt = {tuple(self.encode(f"Q:{p.question}|")): p for p in problems.values()}
        self.script = {k: list(v) for k, v in script.items()}
        self.calls: list[list[tuple[int, int]]] = []  # per generate call: (prompt len + prefix len, n)
        self.localization_answer = localization_answer
        self.rng = random.Random(0)

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids):
        return self.tok.decode(ids)

    def _rollout(self, prompt_ids, prefix_ids, prefix_spans, thoughts) -> Rollout:
        response, spans = list(prefix_ids), list(prefix_spans)
        for t in thoughts:
            ids = self.encode(t)
            spans.append((len(response), len(response) + len(ids)))
            response += ids
        n_new = len(response) - len(prefix_ids)
        return Rollout(list(prompt_ids), response, len(prefix_ids), spans, [-0.1] * n_new, [self.decode(response[a:b]) for a, b in spans], self.decode(response), "answer")

    def generate_thoughts(self, requests, limits, sampling):
        self.calls.append([(len(r.prompt_ids) + len(r.prefix_ids), r.n) for r in requests])
        out = []
        for req in requests:
            problem = self.by_prompt[tuple(req.prompt_ids)]
            gold = synthetic.solution_thoughts(problem)
            chains = []
            for _ in range(req.n):
                if req.prefix_ids:  # suffixes: continue the correct chain after the prefix, or end it wrong
                    rest = gold[len(req.prefix_spans) :]
                    queue = self.script.get(problem.id + "/suffix")
                    if queue and queue.pop(0) == "bad":
                        rest = rest[:-1] + [f"\\boxed{{{(int(problem.answer) + 1) % 10}}}</thought>"]
                    chains.append(self._rollout(req.prompt_ids, req.prefix_ids, req.prefix_spans, rest))
                    continue
                outcome = self.script[problem.id].pop(0) if self.script[problem.id] else "ok"
                if isinstance(outcome, tuple):
                    thoughts = gold[: outcome[1]]
                else:
                    thoughts = gold if outcome == "ok" else wrong_chain(problem, outcome, self.rng)
                chains.append(self._rollout(req.prompt_ids, (), (), thoughts))
            out.append(chains)
        return out

    def complete(self, prompts, max_tokens, sampling):
        ids = self.encode(self.localization_answer)
        return [Completion(ids, self.localization_answer, [0.0] * len(ids), "eos") for _ in prompts]

    def teacher_force(self, prompts, responses, temperature=1.0):
        return [TokenScores([0.0] * len(r), list(r)) for r in responses]

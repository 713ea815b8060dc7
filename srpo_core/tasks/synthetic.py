"""Chained arithmetic mod 10: a multi-step task whose every thought is checkable.

A question is a start digit followed by 4-8 operations, e.g. `7*3-2-8+1`. A correct chain has
one operation per thought and a final answer thought:

    7*3=1</thought>1-2=9</thought>9-8=1</thought>1+1=2</thought>\\boxed{2}</thought>

Operations are `+d` and `-d` with d in 1..9 and `*d` with d in {3, 7, 9} (units of Z/10, so no
step collapses the state). The reward is the final answer only (outcome reward, as in the paper).
The step checker defines thought k as wrong when it is not exactly the k-th correct step given
that thoughts 1..k-1 were right; the first wrong thought is the oracle reset index (CPI-CARO).
Because `*` by different units can agree on a wrong input (e.g. 5*7 = 5*9 mod 10), a chain can
hold a wrong step and still reach the right answer: such a rollout gets reward 1, and its record
carries `steps_valid: false`. The oracle only ever localizes seeds, which are wrong by reward and
so always hold a wrong thought.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

MOD = 10
ADD_SUB = tuple(range(1, 10))
MUL = (3, 7, 9)
TEST_POOL = 2000
THOUGHT_END = "</thought>"
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


@dataclass(frozen=True)
class Problem:
    id: str
    question: str  # e.g. "7*3-2-8+1"
    answer: str  # final value as a digit string

    @property
    def start(self) -> int:
        return int(self.question[0])

    @property
    def ops(self) -> list[tuple[str, int]]:
        q = self.question[1:]
        return [(q[i], int(q[i + 1])) for i in range(0, len(q), 2)]


def apply(op: str, a: int, b: int) -> int:
    return {"+": a + b, "-": a - b, "*": a * b}[op] % MOD


def make_problem(rng: random.Random, min_ops: int = 4, max_ops: int = 8, pid: str = "") -> Problem:
    value = rng.randint(1, 9)
    text = str(value)
    for _ in range(rng.randint(min_ops, max_ops)):
        op = rng.choice("+-*")
        b = rng.choice(MUL if op == "*" else ADD_SUB)
        text += f"{op}{b}"
        value = apply(op, value, b)
    return Problem(id=pid, question=text, answer=str(value))


def make_split(split: str, n: int, seed: int = 0, min_ops: int = 4, max_ops: int = 8) -> list[Problem]:
    """Seeded, disjoint train/test splits: test questions never appear in train."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if split == "test" and n > TEST_POOL:
        raise ValueError(f"the test split holds {TEST_POOL} problems, {n} asked")
    rng = random.Random(f"synthetic-{seed}")
    test: list[Problem] = []
    seen: set[str] = set()
    out: list[Problem] = []
    # the test pool is drawn first from the shared stream so both splits stay disjoint and stable
    while len(test) < TEST_POOL:
        p = make_problem(rng, min_ops, max_ops)
        if p.question not in seen:
            seen.add(p.question)
            test.append(Problem(f"test-{len(test)}", p.question, p.answer))
    if split == "test":
        return test[:n]
    while len(out) < n:
        p = make_problem(rng, min_ops, max_ops)
        if p.question not in seen:
            seen.add(p.question)
            out.append(Problem(f"train-{len(out)}", p.question, p.answer))
    return out


def solution_thoughts(problem: Problem) -> list[str]:
    """The correct chain, one operation per thought, then the answer thought."""
    value = problem.start
    thoughts = []
    for op, b in problem.ops:
        new = apply(op, value, b)
        thoughts.append(f"{value}{op}{b}={new}{THOUGHT_END}")
        value = new
    thoughts.append(f"\\boxed{{{value}}}{THOUGHT_END}")
    return thoughts


def extract_answer(text: str) -> str | None:
    found = _BOXED.findall(text)
    return found[-1].strip() if found else None


def reward(problem: Problem, response_text: str) -> float:
    return 1.0 if extract_answer(response_text) == problem.answer else 0.0


def first_error(problem: Problem, thoughts: list[str]) -> int | None:
    """1-based index of the first thought that differs from the correct chain, None if none.

    A chain that stops early is wrong at the thought after its last one (the missing step)."""
    gold = solution_thoughts(problem)
    for k, (got, want) in enumerate(zip(thoughts, gold), 1):
        if got.strip() != want:
            return k
    if len(thoughts) < len(gold):
        return len(thoughts) + 1 if thoughts else 1
    return len(gold) + 1 if len(thoughts) > len(gold) else None


def corrupt(problem: Problem, rng: random.Random) -> tuple[list[str], int]:
    """A wrong chain with a known first error: one step's result is wrong, later steps follow it
    correctly (the way a policy's error propagates). Returns (thoughts, first_error)."""
    ops = problem.ops
    k = rng.randint(1, len(ops))
    value = problem.start
    thoughts = []
    for i, (op, b) in enumerate(ops, 1):
        new = apply(op, value, b)
        if i == k:
            new = (new + rng.randint(1, MOD - 1)) % MOD
        thoughts.append(f"{value}{op}{b}={new}{THOUGHT_END}")
        value = new
    thoughts.append(f"\\boxed{{{value}}}{THOUGHT_END}")
    return thoughts, k

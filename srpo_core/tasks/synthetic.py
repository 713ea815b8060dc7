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

`ChainSpec` sets what questions look like: the chain length range, the operation mix, and an
error-prone operation placed a set number of times per chain (the regime of theorem 1 where
improvable states are rare: a long chain with one or two steps a policy tends to get wrong among
many it gets right). The default spec draws exactly the items it always drew (same seed, same
questions); `LONG_CHAINS` is the `synthetic_long` task of the fidelity preset.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
import re
from dataclasses import dataclass

MOD = 10
ADD_SUB = tuple(range(1, 10))
MUL = (3, 7, 9)
TEST_POOL = 2000
THOUGHT_END = "</thought>"
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
OPS = "+-*"
MAX_OPS = 64  # questions longer than this would not fit the tiny model's context with their chain


@dataclass(frozen=True)
class ChainSpec:
    """What a question looks like. Invalid values raise ValueError naming the field.

    min_ops..max_ops: the number of operations, uniform. op_weights: relative weights of `+ - *`.
    error_prone_op: when set ("+", "-" or "*"), every chain holds that operation at exactly
    error_prone_steps[0]..error_prone_steps[1] positions (uniform count, capped at the chain
    length, uniform positions), and its other positions draw from the remaining operations by
    their weights (so the count is exact)."""

    min_ops: int = 4
    max_ops: int = 8
    op_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    error_prone_op: str = ""
    error_prone_steps: tuple[int, int] = (0, 0)

    def __post_init__(self):
        # YAML gives lists; the spec is hashable and compares equal however it was written
        object.__setattr__(self, "op_weights", tuple(self.op_weights))
        object.__setattr__(self, "error_prone_steps", tuple(self.error_prone_steps))
        _check(isinstance(self.min_ops, int) and not isinstance(self.min_ops, bool) and self.min_ops >= 1, "min_ops", f"an integer >= 1, got {self.min_ops!r}")
        _check(isinstance(self.max_ops, int) and not isinstance(self.max_ops, bool) and self.min_ops <= self.max_ops <= MAX_OPS, "max_ops",
               f"an integer in [min_ops={self.min_ops}, {MAX_OPS}], got {self.max_ops!r}")
        _check(len(self.op_weights) == len(OPS), "op_weights", f"one weight per operation ({', '.join(OPS)}), got {list(self.op_weights)}")
        _check(all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0 for w in self.op_weights), "op_weights",
               f"finite numbers >= 0, got {list(self.op_weights)}")
        _check(isinstance(self.error_prone_op, str) and self.error_prone_op in ("", *OPS), "error_prone_op", f"one of {', '.join(OPS)} or empty, got {self.error_prone_op!r}")
        _check(len(self.error_prone_steps) == 2 and all(isinstance(k, int) and not isinstance(k, bool) for k in self.error_prone_steps), "error_prone_steps",
               f"[min, max] integers, got {list(self.error_prone_steps)}")
        lo, hi = self.error_prone_steps
        _check(0 <= lo <= hi, "error_prone_steps", f"need 0 <= min <= max, got [{lo}, {hi}]")
        if not self.error_prone_op:
            _check((lo, hi) == (0, 0), "error_prone_steps", "set only together with error_prone_op")
            _check(sum(self.op_weights) > 0, "op_weights", "at least one weight must be > 0")
            return
        _check(hi >= 1, "error_prone_steps", f"error_prone_op {self.error_prone_op!r} needs max >= 1, got [{lo}, {hi}]")
        _check(lo <= self.min_ops, "error_prone_steps", f"min {lo} exceeds min_ops {self.min_ops}: the shortest chains cannot hold it")
        others = sum(w for op, w in zip(OPS, self.op_weights) if op != self.error_prone_op)
        _check(others > 0 or lo >= self.max_ops, "op_weights", f"the operations other than {self.error_prone_op!r} all have weight 0")

    @classmethod
    def from_mapping(cls, data: dict) -> ChainSpec:
        """A spec from a config mapping (YAML); unknown keys and bad values raise ValueError('key: reason')."""
        if not isinstance(data, dict):
            raise TypeError(f"expected a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            _check(key in known, str(key), f"unknown key (known: {', '.join(sorted(known))})")
        for key in ("op_weights", "error_prone_steps"):
            _check(isinstance(data.get(key, ()), (list, tuple)), key, f"expected a list, got {data.get(key)!r}")
        return cls(**data)

    @property
    def uniform_mix(self) -> bool:
        return not self.error_prone_op and len(set(self.op_weights)) == 1


def _check(cond: bool, key: str, reason: str) -> None:
    if not cond:
        raise ValueError(f"{key}: {reason}")


DEFAULT_CHAINS = ChainSpec()
# the fidelity regime: long chains holding one or two `*` steps among + and - steps
LONG_CHAINS = ChainSpec(min_ops=10, max_ops=16, error_prone_op="*", error_prone_steps=(1, 2))


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


def _operations(rng: random.Random, n_ops: int, spec: ChainSpec) -> list[str]:
    """The operation kinds of one chain for a non-uniform spec."""
    if not spec.error_prone_op:
        return rng.choices(OPS, weights=spec.op_weights, k=n_ops)
    lo, hi = spec.error_prone_steps
    marked = set(rng.sample(range(n_ops), min(rng.randint(lo, hi), n_ops)))
    others = [(op, w) for op, w in zip(OPS, spec.op_weights) if op != spec.error_prone_op]
    fill = iter(rng.choices([op for op, _ in others], weights=[w for _, w in others], k=n_ops - len(marked)) if len(marked) < n_ops else [])
    return [spec.error_prone_op if i in marked else next(fill) for i in range(n_ops)]


def make_problem(rng: random.Random, spec: ChainSpec = DEFAULT_CHAINS, pid: str = "") -> Problem:
    value = rng.randint(1, 9)
    text = str(value)
    if spec.uniform_mix:  # operation and operand interleaved, as the default task always drew them
        for _ in range(rng.randint(spec.min_ops, spec.max_ops)):
            op = rng.choice(OPS)
            b = rng.choice(MUL if op == "*" else ADD_SUB)
            text += f"{op}{b}"
            value = apply(op, value, b)
        return Problem(id=pid, question=text, answer=str(value))
    for op in _operations(rng, rng.randint(spec.min_ops, spec.max_ops), spec):
        b = rng.choice(MUL if op == "*" else ADD_SUB)
        text += f"{op}{b}"
        value = apply(op, value, b)
    return Problem(id=pid, question=text, answer=str(value))


def make_split(split: str, n: int, seed: int = 0, spec: ChainSpec = DEFAULT_CHAINS) -> list[Problem]:
    """Seeded, disjoint train/test splits: test questions never appear in train.

    The test split is the first `TEST_POOL` distinct questions of the seeded stream, the train split
    the next ones; a spec whose questions are too few to fill the pool fails instead of looping.
    Memoized per process (a pure function; every training and evaluation asks again)."""
    return list(_make_split(split, n, seed, spec))


@functools.lru_cache(maxsize=64)
def _make_split(split: str, n: int, seed: int, spec: ChainSpec) -> tuple[Problem, ...]:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if split == "test" and n > TEST_POOL:
        raise ValueError(f"the test split holds {TEST_POOL} problems, {n} asked")
    rng = random.Random(f"synthetic-{seed}")
    test: list[Problem] = []
    seen: set[str] = set()
    out: list[Problem] = []
    # the test pool is drawn first from the shared stream so both splits stay disjoint and stable
    attempts = 0
    while len(test) < TEST_POOL:
        attempts += 1
        if attempts > 50 * TEST_POOL:
            raise ValueError(f"the chain spec {spec} yields too few distinct questions for a {TEST_POOL}-item test pool")
        p = make_problem(rng, spec)
        if p.question not in seen:
            seen.add(p.question)
            test.append(Problem(f"test-{len(test)}", p.question, p.answer))
    if split == "test":
        return tuple(test[:n])
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 10 * TEST_POOL:
            raise ValueError(f"the chain spec {spec} yields fewer than {n} distinct train questions")
        p = make_problem(rng, spec)
        if p.question not in seen:
            seen.add(p.question)
            out.append(Problem(f"train-{len(out)}", p.question, p.answer))
    return tuple(out)


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

"""Scoring of a response against an :class:`Item`: a dict from answer type to verifier."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from srpo_core.benchmarks.items import CHOICE, CODE, FILLING, MATH, YES_NO, Item
from srpo_core.verifiers.choice import verify_choice, verify_filling, verify_yes_no
from srpo_core.verifiers.code import TestCase, split_test_cases, verify_code
from srpo_core.verifiers.math import DEFAULT_TIMEOUT_S, verify_math
from srpo_core.verifiers.sandbox import SandboxLimits
from srpo_core.verifiers.verdict import Verdict

CODE_SPLITS = ("train", "eval", "all")


@dataclass(frozen=True)
class ScoreOptions:
    """math_timeout_s: wall-clock limit of one math-verify check.
    math_fallback: also read an unboxed math answer ("answer is" / "####" / last number). Off by
      default: the paper's rule, the last ``\\boxed{}`` or reward 0.
    code_split: which test cases score code: "train" (training reward), "eval" (held-out half,
      for evaluation) or "all".
    test_split_seed: seed of the per-problem 50/50 split (REFERENCE.md: 42).
    sandbox: limits of each code test run.
    code_max_timeouts: stop running a program's cases after this many timeouts (the rest count
      as failed); None runs them all (the exact fraction, up to cases * 10 s per program).
    """

    math_timeout_s: float = DEFAULT_TIMEOUT_S
    math_fallback: bool = False
    code_split: str = "eval"
    test_split_seed: int = 42
    sandbox: SandboxLimits = SandboxLimits()
    code_max_timeouts: int | None = None

    def __post_init__(self) -> None:
        if self.code_split not in CODE_SPLITS:
            raise ValueError(f"code_split must be one of {CODE_SPLITS}, got {self.code_split!r}")


def tests_for(item: Item, split: str, seed: int = 42) -> tuple[TestCase, ...]:
    """The test cases of ``item`` that a given split scores."""
    if split == "all":
        return item.tests
    train, held_out = split_test_cases(item.tests, seed)
    return train if split == "train" else held_out


def _score_math(response: str, item: Item, opts: ScoreOptions) -> Verdict:
    return verify_math(response, item.gold, opts.math_timeout_s, fallback=opts.math_fallback)


def _score_choice(response: str, item: Item, opts: ScoreOptions) -> Verdict:
    return verify_choice(response, item.gold, item.labels)


def _score_yes_no(response: str, item: Item, opts: ScoreOptions) -> Verdict:
    return verify_yes_no(response, item.gold)


def _score_filling(response: str, item: Item, opts: ScoreOptions) -> Verdict:
    return verify_filling(response, item.gold)


def _score_code(response: str, item: Item, opts: ScoreOptions) -> Verdict:
    tests = tests_for(item, opts.code_split, opts.test_split_seed)
    return verify_code(response, tests, item.meta.get("func_name"), opts.sandbox, opts.code_max_timeouts)


SCORERS: dict[str, Callable[[str, Item, ScoreOptions], Verdict]] = {
    MATH: _score_math,
    CHOICE: _score_choice,
    YES_NO: _score_yes_no,
    FILLING: _score_filling,
    CODE: _score_code,
}


def score_item(response: str, item: Item, options: ScoreOptions = ScoreOptions()) -> Verdict:
    """Verdict for ``response`` on ``item`` (dispatch on ``item.answer_type``)."""
    return SCORERS[item.answer_type](response, item, options)

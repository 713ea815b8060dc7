"""The normalised benchmark item shared by loaders, prompt formatting and scoring."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from srpo_core.verifiers.code import TestCase

# How an item's answer is checked (keys of srpo_core.benchmarks.scoring.SCORERS).
MATH = "math"
CHOICE = "choice"
YES_NO = "yes_no"
FILLING = "filling"
CODE = "code"
ANSWER_TYPES = (MATH, CHOICE, YES_NO, FILLING, CODE)


@dataclass(frozen=True)
class Item:
    """One benchmark question.

    gold: the reference answer as a string (math expression, choice label, "yes"/"no", a
      chemical equation; "" for code, which is scored by ``tests``).
    choices: (label, text) pairs for multiple choice, else empty.
    tests: all test cases of a code problem (scoring picks the train or held-out half).
    meta: source-specific extras (e.g. ``func_name``, ``starter_code``, ``instruction``).
    """

    id: str
    question: str
    gold: str
    answer_type: str
    choices: tuple[tuple[str, str], ...] = ()
    tests: tuple[TestCase, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.answer_type not in ANSWER_TYPES:
            raise ValueError(f"answer_type must be one of {ANSWER_TYPES}, got {self.answer_type!r}")

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(label for label, _ in self.choices)

"""What the training loop needs from a data source: :class:`TaskItem` and the :class:`Task` protocol.

A leaf module (it imports nothing of srpo_core), so that task implementations living elsewhere
(``srpo_core.tasks.benchmark``) depend on it without importing the task registry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class TaskItem:
    id: str
    question: str
    gold: str
    meta: dict = field(default_factory=dict, hash=False, compare=False)


class Task(Protocol):
    name: str
    has_step_checker: bool

    def items(self, split: str, n: int, seed: int) -> list[TaskItem]: ...

    def reward(self, item: TaskItem, response: str) -> float: ...

    def first_error(self, item: TaskItem, thoughts: list[str]) -> int | None: ...

    def is_incorrect(self, item: TaskItem, reward: float) -> bool:
        """The seed rule of paper algorithm 2: whether a chain with this reward is incorrect
        (binary tasks: reward 0; code: not all training tests passed, reward < 1)."""
        ...


def is_incorrect(task: Task, item: TaskItem, reward: float) -> bool:
    """`task.is_incorrect(item, reward)`, or, for a task without the rule, a binary task's rule
    (reward 0 is incorrect: not reaching full reward, reward < 1)."""
    rule = getattr(task, "is_incorrect", None)
    return bool(rule(item, reward)) if rule is not None else reward < 1.0

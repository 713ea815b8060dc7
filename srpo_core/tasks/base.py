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

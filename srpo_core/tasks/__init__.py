"""Tasks: what the training loop needs from a data source.

A task yields items (id, question, gold), scores a response (reward in [0, 1]) and, where it has
a step checker, returns the first wrong thought of a chain (the CPI-CARO credit oracle). Tasks
are chosen by name from `TASKS`; `get_task` adds the benchmark-backed tasks
(`srpo_core.tasks.benchmark`) on a miss. `TaskItem` and the `Task` protocol live in `tasks.base`.
"""

from __future__ import annotations

from collections.abc import Callable

from srpo_core.tasks.base import Task, TaskItem

__all__ = ["TASKS", "SyntheticTask", "Task", "TaskItem", "get_task"]


class SyntheticTask:
    """Chained arithmetic mod 10 (tasks/synthetic.py), with an exact step checker.

    `spec` (a `synthetic.ChainSpec`) sets the chain lengths, operation mix and error-prone
    operation; the default draws the items this task always drew. `synthetic_long` is the same task
    with `synthetic.LONG_CHAINS` (10-16 operations, one or two `*` steps: the fidelity regime)."""

    has_step_checker = True

    def __init__(self, spec=None, name: str = "synthetic"):
        from srpo_core.tasks import synthetic

        self.spec = synthetic.DEFAULT_CHAINS if spec is None else spec
        self.name = name

    @classmethod
    def from_config(cls, params: dict, name: str = "synthetic") -> SyntheticTask:
        """The task for a config's `data.synthetic` mapping (empty: the default chains)."""
        from srpo_core.tasks import synthetic

        return cls(synthetic.ChainSpec.from_mapping(dict(params)), name)

    @classmethod
    def long_chains(cls, path: str = "") -> SyntheticTask:
        from srpo_core.tasks import synthetic

        if path:
            raise ValueError("data.path: the synthetic_long task is generated, it reads no file")
        return cls(synthetic.LONG_CHAINS, "synthetic_long")

    def items(self, split: str, n: int, seed: int) -> list[TaskItem]:
        from srpo_core.tasks import synthetic

        return [TaskItem(p.id, p.question, p.answer) for p in synthetic.make_split(split, n, seed, self.spec)]

    def reward(self, item: TaskItem, response: str) -> float:
        from srpo_core.tasks import synthetic

        return 1.0 if synthetic.extract_answer(response) == item.gold else 0.0

    def first_error(self, item: TaskItem, thoughts: list[str]) -> int | None:
        from srpo_core.tasks import synthetic

        return synthetic.first_error(synthetic.Problem(item.id, item.question, item.gold), thoughts)

    def is_incorrect(self, item: TaskItem, reward: float) -> bool:
        return reward <= 0.0  # binary reward: incorrect = reward 0


TASKS: dict[str, Callable[..., Task]] = {"synthetic": SyntheticTask, "synthetic_long": SyntheticTask.long_chains}


def get_task(name: str, path: str = "", synthetic: dict | None = None) -> Task:
    """The task `name`; `path` points a data-backed task at a local file instead of its default;
    `synthetic` (config `data.synthetic`) sets the chains of the synthetic task."""
    if name not in TASKS:
        try:  # benchmark-backed tasks, added on first use (srpo_core.benchmarks never imports tasks)
            from srpo_core.tasks.benchmark import register_all
        except ModuleNotFoundError:
            pass
        else:
            register_all(TASKS)
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}")
    if path and name == "synthetic":
        raise ValueError("data.path: the synthetic task is generated, it reads no file")
    if synthetic and name == "synthetic":
        return SyntheticTask.from_config(synthetic)
    return TASKS[name](path=path) if path else TASKS[name]()

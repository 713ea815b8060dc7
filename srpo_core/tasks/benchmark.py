"""Every registry benchmark as a training/evaluation :class:`~srpo_core.tasks.Task`.

:func:`register_all` adds one task per benchmark of :mod:`srpo_core.benchmarks` to a task
registry under the benchmark's name (``srpo_core.tasks.get_task`` calls it on a miss), so
``eval.benchmarks`` and ``data.task`` can name any benchmark. The dependency runs one way:
this module imports :mod:`srpo_core.benchmarks`, which never imports :mod:`srpo_core.tasks`.

Splits
    ``test``: the benchmark's evaluation set (``Benchmark.load_eval``: the seeded sample of
      REFERENCE.md, seed 42, ``eval_n`` items; for a training benchmark its held-out test part),
      first ``n`` items. The ``seed`` argument does not change it: every training, method and
      data seed is evaluated on the same items (a prefix of a seeded shuffle is a seeded sample).
    ``train``: only where the benchmark has one. ``numinamath_olympiads``: the train part of its
      seeded 80/20 cut (disjoint from ``test``), then ``n`` items shuffled with ``seed``.
      ``livecodebench_medium``: the same problems, rewarded with the *training half* of each
      problem's test cases (SPEC 3), evaluation uses the held-out half. Other benchmarks raise.
    Asking for more items than exist returns all of them (``EvalResult.n`` reports the count).

Items
    question = ``Benchmark.format_prompt(item)`` (options and answer instruction included), gold =
    the item's gold, ``meta["item"]`` = the benchmark :class:`~srpo_core.benchmarks.Item`.
    reward = ``Benchmark.score(response, item).score`` (fraction of tests for code). No step
    checker (``first_error`` returns None). Seed rule (``is_incorrect``): code chains that do not
    pass all their training tests, other chains with reward 0.

Malformed rows and sources (explicit, never silently wrong)
    ``BenchmarkTask(name, on_error="raise"|"skip", source="local"|"hub", path=None)``. The
    registered factories read ``$SRPO_BENCHMARK_ON_ERROR`` (default ``raise``: the first bad row
    fails with file and line) and ``$SRPO_BENCHMARK_SOURCE`` (default ``local``). With ``skip``,
    bad rows are left out with a :class:`~srpo_core.benchmarks.BenchmarkDataWarning` that counts
    them, and the count is kept in ``task.skipped_rows``.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from collections.abc import Callable, MutableMapping

from srpo_core.benchmarks import BENCHMARKS, Benchmark, BenchmarkDataWarning, get_benchmark, sample_items
from srpo_core.benchmarks.items import CODE
from srpo_core.benchmarks.registry import ENV_BENCHMARK_SOURCE, ON_ERROR, SOURCES
from srpo_core.tasks.base import Task, TaskItem

log = logging.getLogger(__name__)

ENV_ON_ERROR = "SRPO_BENCHMARK_ON_ERROR"
ENV_SOURCE = ENV_BENCHMARK_SOURCE
# Benchmarks whose problems are also trained on with a test-case split (reward = train cases).
TEST_CASE_SPLIT = ("livecodebench_medium",)
SPLITS = ("train", "test")


class BenchmarkTask:
    """A :class:`~srpo_core.tasks.Task` over one registry benchmark (see the module doc)."""

    has_step_checker = False

    def __init__(self, name: str, *, on_error: str | None = None, source: str | None = None, path: str | None = None):
        self.benchmark: Benchmark = get_benchmark(name)
        self.name = name
        self.on_error = on_error or os.environ.get(ENV_ON_ERROR) or "raise"
        self.source = source or os.environ.get(ENV_SOURCE) or "local"
        if self.on_error not in ON_ERROR:
            raise ValueError(f"{name}: on_error must be one of {ON_ERROR}, got {self.on_error!r} (${ENV_ON_ERROR})")
        if self.source not in SOURCES:
            raise ValueError(f"{name}: source must be one of {SOURCES}, got {self.source!r} (${ENV_SOURCE})")
        self.path = path
        self.skipped_rows = 0
        self._sample_noted = False

    @property
    def has_train_split(self) -> bool:
        return self.benchmark.train_fraction is not None or self.name in TEST_CASE_SPLIT

    def _load(self, **kwargs):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", BenchmarkDataWarning)
            if self.path is not None:
                items = self.benchmark.load("local", path=self.path, on_error=self.on_error, **kwargs)
            else:
                items = self.benchmark.load(self.source, on_error=self.on_error, **kwargs)
        for w in caught:  # re-emit (they were recorded to count them) and keep the count
            if isinstance(w.message, BenchmarkDataWarning):
                self.skipped_rows += w.message.skipped
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return items

    def _eval_items(self):
        b = self.benchmark
        if b.train_fraction is not None:
            return self._load(split="test")
        return self._load(n=b.eval_n)

    def items(self, split: str, n: int, seed: int) -> list[TaskItem]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if split == "test":
            chosen = self._eval_items()[:n]
        elif self.benchmark.train_fraction is not None:
            chosen = sample_items(self._load(split="train"), n, seed)
        elif self.name in TEST_CASE_SPLIT:
            chosen = sample_items(self._load(n=self.benchmark.eval_n), n, seed)
        else:
            raise ValueError(
                f"benchmark {self.name!r} has no train split (train on numinamath_olympiads, "
                f"{', '.join(TEST_CASE_SPLIT)} or the synthetic task)"
            )
        if len(chosen) < n:
            self._note_packaged_sample(len(chosen), n)
        return [
            TaskItem(it.id, self.benchmark.format_prompt(it), it.gold, meta={"item": it, "split": split, "benchmark": self.name})
            for it in chosen
        ]

    def _note_packaged_sample(self, got: int, asked: int) -> None:
        """Say once that a short item list comes from the few rows shipped in the package."""
        if self._sample_noted or self.path is not None or self.source != "local" or not self.benchmark.is_packaged_sample():
            return
        self._sample_noted = True
        log.warning(
            "%s: %d of %d items asked: only the packaged sample is here (a few rows, not the benchmark); "
            "set SRPO_BENCHMARK_DIR to the full files or %s=hub", self.name, got, asked, ENV_SOURCE,
        )

    def verdict(self, item: TaskItem, response: str):
        bench_item = item.meta.get("item")
        if bench_item is None:
            raise ValueError(f"{self.name}: item {item.id!r} was not made by this task (no meta['item'])")
        code_split = "train" if item.meta.get("split") == "train" else "eval"
        return self.benchmark.score(response, bench_item, code_split=code_split)

    def reward(self, item: TaskItem, response: str) -> float:
        return float(self.verdict(item, response).score)

    def first_error(self, item: TaskItem, thoughts: list[str]) -> int | None:
        return None

    def is_incorrect(self, item: TaskItem, reward: float) -> bool:
        """Code: not all training tests passed (reward < 1); every other answer type is binary:
        reward 0 (REFERENCE "Algorithm 2")."""
        bench_item = item.meta.get("item")
        code = bench_item.answer_type == CODE if bench_item is not None else CODE in self.benchmark.answer_types
        return reward < 1.0 if code else reward <= 0.0


def register_all(tasks: MutableMapping[str, Callable[..., Task]]) -> None:
    """Add a task factory per registry benchmark to ``tasks`` (existing names are left alone)."""
    for name in BENCHMARKS:
        if name not in tasks:
            tasks[name] = functools.partial(BenchmarkTask, name)

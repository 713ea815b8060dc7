"""The data order of a training: which training items each epoch step sees.

A pure function of (items, train.prompts_per_step, train.epochs, train.seed): a seeded permutation
per epoch, cut into steps of `prompts_per_step` prompts (a short tail is dropped). A resumed
training, the flow and the plain loop therefore see the same prompts at the same step.
"""

from __future__ import annotations

import random

from srpo_core.config import Config
from srpo_core.tasks import TaskItem, get_task


def step_batches(n_items: int, prompts_per_step: int, epochs: int, seed: int) -> list[list[int]]:
    """Item indices per epoch step, over all epochs."""
    batches = []
    for epoch in range(epochs):
        order = list(range(n_items))
        random.Random(f"data-{seed}-{epoch}").shuffle(order)
        batches += [order[i : i + prompts_per_step] for i in range(0, n_items - prompts_per_step + 1, prompts_per_step)]
    return batches


def training_task(cfg: Config):
    """The task of `data.*` (its file `data.path`, its chains `data.synthetic`)."""
    return get_task(cfg.data.task, cfg.data.path, cfg.data.synthetic)


def eval_task(cfg: Config, name: str):
    """The task of evaluation benchmark `name` (the training task's own settings when it is it)."""
    return training_task(cfg) if name == cfg.data.task and not cfg.data.path else get_task(name)


def train_items(cfg: Config) -> list[TaskItem]:
    """The training items of `data.task` (a missing data file fails here, naming it)."""
    return training_task(cfg).items("train", cfg.data.train_size, cfg.data.data_seed)


def batches_of(cfg: Config, items: list[TaskItem]) -> list[list[int]]:
    return step_batches(len(items), cfg.train.prompts_per_step, cfg.train.epochs, cfg.train.seed)


def n_steps(cfg: Config, items: list[TaskItem] | None = None, max_steps: int | None = None) -> int:
    """Epoch steps of a training over the items the dataset really has (it may hold fewer than
    data.train_size), capped by `max_steps` (default: train.max_steps; 0 = no cap)."""
    items = train_items(cfg) if items is None else items
    total = len(batches_of(cfg, items))
    if total == 0:
        raise ValueError(f"data.task {cfg.data.task!r} has {len(items)} training items < train.prompts_per_step={cfg.train.prompts_per_step}")
    cap = cfg.train.max_steps if max_steps is None else max_steps
    return min(total, cap) if cap else total


def step_items(cfg: Config, step: int, items: list[TaskItem] | None = None) -> list[TaskItem]:
    items = train_items(cfg) if items is None else items
    return [items[i] for i in batches_of(cfg, items)[step]]


def step_item_ids(cfg: Config, step: int, items: list[TaskItem] | None = None) -> list[str]:
    return [it.id for it in step_items(cfg, step, items)]


def items_by_id(cfg: Config, ids: list[str]) -> list[TaskItem]:
    index = {it.id: it for it in train_items(cfg)}
    missing = [i for i in ids if i not in index]
    if missing:
        raise KeyError(f"items {missing[:5]} are not in the training data of task {cfg.data.task!r}")
    return [index[i] for i in ids]


def data_cursor(cfg: Config, step: int) -> dict:
    """Where step `step` is in the data (stored in the step's manifest)."""
    items = train_items(cfg)
    per_epoch = len(step_batches(len(items), cfg.train.prompts_per_step, 1, cfg.train.seed))
    return {"step": step, "epoch": step // per_epoch, "index_in_epoch": step % per_epoch, "item_ids": step_item_ids(cfg, step, items)}


def check_sources(cfg: Config, extra: tuple[str, ...] = ()) -> None:
    """Fail before any model is loaded, with a one-line benchmarks.BenchmarkUnavailable naming the
    file and the ways to provide it, when the training task's or an evaluation benchmark's data
    cannot be read here (files are located, not parsed)."""
    from srpo_core.benchmarks import check_sources as locate

    locate((cfg.data.task, *cfg.eval.benchmarks, *extra), paths={cfg.data.task: cfg.data.path} if cfg.data.path else None)

"""What a comparison runs: its rows (method variants from the registry) x seeds, as JSON-able
training specs (a Metaflow foreach item each), with their evaluation schedule."""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from srpo_core import data_order, identity, methods
from srpo_core.config import LOCALIZERS, METHODS, SPLITS, Config
from srpo_core.methods.base import Variant

PAPER_SEEDS = (0, 42, 420)


def make_variants(methods_asked, splits, localizers) -> list[Variant]:
    """The rows of a comparison, from each method's `variants` (GRPO once; RRPO per split; SRPO
    per split x localizer other than `random`; other methods as they declare)."""
    for s in splits:
        if s not in SPLITS:
            raise ValueError(f"unknown split {s!r}; one of {SPLITS}")
    for loc in localizers:
        if loc not in LOCALIZERS:
            raise ValueError(f"unknown localizer {loc!r}; one of {LOCALIZERS}")
    out: list[Variant] = []
    for m in methods_asked:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; one of {METHODS}")
        out += methods.get(m).variants(list(splits), list(localizers))
    return list(dict.fromkeys(out))


def variant_labels(variants: list[Variant]) -> dict[Variant, str]:
    """Row labels as in the paper: ``GRPO``, ``RRPO``, ``SRPO``; the split and localizer are added
    only where the comparison has several of them."""
    splits = {v.split for v in variants if v.split != "none"}
    locs = {v.localizer for v in variants if v.method == "srpo"}
    return {v: methods.get(v.method).label(v, len(splits) > 1, len(locs) > 1) for v in variants}


@dataclass
class RunSpec:
    """One training of a comparison (JSON-able: it travels as a Metaflow foreach item)."""

    comparison_id: str
    training_id: str
    label: str
    method: str
    split: str
    localizer: str
    seed: int
    config: dict
    benchmarks: list[str]
    eval_items: dict[str, int]  # items per benchmark
    eval_steps: list[int]  # evaluate after these many updates (0 = before training)
    steps: int
    out_dir: str
    tracking_uri: str | None = None  # None: no MLflow
    experiment_id: str | None = None
    parent_run_id: str | None = None
    long_prompts: str = "truncate"
    samples: int = 1
    ks: list[int] = field(default_factory=list)
    progress: bool = True


@dataclass
class ComparisonPlan:
    comparison_id: str
    config: dict
    benchmarks: list[str]
    labels: list[str]  # row order
    specs: list[RunSpec]
    out_dir: str
    tracking_uri: str | None = None
    experiment_id: str | None = None
    parent_run_id: str | None = None


def total_steps_of(cfg: Config, max_steps: int | None) -> int:
    return data_order.n_steps(cfg, max_steps=max_steps)


def plan_comparison(
    cfg: Config,
    *,
    methods=METHODS,
    splits=None,
    localizers=None,
    seeds=PAPER_SEEDS,
    steps: int | None = None,
    benchmarks=(),
    eval_items: int | None = None,
    eval_every: int | None = None,
    out_dir: str | os.PathLike = "runs/compare",
    long_prompts: str = "truncate",
    samples: int = 1,
    ks=(),
    progress: bool = True,
    comparison_id: str | None = None,
) -> ComparisonPlan:
    """The trainings of a comparison (no model loaded, no MLflow yet)."""
    splits = list(splits or [cfg.method.split])
    localizers = list(localizers or [cfg.method.resolved_localizer if cfg.method.method == "srpo" else methods.get("srpo").default_localizer])
    variants = make_variants(methods, splits, localizers)
    labels = variant_labels(variants)
    cid = comparison_id or f"cmp-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    counts: dict[str, int] = {}
    extra = []
    for spec in benchmarks:  # NAME or NAME:N
        name, _, n = str(spec).partition(":")
        if n:
            if not n.isdigit() or int(n) < 1:
                raise ValueError(f"benchmark {spec!r}: expected NAME or NAME:N with N >= 1")
            counts[name] = int(n)
        extra.append(name)
    bench = list(dict.fromkeys([*cfg.eval.benchmarks, *extra]))
    from srpo_core.tasks import get_task

    for name in bench:
        get_task(name)  # an unknown name fails here, before any training
    data_order.check_sources(cfg, tuple(bench))
    default_n = eval_items or cfg.eval.items_per_benchmark
    per_bench = {b: counts.get(b, default_n) for b in bench}
    specs = []
    for v in variants:
        for seed in seeds:
            c = cfg.override(**v.overrides(), **{"train.seed": int(seed)})
            n_steps = total_steps_of(c, steps)
            every = cfg.eval.every_steps if eval_every is None else eval_every
            tid = identity.training_id(c, prefix=cid)
            specs.append(
                RunSpec(
                    cid,
                    tid,
                    labels[v],
                    v.method,
                    v.split,
                    v.localizer,
                    int(seed),
                    c.to_dict(),
                    bench,
                    per_bench,
                    identity.eval_steps(n_steps, every),
                    n_steps,
                    str(Path(out_dir) / "trainings" / tid),
                    long_prompts=long_prompts,
                    samples=samples,
                    ks=list(ks),
                    progress=progress,
                )
            )
    return ComparisonPlan(cid, cfg.to_dict(), bench, list(dict.fromkeys(labels[v] for v in variants)), specs, str(out_dir))



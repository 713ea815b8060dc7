"""What a comparison runs: its rows (method variants from the registry) x seeds, as JSON-able
training specs (a Metaflow foreach item each), with their evaluation schedule, rollout budget and
pass@k grid.

Rollout budget (`budget`)
    ``equal`` (default): every method samples the same number of rollouts per step, the
    reference B = train.prompts_per_step x rollouts per prompt of the config's own method (e.g.
    tiny: srpo, 16 x 8 = 128). A method with r rollouts per prompt (``Method.rollouts_per_prompt``:
    grpo/rrpo/srpo 8, srppo ``method.options.rollouts``, 1 by default) trains on B / r prompts per
    step; ``train.mini_batch_prompts`` and ``data.train_size`` scale by the same factor, so the
    rollouts per optimizer step and the number of steps stay those of the config. B / r must be a
    whole number and the scaled mini-batch too (else a ValueError naming the keys).
    ``config``: every method keeps the config as given.
"""

from __future__ import annotations

import math
import os
import time
import uuid
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from srpo_core import data_order, identity
from srpo_core import methods as registry
from srpo_core.config import LOCALIZERS, METHODS, SPLITS, Config
from srpo_core.methods.base import Variant

PAPER_SEEDS = (0, 42, 420)
BUDGETS = ("equal", "config")


def default_ks(samples: int) -> list[int]:
    """The pass@k grid when none is asked: powers of two up to `samples`, and `samples` itself
    (128 -> 1, 2, 4, ..., 128; 10 -> 1, 2, 4, 8, 10); none for a single sample."""
    if samples <= 1:
        return []
    return sorted({2**i for i in range(int(math.log2(samples)) + 1)} | {samples})


def check_ks(ks, samples: int) -> list[int]:
    """`ks` sorted without repeats, each in 1..samples; the default grid when empty."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    bad = [k for k in ks if k < 1 or k > samples]
    if bad:
        raise ValueError(f"pass@k: each k must be in 1..samples ({samples}); got {bad}")
    return sorted(set(int(k) for k in ks)) if ks else default_ks(samples)


def rollouts_per_step(cfg: Config) -> tuple[int, int]:
    """(prompts per step, rollouts per prompt) of a config's method (the registry says the latter)."""
    return cfg.train.prompts_per_step, registry.get(cfg.method.method).rollouts_per_prompt(cfg)


def equal_budget(cfg: Config, budget: int, reference: str = "the reference") -> Config:
    """`cfg` at `budget` rollouts per step: train.prompts_per_step = budget / its rollouts per
    prompt, train.mini_batch_prompts and data.train_size scaled by the same factor (the same
    rollouts per optimizer step; floor(train_size x factor) keeps the steps per epoch, as every
    dropped remainder stays under one step)."""
    prompts, per_prompt = rollouts_per_step(cfg)
    if budget % per_prompt:
        raise ValueError(
            f"--budget equal: method {cfg.method.method!r} samples {per_prompt} rollouts per prompt, which does not divide {reference}'s "
            f"{budget} rollouts per step; set train.prompts_per_step so that it does, or use --budget config"
        )
    new_prompts = budget // per_prompt
    if new_prompts == prompts:
        return cfg
    f = Fraction(new_prompts, prompts)
    mini = cfg.train.mini_batch_prompts * f
    if mini.denominator != 1 or new_prompts % int(mini):
        raise ValueError(
            f"--budget equal: method {cfg.method.method!r} at {new_prompts} prompts per step (was {prompts}) would need "
            f"train.mini_batch_prompts = {cfg.train.mini_batch_prompts} x {f} = {float(mini):g}, not a whole divisor of {new_prompts}; "
            "choose train.mini_batch_prompts so that it scales, or use --budget config"
        )
    return cfg.override(**{"train.prompts_per_step": new_prompts, "train.mini_batch_prompts": int(mini), "data.train_size": max(1, math.floor(cfg.data.train_size * f))})


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
        out += registry.get(m).variants(list(splits), list(localizers))
    return list(dict.fromkeys(out))


def variant_labels(variants: list[Variant]) -> dict[Variant, str]:
    """Row labels as in the paper: ``GRPO``, ``RRPO``, ``SRPO``; the split and localizer are added
    only where the comparison has several of them."""
    splits = {v.split for v in variants if v.split != "none"}
    locs = {v.localizer for v in variants if v.method == "srpo"}
    return {v: registry.get(v.method).label(v, len(splits) > 1, len(locs) > 1) for v in variants}


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
    rollouts_per_prompt: int = 0  # the method's (Method.rollouts_per_prompt)
    rollouts_per_step: int = 0  # train.prompts_per_step x rollouts_per_prompt: its budget


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
    budget: str = "equal"  # BUDGETS
    reference_rollouts: int = 0  # rollouts per step of the config's own method (the equal budget)

    def budget_lines(self) -> list[str]:
        """One line per row: prompts x rollouts per prompt = rollouts per step."""
        head = f"rollout budget ({self.budget}): " + (f"{self.reference_rollouts} rollouts per step for every method (the config's)" if self.budget == "equal" else "each method's config as given")
        lines, seen = [head], set()
        for s in self.specs:
            if s.label not in seen:
                seen.add(s.label)
                lines.append(f"  {s.label}: {s.config['train']['prompts_per_step']} prompts x {s.rollouts_per_prompt} rollouts = {s.rollouts_per_step} per step, {s.steps} steps")
        return lines


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
    budget: str = "equal",
) -> ComparisonPlan:
    """The trainings of a comparison (no model loaded, no MLflow yet). `ks` empty with
    `samples` > 1: the default pass@k grid (:func:`default_ks`); `budget`: see the module doc."""
    if budget not in BUDGETS:
        raise ValueError(f"budget {budget!r}: one of {BUDGETS}")
    ks = check_ks(ks, samples)
    ref_prompts, ref_per_prompt = rollouts_per_step(cfg)
    reference = ref_prompts * ref_per_prompt
    ref_name = f"the config's method {cfg.method.method!r} ({ref_prompts} prompts x {ref_per_prompt})"
    splits = list(splits or [cfg.method.split])
    localizers = list(localizers or [cfg.method.resolved_localizer if cfg.method.method == "srpo" else registry.get("srpo").default_localizer])
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
        own = {} if v.method == cfg.method.method else {"method.options": {}}  # another method's options are not this one's
        for seed in seeds:
            c = cfg.override(**v.overrides(), **own, **{"train.seed": int(seed)})
            n_steps = total_steps_of(c, steps)
            if budget == "equal":
                scaled = equal_budget(c, reference, ref_name)
                if scaled is not c:
                    got = total_steps_of(scaled, steps)
                    if got != n_steps:
                        raise ValueError(
                            f"--budget equal: {labels[v]} at {scaled.train.prompts_per_step} prompts per step gets {got} steps, not the config's {n_steps}: "
                            f"task {scaled.data.task!r} has fewer than data.train_size={scaled.data.train_size} training items; use --steps, a smaller train.prompts_per_step, or --budget config"
                        )
                    c = scaled
            prompts, per_prompt = rollouts_per_step(c)
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
                    rollouts_per_prompt=per_prompt,
                    rollouts_per_step=prompts * per_prompt,
                )
            )
    return ComparisonPlan(cid, cfg.to_dict(), bench, list(dict.fromkeys(labels[v] for v in variants)), specs, str(out_dir), budget=budget, reference_rollouts=reference)


def check_pass_k(samples: int, ks: list[int]) -> None:
    """`srpo compare --samples n --pass-k k...`: every k in 1..n (SystemExit naming the bad flag)."""
    if samples < 1:
        raise SystemExit(f"--samples {samples}: must be >= 1")
    bad = [k for k in ks if k < 1 or k > samples]
    if bad:
        raise SystemExit(f"--pass-k {bad}: each k must be in 1..--samples ({samples})")

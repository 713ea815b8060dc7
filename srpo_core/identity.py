"""The identity of a training, one definition for the flow, the plain loop and the comparison:
how CLI flags override a config, the training's key and id, its MLflow tags, its number of steps
and when it is evaluated."""

from __future__ import annotations

import time
from typing import Any

from srpo_core.config import Config, parse_overrides


def flag_overrides(
    *,
    method: str | None = None,
    split: str | None = None,
    localizer: str | None = None,
    seed: int | None = None,
    loss: str | None = None,
    steps: int | None = None,
    sets: list[str] | tuple[str, ...] = (),
) -> dict[str, Any]:
    """Dotted overrides from CLI flags (None: not given) and `--set key=value` pairs (which win).
    Naming a method without a localizer selects that method's default localizer."""
    flags = {"method.method": method, "method.split": split, "method.localizer": localizer, "train.seed": seed, "loss.loss": loss, "train.max_steps": steps}
    out = {k: v for k, v in flags.items() if v is not None}
    if method is not None and localizer is None:
        out["method.localizer"] = ""
    out.update(parse_overrides(list(sets)))
    return out


def method_key(cfg: Config) -> str:
    """`grpo`, or method-split-localizer for methods that reset (the comparison's row key)."""
    spec = cfg.method.spec
    return spec.name if not spec.uses_split else f"{spec.name}-{cfg.method.split}-{cfg.method.resolved_localizer}"


def training_id(cfg: Config, prefix: str = "") -> str:
    """`<prefix>-<method key>-s<seed>` in a comparison, `<method key>-s<seed>-<UTC time>` alone."""
    if prefix:
        return f"{prefix}-{method_key(cfg)}-s{cfg.train.seed}"
    return f"{method_key(cfg)}-s{cfg.train.seed}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


def tags(cfg: Config, training_id: str) -> dict[str, str]:
    """The MLflow tags of a training's run (a method's unused split or localizer is `none`)."""
    spec = cfg.method.spec
    return {
        "method": spec.name, "split": cfg.method.split if spec.uses_split else "none",
        "localizer": cfg.method.resolved_localizer if spec.uses_split else "none", "seed": str(cfg.train.seed),
        "model": cfg.model.name_or_path, "training_id": training_id, "task": cfg.data.task,
    }  # fmt: skip


def eval_steps(total_steps: int, every: int) -> list[int]:
    """Evaluate after these many updates: 0 (before training), every `every`, and after the last."""
    at = {0, total_steps}
    if every > 0:
        at |= set(range(every, total_steps, every))
    return sorted(at)


def eval_due(cfg: Config, step: int, total_steps: int) -> bool:
    """Evaluate after epoch step `step` (0-based)?"""
    return step + 1 in eval_steps(total_steps, cfg.eval.every_steps)


def policy_version(after_step: int | None) -> str:
    """The name of the policy after epoch step `after_step`'s update (`base` before any): what
    records carry as `adapter_version` and what the inference server pins."""
    return "base" if after_step is None else f"step-{after_step + 1}"

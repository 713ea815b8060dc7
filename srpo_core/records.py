"""The rollout-record format: one JSON line per rollout in a step's `rollouts.jsonl` (the fields
are listed in README's "Rollout records" table)."""

from __future__ import annotations

import json
from pathlib import Path

from srpo_core import rollouts as R
from srpo_core.config import Config


def record_dict(rec: R.Record, step: int, split: str, localizer: str) -> dict:
    return {
        "step": step,
        "prompt_id": rec.item.id,
        "group_id": rec.group_id,
        "group": rec.group,
        "split": split,
        "localizer": localizer,
        "reset_index": rec.reset_index if rec.group in ("shared_prefix", "seed") else None,
        "oracle_first_error": rec.oracle_first_error,
        "localization_status": rec.localization_status,
        "judge_first_error": rec.judge_first_error,
        "judge_status": rec.judge_status,
        "prefix_tokens": rec.rollout.prefix_len,
        "response_tokens": len(rec.rollout.response_ids),
        "thoughts": rec.rollout.thoughts,
        "finish_reason": rec.rollout.finish_reason,
        "reward": rec.reward,
        "advantage": rec.advantage,
        "steps_valid": rec.steps_valid,
        "adapter_version": rec.rollout.adapter_version,
    }


def records_jsonl(records: list[R.Record], step: int, cfg: Config) -> str:
    return "".join(json.dumps(record_dict(rec, step, cfg.method.split, cfg.method.resolved_localizer)) + "\n" for rec in records)


def write_records(path: Path, records: list[R.Record], step: int, cfg: Config) -> Path:
    """`rollouts.jsonl`, written atomically (a temporary file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(records_jsonl(records, step, cfg))
    tmp.replace(path)
    return path

"""The plain training loop (no workflow engine): steps of rollouts -> rewards -> advantages ->
update, with greedy evaluation on the task's test split before and after.

    srpo train --config tiny --method srpo --split 1x4 --localizer oracle --steps 2 --seed 0

Flags override the config; `--set key=value` overrides any dotted key. The Metaflow flow calls
the same phase functions (pipeline.py) one workflow step at a time.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from srpo_core import pipeline
from srpo_core.config import LOCALIZERS, LOSSES, METHODS, SPLITS, Config, load_config, parse_overrides


def resolve_model_path(name_or_path: str) -> str:
    from srpo_core.tiny.build import resolve_model_path as resolve

    return resolve(name_or_path)


@dataclass
class Session:
    """The live objects of a training: learner (owns the LoRA model) and an engine over it."""

    cfg: Config
    learner: object
    engine: object
    task: object


def set_threads(cfg: Config) -> None:
    import torch

    if cfg.model.threads:
        torch.set_num_threads(cfg.model.threads)


def open_session(cfg: Config, adapter_path: str | None = None) -> Session:
    import torch

    from srpo_core.distributed import resolve_processes
    from srpo_core.engine.hf import HFEngine
    from srpo_core.learner import learner_from_config
    from srpo_core.tasks import get_task

    set_threads(cfg)
    random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    if resolve_processes(cfg.train.processes) > 1:
        print(f"note: this in-process loop trains with one learner process; train.processes={cfg.train.processes} applies to the flow's learner step (python flows/srpo_flow.py run)", file=sys.stderr)
    learner = learner_from_config(cfg, adapter_path)
    learner.model.eval()
    engine = HFEngine(learner.model, learner.tokenizer, adapter_version="step-0")
    return Session(cfg, learner, engine, get_task(cfg.data.task, cfg.data.path))


def train_step(session: Session, items, step: int, out_dir: Path | None = None) -> pipeline.StepResult:
    """One full step: rollout phases, then the learner update. Writes rollouts.jsonl if out_dir."""
    cfg = session.cfg
    start = time.perf_counter()
    result = pipeline.run_rollout_phases(session.engine, session.task, cfg, items, step)
    with pipeline.timed(result.timings, "learner"):
        seqs = pipeline.train_sequences(result.records)
        result.metrics.update(session.learner.update(seqs, cfg.train.mini_batch_prompts, cfg.train.micro_batch_sequences, cfg.train.update_epochs, micro_batch_tokens=cfg.train.micro_batch_tokens))
    session.engine.adapter_version = f"step-{step + 1}"
    result.timings["step"] = time.perf_counter() - start
    result.metrics.update({f"time/{k}": v for k, v in result.timings.items()})
    if out_dir is not None:
        pipeline.write_records(out_dir / "steps" / f"{step:06d}" / "rollouts.jsonl", result.records, step, cfg)
    return result


@dataclass
class TrainSummary:
    method: str
    steps: int
    accuracy_before: float
    accuracy_after: float
    seconds: float
    history: list[dict] = field(default_factory=list)


def run_steps(session: Session, out_dir: Path, max_steps: int | None = None):
    """The training steps in the configured data order: yields (step, StepResult); each step's
    metrics go to out_dir/metrics.jsonl after the caller has seen (and may extend) them."""
    cfg = session.cfg
    train_items = session.task.items("train", cfg.data.train_size, cfg.data.data_seed)
    batches = pipeline.step_batches(len(train_items), cfg.train.prompts_per_step, cfg.train.epochs, cfg.train.seed)
    limit = max_steps if max_steps is not None else (cfg.train.max_steps or len(batches))
    with (out_dir / "metrics.jsonl").open("w") as fh:
        for step, batch in enumerate(batches[:limit]):
            result = train_step(session, [train_items[i] for i in batch], step, out_dir)
            yield step, result
            fh.write(json.dumps({"step": step, **result.metrics}) + "\n")


def train(cfg: Config, out_dir: Path, max_steps: int | None = None, progress: bool = True) -> TrainSummary:
    from tqdm.auto import tqdm

    from srpo_core.evaluate import evaluate

    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    session = open_session(cfg)
    test_items = session.task.items("test", cfg.eval.items_per_benchmark, cfg.data.data_seed)
    before = evaluate(session.engine, session.task, test_items, cfg, progress=progress)
    history = []
    bar = tqdm(run_steps(session, out_dir, max_steps), desc=f"train {cfg.method.method}", disable=not progress)
    for step, result in bar:
        history.append({"step": step, **result.metrics})
        bar.set_postfix(reward=f"{result.metrics.get('reward/base/mean', float('nan')):.2f}", sp=f"{result.metrics.get('reward/shared_prefix/mean', float('nan')):.2f}")
    after = evaluate(session.engine, session.task, test_items, cfg, progress=progress)
    session.learner.save_adapter(out_dir / "adapter")
    summary = TrainSummary(cfg.method.method, len(history), before.accuracy, after.accuracy, time.perf_counter() - t0, history)
    (out_dir / "summary.json").write_text(json.dumps({k: v for k, v in summary.__dict__.items() if k != "history"}, indent=2))
    return summary


# ---- CLI -----------------------------------------------------------------------------------------

def config_from_args(args: argparse.Namespace) -> Config:
    overrides = parse_overrides(args.set or [])
    flags = {"method.method": args.method, "method.split": args.split, "method.localizer": args.localizer, "train.seed": args.seed, "loss.loss": args.loss}
    overrides.update({k: v for k, v in flags.items() if v is not None})
    if args.method is not None and args.localizer is None:
        overrides.setdefault("method.localizer", "")
    return load_config(args.config, overrides)


def add_common_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="tiny", help="preset name (tiny, paper, paper_olmo) or a YAML file")
    p.add_argument("--method", choices=METHODS)
    p.add_argument("--split", choices=SPLITS)
    p.add_argument("--localizer", choices=LOCALIZERS)
    p.add_argument("--loss", choices=LOSSES)
    p.add_argument("--seed", type=int)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any dotted config key")


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train with the plain loop (no workflow engine)")
    add_common_flags(p)
    p.add_argument("--steps", type=int, help="stop after this many steps")
    p.add_argument("--out", default="runs/train", help="output directory (rollouts.jsonl per step, metrics, adapter)")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    out = Path(args.out)
    summary = train(cfg, out, max_steps=args.steps)
    print(f"method={summary.method} split={cfg.method.split} localizer={cfg.method.resolved_localizer} steps={summary.steps}")
    print(f"accuracy before: {summary.accuracy_before:.3f}  after: {summary.accuracy_after:.3f}  ({summary.seconds:.1f}s)")
    print(f"records: {out}/steps/*/rollouts.jsonl  metrics: {out}/metrics.jsonl  adapter: {out}/adapter")
    return 0

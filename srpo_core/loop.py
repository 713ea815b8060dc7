"""The plain loop (no workflow engine): epoch steps of the step algorithm (srpo_core/step.py) in
memory, each followed by the learner update, with greedy evaluation on the task's test split
before and after.

    srpo train --config tiny --method srpo --split 1x4 --localizer oracle --steps 2 --seed 0

Flags override the config (identity.flag_overrides); `--set key=value` overrides any dotted key.
The flow (flows/srpo_flow.py) runs the same phase functions one Metaflow step at a time, through
the store, with the same seeds and data order.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from srpo_core import data_order, step
from srpo_core.config import LOCALIZERS, LOSSES, METHODS, SPLITS, Config, load_config
from srpo_core.identity import flag_overrides, policy_version
from srpo_core.records import write_records


@dataclass
class Session:
    """The live objects of a training: learner (owns the LoRA model), an engine sampling from its
    current policy, and the task."""

    cfg: Config
    learner: object
    engine: object
    task: object

    def sync_policy(self, version: str) -> None:
        """Make the engine sample from the learner's current weights (named `version`)."""
        from srpo_core.engine.hf import HFEngine

        if isinstance(self.engine, HFEngine):  # samples from the learner's own module
            self.engine.adapter_version = version
            return
        from srpo_core.engine.openai_api import OpenAIEngine

        # vLLM loads the LoRA from disk; a vLLM server (rollout.engine openai) reads it at this path: rollout.lora_dir when it is elsewhere
        if self.cfg.rollout.lora_dir:
            Path(self.cfg.rollout.lora_dir).mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f"srpo-policy-{version}-", dir=self.cfg.rollout.lora_dir or None))
        self.learner.save_adapter(work)
        if isinstance(self.engine, OpenAIEngine):
            from srpo_core.server.adapters import adapter_sha256

            for path in [work, *work.rglob("*")]:
                path.chmod(0o755 if path.is_dir() else 0o644)  # the vLLM server may run as another user
            self.engine.load_adapter(work, version, adapter_sha256(work))
            return
        self.engine.use_adapter(self.engine.make_lora_request(version, str(work)), version)


def open_session(cfg: Config, adapter_path: str | None = None) -> Session:
    import torch

    from srpo_core.fsdp import resolve_processes
    from srpo_core.learner import learner_from_config
    from srpo_core.runtime import build_engine, set_threads

    set_threads(cfg)
    random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    if resolve_processes(cfg.train.processes) > 1:
        print(f"note: this in-process loop trains with one learner process; train.processes={cfg.train.processes} applies to the flow's learner step (python flows/srpo_flow.py run)", file=sys.stderr)
    learner = learner_from_config(cfg, adapter_path)
    learner.model.eval()
    version = policy_version(None)
    if cfg.rollout.engine == "hf":
        from srpo_core.engine.hf import HFEngine

        engine = HFEngine(learner.model, learner.tokenizer, adapter_version=version)
    else:
        engine = build_engine(cfg, adapter_path, version)
    return Session(cfg, learner, engine, data_order.training_task(cfg))


def train_step(session: Session, items, step_index: int, out_dir: Path | None = None) -> step.StepResult:
    """One full step: the rollout phases, then the learner update. Writes rollouts.jsonl if out_dir."""
    cfg = session.cfg
    start = time.perf_counter()
    result = step.run_rollout_phases(session.engine, session.task, cfg, items, step_index)
    t = time.perf_counter()
    method = cfg.method.spec
    seqs, extra = method.prepare_update(session.learner, cfg, step.train_sequences(cfg, result.records))  # e.g. srppo's critic and credits
    result.metrics.update(session.learner.update(seqs, cfg.train.mini_batch_prompts, cfg.train.micro_batch_sequences, cfg.train.update_epochs, micro_batch_tokens=cfg.train.micro_batch_tokens))
    result.metrics.update(extra)
    method.finish_records(result.records, learner=session.learner)
    result.timings["learner"] = time.perf_counter() - t
    session.sync_policy(policy_version(step_index))
    result.timings["step"] = time.perf_counter() - start
    result.metrics.update({f"time/{k}": v for k, v in result.timings.items()})
    if out_dir is not None:
        write_records(out_dir / "steps" / f"{step_index:06d}" / "rollouts.jsonl", result.records, step_index, cfg)
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
    items = data_order.train_items(cfg)
    batches = data_order.batches_of(cfg, items)
    limit = data_order.n_steps(cfg, items, max_steps)
    with (out_dir / "metrics.jsonl").open("w") as fh:
        for step_index, batch in enumerate(batches[:limit]):
            result = train_step(session, [items[i] for i in batch], step_index, out_dir)
            yield step_index, result
            fh.write(json.dumps({"step": step_index, **result.metrics}) + "\n")


def train(cfg: Config, out_dir: Path, max_steps: int | None = None, progress: bool = True) -> TrainSummary:
    from tqdm.auto import tqdm

    from srpo_core.evaluate import evaluate

    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    data_order.check_sources(cfg)
    session = open_session(cfg)
    test_items = session.task.items("test", cfg.eval.items_per_benchmark, cfg.data.data_seed)
    before = evaluate(session.engine, session.task, test_items, cfg, progress=progress)
    history = []
    bar = tqdm(run_steps(session, out_dir, max_steps), desc=f"train {cfg.method.method}", disable=not progress)
    for step_index, result in bar:
        history.append({"step": step_index, **result.metrics})
        bar.set_postfix(reward=f"{result.metrics.get('reward/base/mean', float('nan')):.2f}", sp=f"{result.metrics.get('reward/shared_prefix/mean', float('nan')):.2f}")
    after = evaluate(session.engine, session.task, test_items, cfg, progress=progress)
    session.learner.save_adapter(out_dir / "adapter")
    cfg.method.spec.save_update_state(session.learner, out_dir)
    summary = TrainSummary(cfg.method.method, len(history), before.accuracy, after.accuracy, time.perf_counter() - t0, history)
    (out_dir / "summary.json").write_text(json.dumps({k: v for k, v in summary.__dict__.items() if k != "history"}, indent=2))
    return summary


# ---- CLI -----------------------------------------------------------------------------------------

def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config, flag_overrides(method=args.method, split=args.split, localizer=args.localizer, seed=args.seed, loss=args.loss, sets=args.set or []))


def add_common_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="tiny", help="preset name (tiny, paper, paper_olmo, ...) or a YAML file")
    p.add_argument("--method", choices=METHODS)
    p.add_argument("--split", choices=SPLITS)
    p.add_argument("--localizer", choices=LOCALIZERS)
    p.add_argument("--loss", choices=LOSSES)
    p.add_argument("--seed", type=int)
    p.add_argument("--set", action="extend", nargs="+", metavar="KEY=VALUE", help="override dotted config keys (several per flag, or repeat the flag)")


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

"""Running a comparison: one training per spec (the plain loop of srpo_core/loop.py, evaluated on
the comparison's benchmarks at its schedule, logged into a nested MLflow child run),, in turn in
this process (compare.run_comparison) or as a Metaflow foreach (flows/compare_flow.py)."""

from __future__ import annotations

import gc
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from srpo_core import identity
from srpo_core.compare.plan import RunSpec
from srpo_core.config import Config, from_dict


@dataclass
class TrainingResult:
    training_id: str
    label: str
    method: str
    split: str
    localizer: str
    seed: int
    steps: int
    run_id: str | None
    curves: dict[str, list[list[float]]]  # benchmark -> [[step, accuracy], ...]
    n: dict[str, int]  # items scored per benchmark (final evaluation)
    pass_at: dict[str, dict[str, float]]  # benchmark -> {"k": value} (final evaluation)
    train_s: float = 0.0
    gen_s: float = 0.0
    val_s: float = 0.0
    tokens: float = 0.0
    resp_tokens: float = 0.0
    rollouts: int = 0  # rollout records (the mean response length's denominator)
    wall_s: float = 0.0
    base_pass_at: dict[str, dict[str, float]] = field(default_factory=dict)  # benchmark -> {"k": value} (step-0 evaluation)
    rollouts_consumed: int = 0  # chains sampled in training steps (:func:`consumed_rollouts`)
    rollouts_at: list[list[int]] = field(default_factory=list)  # [[step, rollouts consumed up to it], ...] at each evaluation
    prompts_per_step: int = 0  # the plan's budget: prompts x rollouts per prompt = rollouts per step
    rollouts_per_prompt: int = 0
    rollouts_per_step: int = 0

    @property
    def final(self) -> dict[str, float]:
        return {b: pts[-1][1] for b, pts in self.curves.items() if pts}

    @property
    def base(self) -> dict[str, float]:
        return {b: pts[0][1] for b, pts in self.curves.items() if pts and pts[0][0] == 0}

    @property
    def resp_mean(self) -> float:
        return self.resp_tokens / self.rollouts if self.rollouts else float("nan")

    def efficiency(self) -> dict[str, float]:
        h = 3600.0
        return {
            "train_h": self.train_s / h, "gen_h": self.gen_s / h, "val_h": self.val_s / h,
            "total_h": (self.train_s + self.val_s) / h, "tokens": self.tokens, "resp_mean": self.resp_mean,
            "gen_tok_s": self.tokens / self.gen_s if self.gen_s > 0 else float("nan"), "rollouts": float(self.rollouts_consumed),
        }  # fmt: skip

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainingResult":
        return cls(**d)


def _start_child(spec: RunSpec, cfg: Config) -> str:
    """The training's nested MLflow run: identity's tags plus the comparison's."""
    from srpo_core import tracking

    client = tracking.client(spec.tracking_uri)
    tags = identity.tags(cfg, spec.training_id) | {"comparison_id": spec.comparison_id, "label": spec.label}
    if spec.parent_run_id:
        tags["mlflow.parentRunId"] = spec.parent_run_id
    run = client.create_run(spec.experiment_id, run_name=f"{spec.label} seed {spec.seed}", tags=tags)
    budget = {"rollouts_per_step": str(spec.rollouts_per_step), "rollouts_per_prompt": str(spec.rollouts_per_prompt)}
    tracking.log_params(client, run.info.run_id, tracking.flatten_config(cfg.to_dict()) | budget)
    return run.info.run_id


def add_evaluation(result: TrainingResult, step: int, suite) -> None:
    """Fold one evaluation (evaluate.SuiteResult after `step` updates) into the result."""
    result.val_s += suite.seconds
    result.rollouts_at.append([step, result.rollouts_consumed])
    for b, r in suite.results.items():
        result.curves[b].append([step, r.accuracy])
        result.n[b] = r.n
        result.pass_at[b] = {str(k): v for k, v in r.pass_at.items()}
        if step == 0:
            result.base_pass_at[b] = dict(result.pass_at[b])


def consumed_rollouts(records, metrics: dict[str, float]) -> int:
    """Chains the policy sampled in one training step: every rollout record (trained ones, seeds,
    suffixes, refinements, SCoRe's second attempts) but SPO-Tree's segments (partial chains, each
    continued in its leaves, which are counted), plus the chains the seed search dropped."""
    return sum(1 for r in records if r.role != "segment") + int(metrics.get("rollouts/dropped/count", 0))


def add_step(result: TrainingResult, step_result) -> dict[str, float]:
    """Fold one training step (step.StepResult) into the result; its metrics, with the mean
    response length added (which also lands in metrics.jsonl)."""
    m = step_result.metrics
    lengths = [len(r.rollout.response_ids) for r in step_result.records]
    result.train_s += m.get("time/step", 0.0)
    result.gen_s += sum(m.get(f"time/{k}", 0.0) for k in ("generation", "suffix", "localization"))
    result.tokens += m.get("tokens/generated", 0.0) + m.get("tokens/localization", 0.0)
    result.resp_tokens += sum(lengths)
    result.rollouts += len(lengths)
    consumed = consumed_rollouts(step_result.records, m)
    result.rollouts_consumed += consumed
    m["rollouts/consumed"] = float(consumed)
    m["response/mean_tokens"] = _mean(lengths)
    return m


def run_training(spec: RunSpec | dict) -> TrainingResult:
    """Train one comparison row x seed with the plain loop and evaluate it on the comparison's
    benchmarks at ``spec.eval_steps``; logs into a nested MLflow child run."""
    from tqdm.auto import tqdm

    from srpo_core import tracking
    from srpo_core.evaluate import evaluate_suite
    from srpo_core.loop import open_session, run_steps

    if isinstance(spec, dict):
        spec = RunSpec(**spec)
    t0 = time.perf_counter()
    cfg = from_dict(spec.config)
    out = Path(spec.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(spec.config, indent=1, default=list))
    run_id = _start_child(spec, cfg) if spec.tracking_uri else None
    client = tracking.client(spec.tracking_uri) if run_id else None
    result = TrainingResult(spec.training_id, spec.label, spec.method, spec.split, spec.localizer, spec.seed, spec.steps, run_id, {b: [] for b in spec.benchmarks}, {}, {})
    result.prompts_per_step, result.rollouts_per_prompt, result.rollouts_per_step = cfg.train.prompts_per_step, spec.rollouts_per_prompt, spec.rollouts_per_step
    status = "FAILED"
    session = None
    try:
        session = open_session(cfg)

        def suite_at(step: int):
            return evaluate_suite(
                session.engine,
                cfg,
                spec.benchmarks,
                step,
                run_id=run_id,
                items_per_benchmark=spec.eval_items,
                samples=spec.samples,
                ks=tuple(spec.ks),
                long_prompts=spec.long_prompts,
                progress=spec.progress,
                out_dir=out,
                log_to_mlflow=run_id is not None,
                tracking_uri=spec.tracking_uri,
            )

        if 0 in spec.eval_steps:
            add_evaluation(result, 0, suite_at(0))
        bar = tqdm(run_steps(session, out, spec.steps), total=spec.steps, desc=f"train {spec.label} seed {spec.seed}", disable=not spec.progress, leave=False)
        for step, res in bar:
            m = add_step(result, res)
            if run_id is not None:
                tracking.log_step_metrics(m, step, run_id=run_id, mlflow_client=client)
            bar.set_postfix(reward=f"{m.get('reward/base/mean', float('nan')):.2f}")
            if step + 1 in spec.eval_steps:
                add_evaluation(result, step + 1, suite_at(step + 1))
        bar.close()
        session.learner.save_adapter(out / "adapter")
        status = "FINISHED"
    finally:
        result.wall_s = time.perf_counter() - t0
        (out / "result.json").write_text(json.dumps(result.to_dict(), indent=1))
        if run_id is not None:
            if status == "FINISHED":
                tracking.log_step_metrics({f"efficiency/{k}": v for k, v in result.efficiency().items()} | {"efficiency/wall_s": result.wall_s}, spec.steps, run_id=run_id, mlflow_client=client)
            client.set_terminated(run_id, status)
        session = None  # free the model before the next training
        gc.collect()
    return result


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")

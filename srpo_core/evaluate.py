"""Evaluation through the rollout-engine interface: thought-structured decoding (temperature 0
by default), batched, accuracy per task with the number of items, and pass@k with the unbiased
estimator (Chen et al. 2021) when k samples per item are drawn."""

from __future__ import annotations

from dataclasses import dataclass

from tqdm.auto import tqdm

from srpo_core.config import Config
from srpo_core.engine.base import RolloutEngine, SamplingParams, ThoughtRequest
from srpo_core.pipeline import encode_prompts, limits_of
from srpo_core.tasks import Task, TaskItem


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    prob = 1.0
    for i in range(n - c + 1, n + 1):
        prob *= 1.0 - k / i
    return 1.0 - prob


@dataclass
class EvalResult:
    name: str
    accuracy: float
    n: int
    outcomes: list[dict]
    pass_at: dict[int, float]
    generated_tokens: int


def evaluate(engine: RolloutEngine, task: Task, items: list[TaskItem], cfg: Config, samples: int = 1, ks: tuple[int, ...] = (), seed: int = 0, progress: bool = True, name: str | None = None) -> EvalResult:
    name = name or task.name
    prompts = encode_prompts(engine, cfg, items, source=name)
    sampling = SamplingParams(temperature=cfg.eval.temperature, top_p=1.0 if cfg.eval.temperature == 0 else cfg.rollout.top_p, seed=seed)
    limits = limits_of(cfg)
    outcomes, tokens = [], 0
    bs = cfg.eval.batch_size
    bar = tqdm(total=len(items), desc=f"eval {name}", disable=not progress, leave=False)
    for start in range(0, len(items), bs):
        chunk = list(range(start, min(start + bs, len(items))))
        results = engine.generate_thoughts([ThoughtRequest(tuple(prompts[i]), n=samples) for i in chunk], limits, sampling)
        for i, rollouts in zip(chunk, results):
            rewards = [task.reward(items[i], r.text) for r in rollouts]
            tokens += sum(r.generated_tokens for r in rollouts)
            outcomes.append({"id": items[i].id, "rewards": rewards, "correct": rewards[0] >= 1.0, "response": rollouts[0].text})
        bar.update(len(chunk))
    bar.close()
    accuracy = sum(o["correct"] for o in outcomes) / max(len(outcomes), 1)
    pass_at = {k: sum(pass_at_k(samples, sum(r >= 1.0 for r in o["rewards"]), k) for o in outcomes) / max(len(outcomes), 1) for k in ks if k <= samples}
    return EvalResult(name, accuracy, len(outcomes), outcomes, pass_at, tokens)

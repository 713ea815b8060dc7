"""One epoch step as workflow phases, each a function a Metaflow step calls (flows/):

    plan -> [per shard] generate -> verify -> localize -> suffix -> verify_suffix -> learn -> evaluate

Phases exchange their work through the artifact store (run-scoped, immutable keys); workflow
artifacts carry only keys, ids and metrics. The phases that need no model (`verify`,
`verify_suffix`) import no torch. `learn` writes the step checkpoint (adapter, optimizer state,
rollouts.jsonl, metrics) with its manifest, then moves the training's `latest` pointer: a
training resumes from the last step whose checkpoint is complete.

The seed search of algorithm 2 needs rewards between sampling rounds: `generate` samples the
first round, `verify` scores it, and `localize` (which holds the model) runs any further rounds
with in-process verification, closes the base groups, and localizes the seeds. Base-fill chains
and suffixes are scored in `verify_suffix`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from srpo_core import pipeline
from srpo_core import rollouts as R
from srpo_core import store as S
from srpo_core.config import Config, from_dict, results_config
from srpo_core.engine.base import Rollout
from srpo_core.tasks import TaskItem, get_task

# ---- shard state and its JSON codec -----------------------------------------------------------


@dataclass
class Shard:
    states: list[R.PromptState]
    pending: list[list[Rollout]] = field(default_factory=list)  # unscored chains per state
    fill: list[list[Rollout]] = field(default_factory=list)  # unscored base-fill chains per state
    locs: list[R.Localization] = field(default_factory=list)
    suffixes: list[list[Rollout]] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    rounds: int = 0


def _rollout(d: dict) -> Rollout:
    return Rollout(**{**d, "spans": [tuple(s) for s in d["spans"]]})


def _attempt(d: dict) -> R.Attempt:
    return R.Attempt(_rollout(d["rollout"]), d["reward"])


def _state(d: dict) -> R.PromptState:
    return R.PromptState(
        item=TaskItem(**d["item"]), prompt_ids=d["prompt_ids"], collected=[_attempt(a) for a in d["collected"]],
        seeds=[_attempt(a) for a in d["seeds"]], attempts=d["attempts"], dropped=d["dropped"],
        dropped_tokens=d["dropped_tokens"], base=[_attempt(a) for a in d["base"]],
    )


def shard_to_bytes(shard: Shard) -> bytes:
    return json.dumps(dataclasses.asdict(shard)).encode()


def shard_from_bytes(data: bytes) -> Shard:
    d = json.loads(data)
    return Shard(
        states=[_state(s) for s in d["states"]],
        pending=[[_rollout(r) for r in rs] for rs in d["pending"]],
        fill=[[_rollout(r) for r in rs] for rs in d["fill"]],
        locs=[R.Localization(**l) for l in d["locs"]],
        suffixes=[[_rollout(r) for r in rs] for rs in d["suffixes"]],
        records=d["records"], timings=d["timings"], rounds=d["rounds"],
    )


# ---- context ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepContext:
    """What every phase of one epoch step needs: small and picklable (a workflow artifact)."""

    config: dict
    training_id: str
    step: int
    run_id: str  # the workflow run of this epoch step (scopes its work keys)
    artifact_root: str
    parent_step: int | None  # the checkpoint this step starts from (None: the base model)
    server_url: str = ""  # an inference server holding the base model (empty: load it in-process)

    @property
    def cfg(self) -> Config:
        return from_dict(self.config)

    def work_key(self, shard: int, phase: str, attempt: int = 0) -> str:
        return f"runs/{self.training_id}/work/{self.step:06d}/{self.run_id}/shard{shard:03d}/{phase}-a{attempt}.json"


def open_root(ctx: StepContext) -> S.Store:
    return S.open_store(ctx.artifact_root)


def _put(ctx: StepContext, key: str, shard: Shard) -> str:
    open_root(ctx).put_bytes(key, shard_to_bytes(shard))
    return key


def _get(ctx: StepContext, key: str) -> Shard:
    return shard_from_bytes(open_root(ctx).get_bytes(key))


def plan_shards(ctx: StepContext, n_shards: int) -> list[list[str]]:
    """The step's prompt ids (the data order of pipeline.step_batches), cut into shards."""
    cfg = ctx.cfg
    ids = step_item_ids(cfg, ctx.step)
    n = max(1, min(n_shards, len(ids)))
    return [ids[i::n] for i in range(n)]


def train_items(cfg: Config) -> list[TaskItem]:
    return get_task(cfg.data.task, cfg.data.path).items("train", cfg.data.train_size, cfg.data.data_seed)


def n_steps(cfg: Config) -> int:
    """Epoch steps of a training: over the items the dataset really has (it may hold fewer than
    data.train_size), capped by train.max_steps."""
    total = len(pipeline.step_batches(len(train_items(cfg)), cfg.train.prompts_per_step, cfg.train.epochs, cfg.train.seed))
    return min(total, cfg.train.max_steps) if cfg.train.max_steps else total


def step_item_ids(cfg: Config, step: int, items: list[TaskItem] | None = None) -> list[str]:
    items = train_items(cfg) if items is None else items
    batches = pipeline.step_batches(len(items), cfg.train.prompts_per_step, cfg.train.epochs, cfg.train.seed)
    return [items[i].id for i in batches[step]]


def data_cursor(cfg: Config, step: int) -> dict:
    items = train_items(cfg)
    per_epoch = len(pipeline.step_batches(len(items), cfg.train.prompts_per_step, 1, cfg.train.seed))
    return {"step": step, "epoch": step // per_epoch, "index_in_epoch": step % per_epoch, "item_ids": step_item_ids(cfg, step, items)}


# ---- loading the policy ------------------------------------------------------------------------


def download_checkpoint(ctx: StepContext, step: int, dest: Path) -> Path:
    """Fetch and verify a step checkpoint (sha256 of every file against its manifest)."""
    S.load_step(open_root(ctx), ctx.training_id, step, dest)
    return dest


def adapter_version(step: int | None) -> str:
    """The name of the policy after checkpoint `step` (`base` before any update)."""
    return "base" if step is None else f"step-{step + 1}"


def adapter_uri(ctx: StepContext, step: int) -> str:
    return f"{open_root(ctx).uri.rstrip('/')}/{S.step_prefix(ctx.training_id, step)}/adapter"


def load_engine(ctx: StepContext, step: int | None = None):
    """The policy of checkpoint `step` (default: the parent) behind the engine interface: an
    inference server pinned to that adapter version, or the model loaded in this process."""
    step = ctx.parent_step if step is None else step
    if ctx.server_url:
        from srpo_core.engine.remote import RemoteEngine

        engine = RemoteEngine(ctx.server_url)
        engine.check_ready()
        if step is not None:
            engine.load_adapter(adapter_uri(ctx, step), adapter_version(step))
        engine.adapter_version = adapter_version(step)  # every request pinned to it
        return engine
    import torch
    from transformers import AutoModelForCausalLM

    from srpo_core.engine.hf import HFEngine
    from srpo_core.learner import DTYPES, load_tokenizer
    from srpo_core.train import resolve_model_path, set_threads

    cfg = ctx.cfg
    set_threads(cfg)
    path = resolve_model_path(cfg.model.name_or_path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[cfg.model.dtype])
    if torch.cuda.is_available():
        model = model.cuda()
    if step is not None:
        from peft import PeftModel

        with tempfile.TemporaryDirectory(prefix="srpo-ckpt-") as tmp:  # weights are read into memory
            download_checkpoint(ctx, step, Path(tmp))
            model = PeftModel.from_pretrained(model, str(Path(tmp) / "adapter"))
    return HFEngine(model.eval(), load_tokenizer(path), adapter_version=adapter_version(step))


def items_by_id(cfg: Config, ids: list[str]) -> list[TaskItem]:
    index = {it.id: it for it in train_items(cfg)}
    missing = [i for i in ids if i not in index]
    if missing:
        raise KeyError(f"items {missing[:5]} are not in the training data of task {cfg.data.task!r}")
    return [index[i] for i in ids]


# ---- phases ------------------------------------------------------------------------------------


def phase_generate(ctx: StepContext, shard_index: int, item_ids: list[str], attempt: int = 0) -> str:
    """First round of the seed search (GRPO: the whole group), unscored."""
    cfg, m = ctx.cfg, ctx.cfg.method
    engine = load_engine(ctx)
    items = items_by_id(cfg, item_ids)
    states = [R.PromptState(it, ids) for it, ids in zip(items, pipeline.encode_prompts(engine, cfg, items))]
    timings: dict[str, float] = {}
    with pipeline.timed(timings, "generation"):
        counts = R.round_counts(states, m.method, m.split, m.seed_search_budget, m.rollouts_per_prompt)
        pending = R.sample(engine, states, counts, pipeline.limits_of(cfg), R.round_sampling(phase_sampling(ctx, shard_index, 1), 0))
    return _put(ctx, ctx.work_key(shard_index, "generate", attempt), Shard(states, pending=pending, timings=timings, rounds=1))


def phase_sampling(ctx: StepContext, shard_index: int, phase: int):
    return pipeline.sampling_of(ctx.cfg, pipeline.step_seed(ctx.cfg, ctx.step, phase) + 7919 * shard_index)


def phase_verify(ctx: StepContext, shard_index: int, key: str, attempt: int = 0) -> str:
    """Score the first round and absorb it (seeds, base candidates). No torch."""
    cfg, m = ctx.cfg, ctx.cfg.method
    shard = _get(ctx, key)
    R.absorb_round(get_task(cfg.data.task, cfg.data.path), shard.states, shard.pending, m.method, m.split, m.incorrect_threshold, shard.timings)
    shard.pending = []
    return _put(ctx, ctx.work_key(shard_index, "verify", attempt), shard)


def phase_localize(ctx: StepContext, shard_index: int, key: str, attempt: int = 0) -> str:
    """Finish the seed search, close the base groups (fill chains unscored), localize seeds."""
    cfg, m = ctx.cfg, ctx.cfg.method
    shard = _get(ctx, key)
    engine = load_engine(ctx)
    task = get_task(cfg.data.task, cfg.data.path)
    limits, sampling = pipeline.limits_of(cfg), phase_sampling(ctx, shard_index, 1)
    with pipeline.timed(shard.timings, "generation"):
        shard.rounds, shard.fill = R.finish_seed_search(engine, task, shard.states, m.method, m.split, m.seed_search_budget, m.rollouts_per_prompt, m.incorrect_threshold, limits, sampling, shard.rounds, shard.timings)
    _, shard.locs = pipeline.localize_phase(engine, task, cfg, shard.states, ctx.step * 1000 + shard_index, shard.timings)
    return _put(ctx, ctx.work_key(shard_index, "localize", attempt), shard)


def phase_suffix(ctx: StepContext, shard_index: int, key: str, attempt: int = 0) -> str:
    """Sample G suffixes from each reset prefix x* (prefix encoded once per seed)."""
    cfg = ctx.cfg
    shard = _get(ctx, key)
    engine = load_engine(ctx)
    cases = R.seed_cases(shard.states)
    with pipeline.timed(shard.timings, "suffix"):
        shard.suffixes = R.sample_suffixes(engine, cases, shard.locs, R.SPLITS[cfg.method.split].suffixes, pipeline.limits_of(cfg), phase_sampling(ctx, shard_index, 3))
    return _put(ctx, ctx.work_key(shard_index, "suffix", attempt), shard)


def phase_verify_suffix(ctx: StepContext, shard_index: int, key: str, attempt: int = 0) -> str:
    """Score the base-fill chains and the suffixes; build the shard's rollout records. No torch."""
    cfg = ctx.cfg
    shard = _get(ctx, key)
    task = get_task(cfg.data.task, cfg.data.path)
    start = time.perf_counter()
    for state, rollouts in zip(shard.states, shard.fill):
        state.base.extend(R.verify(task, state.item, rollouts))
    shard.fill = []
    records = R.build_records(task, ctx.step, shard.states, cfg.method.method, shard.locs, shard.suffixes)
    shard.timings["verification"] = shard.timings.get("verification", 0.0) + time.perf_counter() - start
    shard.records = [dataclasses.asdict(r) for r in records]
    return _put(ctx, ctx.work_key(shard_index, "verify_suffix", attempt), shard)


def _record_from_dict(d: dict) -> R.Record:
    return R.Record(**{**d, "rollout": _rollout(d["rollout"]), "item": TaskItem(**d["item"])})


@dataclass(frozen=True)
class StepOutcome:
    step: int
    checkpoint: str  # store prefix of the step checkpoint
    metrics: dict
    manifest_sha: str


def phase_learn(ctx: StepContext, shard_keys: list[str]) -> StepOutcome:
    """Advantages over every group, the LoRA update (in this process, or `train.processes` FSDP
    processes under torchrun), and the step checkpoint + `latest`."""
    from srpo_core.distributed import learn
    from srpo_core.server.canary import CanaryReference
    from srpo_core.train import set_threads

    cfg = ctx.cfg
    set_threads(cfg)
    store = open_root(ctx)
    shards = [_get(ctx, k) for k in shard_keys]
    records = [_record_from_dict(d) for sh in shards for d in sh.records]
    states = [s for sh in shards for s in sh.states]
    timings: dict[str, float] = {}
    for sh in shards:  # shards run in parallel: phase time is the slowest shard's
        for k, v in sh.timings.items():
            timings[k] = max(timings.get(k, 0.0), v)
    pipeline.assign_advantages(records)
    metrics = pipeline.step_metrics(records, states, get_task(cfg.data.task, cfg.data.path), timings, cfg.method.resolved_localizer)
    work = Path(tempfile.mkdtemp(prefix="srpo-learn-"))
    try:
        parent_dir = None
        if ctx.parent_step is not None:
            parent_dir = download_checkpoint(ctx, ctx.parent_step, work / "parent")
        out = work / "out"
        canary = work / "canary.json" if ctx.server_url else None
        metrics.update(learn(cfg, pipeline.train_sequences(records), parent_dir, out, cfg.train.seed + ctx.step, canary_path=canary))
        pipeline.write_records(out / "rollouts.jsonl", records, ctx.step, cfg)
        (out / "metrics.json").write_text(json.dumps(metrics, sort_keys=True))
        parent_key = S.step_prefix(ctx.training_id, ctx.parent_step) if ctx.parent_step is not None else None
        manifest = S.save_step(store, ctx.training_id, ctx.step, out, config=results_config(ctx.config), parent_key=parent_key, data_cursor=data_cursor(cfg, ctx.step))
        if canary is not None:  # hot-load the new adapter and check the server samples from it
            metrics.update(sync_server(ctx, CanaryReference(**json.loads(canary.read_text())), out / "adapter"))
        S.set_latest_step(store, ctx.training_id, ctx.step)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return StepOutcome(ctx.step, S.step_prefix(ctx.training_id, ctx.step), metrics, S.sha256_bytes(manifest.to_json().encode()))


def sync_server(ctx: StepContext, reference, adapter_dir: Path) -> dict[str, float]:
    """Load this step's adapter into the inference server, then the weight-sync canary: the
    server's log-probs of a fixed sequence must match the learner's `reference` (a
    CanaryReference or a Learner), else StaleAdapterError."""
    from srpo_core.engine.remote import RemoteEngine
    from srpo_core.server.app import adapter_sha256
    from srpo_core.server.canary import canary_check

    version = adapter_version(ctx.step)
    server = RemoteEngine(ctx.server_url)
    server.load_adapter(adapter_uri(ctx, ctx.step), version)
    result = canary_check(server, reference, version, expected_sha256=adapter_sha256(adapter_dir))
    return {"canary/max_abs_diff": float(result.max_abs_diff), "canary/mean_abs_diff": float(result.mean_abs_diff)}


def eval_due(cfg: Config, step: int, total_steps: int) -> bool:
    """Evaluate after step `step` (0-based) when every_steps divides step+1, and after the last."""
    every = cfg.eval.every_steps
    return step + 1 == total_steps or (every > 0 and (step + 1) % every == 0)


def phase_evaluate(ctx: StepContext, total_steps: int, progress: bool = True) -> dict[str, dict[str, float]]:
    """Greedy evaluation, keyed by training step: before training (step 0, when this is the first
    epoch step) and after this step's update (step+1) when due. Per-item outcomes go to the store."""
    from srpo_core.evaluate import evaluate

    cfg = ctx.cfg
    store = open_root(ctx)
    out: dict[str, dict[str, float]] = {}
    due = []
    if ctx.parent_step is None:
        due.append((0, None))
    if eval_due(cfg, ctx.step, total_steps):
        due.append((ctx.step + 1, ctx.step))
    sets = [(name, task, task.items("test", cfg.eval.items_per_benchmark, cfg.data.data_seed)) for name, task in ((n, get_task(n)) for n in cfg.eval.benchmarks)] if due else []
    for at, ckpt in due:
        engine = load_engine(ctx, step=ckpt)  # ckpt None only before the first step: the base model
        accs = {}
        for name, task, items in sets:
            res = evaluate(engine, task, items, cfg, progress=progress, name=name)
            accs[name] = res.accuracy
            key = f"runs/{ctx.training_id}/eval/{at:06d}/{ctx.run_id}/{name}.jsonl"
            store.put_bytes(key, "".join(json.dumps(o) + "\n" for o in res.outcomes).encode())
        out[str(at)] = accs
    return out


# ---- the training: resume point -----------------------------------------------------------------


def resume_point(store: S.Store, training_id: str) -> int | None:
    """The last finished epoch step of a training (None: none yet). A step whose checkpoint is
    complete but whose `latest` move was interrupted is adopted."""
    latest = S.get_latest_step(store, training_id)
    nxt = 0 if latest is None else latest + 1
    if store.exists(S.manifest_key(training_id, nxt)):
        S.set_latest_step(store, training_id, nxt)
        return nxt
    return latest

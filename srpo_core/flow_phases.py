"""The flow's phases: one epoch step as Metaflow steps (flows/srpo_step_flow.py), each calling one
function here, which runs the step algorithm of srpo_core/step.py on a shard kept in the store:

    plan -> [per shard] generate -> verify -> localize -> suffix -> verify_suffix -> learn -> evaluate

Phases exchange their work through the artifact store (run-scoped, immutable keys:
store.work_key); workflow artifacts carry only keys, ids and metrics. A phase loads the policy
only when the configured method samples in it (step.needs_model); `verify` and `verify_suffix`
import no torch; a phase the method does not use logs that it has nothing to do and passes its
shard on unchanged. `learn` writes the step checkpoint (adapter, optimizer state,
rollouts.jsonl, metrics) with its manifest, then moves the training's `latest` pointer: a
training resumes from the last step whose checkpoint is complete (store.resume_point).
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from srpo_core import data_order, step
from srpo_core import store as S
from srpo_core.config import Config, from_dict, results_config
from srpo_core.identity import eval_due
from srpo_core.identity import policy_version as adapter_version
from srpo_core.records import write_records
from srpo_core.shard import PhaseContext, Shard, shard_from_bytes, shard_to_bytes

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
    learner_dir: str = ""  # a learner worker of the training (srpo_core/learner_worker.py; empty: learn in this process)

    @property
    def cfg(self) -> Config:
        return from_dict(self.config)

    def work_key(self, shard: int, phase: str, attempt: int = 0) -> str:
        return S.work_key(self.training_id, self.step, self.run_id, shard, phase, attempt)


def open_root(ctx: StepContext) -> S.Store:
    return S.open_store(ctx.artifact_root)


def _put(ctx: StepContext, key: str, shard: Shard) -> str:
    open_root(ctx).put_bytes(key, shard_to_bytes(shard))
    return key


def _get(ctx: StepContext, key: str) -> Shard:
    return shard_from_bytes(open_root(ctx).get_bytes(key))


def plan_shards(ctx: StepContext, n_shards: int) -> list[list[str]]:
    """The step's prompt ids (data_order), cut into shards."""
    ids = data_order.step_item_ids(ctx.cfg, ctx.step)
    n = max(1, min(n_shards, len(ids)))
    return [ids[i::n] for i in range(n)]


# ---- loading the policy ------------------------------------------------------------------------


def download_checkpoint(ctx: StepContext, step_index: int, dest: Path) -> Path:
    """Fetch and verify a step checkpoint (sha256 of every file against its manifest)."""
    S.load_step(open_root(ctx), ctx.training_id, step_index, dest)
    return dest


def adapter_uri(ctx: StepContext, step_index: int) -> str:
    return f"{open_root(ctx).uri.rstrip('/')}/{S.adapter_key(ctx.training_id, step_index)}"


ADAPTER_HASH_FILE = "adapter.sha256"  # beside adapter/ in a step checkpoint: server.adapter_sha256 of it


def adapter_hash(ctx: StepContext, step_index: int) -> str:
    """The content hash of checkpoint `step_index`'s adapter, as the learner recorded it (older
    checkpoints without the record: computed from a verified download)."""
    store = open_root(ctx)
    key = f"{S.step_prefix(ctx.training_id, step_index)}/{ADAPTER_HASH_FILE}"
    if store.exists(key):
        return store.get_bytes(key).decode().strip()
    from srpo_core.server.adapters import adapter_sha256

    with tempfile.TemporaryDirectory(prefix="srpo-hash-") as tmp:
        return adapter_sha256(download_checkpoint(ctx, step_index, Path(tmp)) / "adapter")


def staged_adapter(ctx: StepContext, step_index: int) -> Path:
    """Where a stock vLLM server (`rollout.engine: openai`) reads checkpoint `step_index`'s adapter:
    vLLM's `/v1/load_lora_adapter` takes a path on its own filesystem and no hash. With
    `rollout.lora_dir` the adapter files are fetched from the store, verified against the step's
    manifest, and renamed into `<lora_dir>/<adapter_name(version, sha256)>` (once: the name stands
    for one content, a directory of that name holding other content is refused); without it a
    local artifact store's own adapter directory is used in place (keys are immutable)."""
    from srpo_core.engine.openai_api import adapter_name
    from srpo_core.server.adapters import adapter_sha256

    store, sha = open_root(ctx), adapter_hash(ctx, step_index)
    lora_dir = ctx.cfg.rollout.lora_dir
    if not lora_dir:
        if isinstance(store, S.LocalStore):
            return store.root.joinpath(*S.adapter_key(ctx.training_id, step_index).split("/"))
        raise ValueError(
            f"rollout.engine openai with the artifact root {store.uri}: vLLM loads adapters from a local path only; "
            "set rollout.lora_dir to a directory the phase steps and the vLLM server both mount at the same path"
        )
    dest = Path(lora_dir) / adapter_name(adapter_version(step_index), sha)
    if not dest.is_dir():
        Path(lora_dir).mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".staging-", dir=lora_dir))
        try:
            manifest = S.read_manifest(store, ctx.training_id, step_index)
            files = [rec for rec in manifest.files if rec.path.startswith("adapter/")]
            base = S.step_prefix(ctx.training_id, step_index)
            for rec in files:
                store.get_file(f"{base}/{rec.path}", work.joinpath(*rec.path.split("/")))
            S.verify_files(dataclasses.replace(manifest, files=files), work)
            for path in [work / "adapter", *(work / "adapter").rglob("*")]:
                path.chmod(0o755 if path.is_dir() else 0o644)  # the vLLM server may run as another user
            try:
                (work / "adapter").rename(dest)
            except OSError:  # another phase staged it first: checked below like any existing one
                if not dest.is_dir():
                    raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
    held = adapter_sha256(dest)
    if held != sha:
        raise S.CheckpointIntegrityError(f"{dest} holds an adapter with sha256 {held[:12]}, not checkpoint {step_index}'s {sha[:12]}: remove it (names in rollout.lora_dir stand for one content)")
    return dest


def adapter_source(ctx: StepContext, step_index: int) -> str:
    """What the inference server loads checkpoint `step_index`'s adapter from: the store URI for
    ours, a directory it reads for a stock vLLM server (`staged_adapter`)."""
    return str(staged_adapter(ctx, step_index)) if ctx.cfg.rollout.engine == "openai" else adapter_uri(ctx, step_index)


def load_engine(ctx: StepContext, step_index: int | None = None):
    """The policy of checkpoint `step_index` (default: the parent) behind the engine interface: an
    inference server pinned to that adapter version (ours, or a stock vLLM server with
    `rollout.engine: openai`), or the configured engine (`rollout.engine`) in this process."""
    step_index = ctx.parent_step if step_index is None else step_index
    version = adapter_version(step_index)
    if ctx.server_url:
        from srpo_core.runtime import server_client

        engine = server_client(ctx.cfg, ctx.server_url)
        engine.check_ready()
        if step_index is not None:  # pinned by version and content hash
            engine.load_adapter(adapter_source(ctx, step_index), version, adapter_hash(ctx, step_index))
        engine.adapter_version = version  # every request pinned to it
        return engine
    from srpo_core.runtime import build_engine

    adapter_dir = None
    if step_index is not None:  # kept until the process ends: vLLM reads a LoRA when first used
        work = Path(tempfile.mkdtemp(prefix="srpo-ckpt-"))
        atexit.register(shutil.rmtree, work, True)
        adapter_dir = str(download_checkpoint(ctx, step_index, work) / "adapter")
    return build_engine(ctx.cfg, adapter_dir, version)


# ---- phases ------------------------------------------------------------------------------------


def _phase_context(ctx: StepContext, phase: str, shard_index: int) -> PhaseContext:
    cfg = ctx.cfg
    engine = load_engine(ctx) if step.needs_model(cfg, phase) else None
    return PhaseContext(cfg, data_order.training_task(cfg), ctx.step, shard_index, engine)


def phase_generate(ctx: StepContext, shard_index: int, item_ids: list[str], attempt: int = 0) -> str:
    """The shard's prompts, encoded, and the method's first sampling (unscored)."""
    cfg = ctx.cfg
    pctx = PhaseContext(cfg, data_order.training_task(cfg), ctx.step, shard_index, load_engine(ctx))
    shard = step.start(pctx, data_order.items_by_id(cfg, item_ids))
    step.run_phase("generate", pctx, shard)
    return _put(ctx, ctx.work_key(shard_index, "generate", attempt), shard)


def run_stored_phase(ctx: StepContext, phase: str, shard_index: int, key: str, attempt: int = 0) -> str:
    """Load the shard at `key`, run `phase` of the step algorithm on it, store it; the key of the
    result. A phase the method does not use says so and hands the same key on."""
    if not step.uses(ctx.cfg, phase):
        print(f"epoch step {ctx.step} shard {shard_index}: method {ctx.cfg.method.method} has nothing to do in phase {phase}")
        return key
    shard = _get(ctx, key)
    step.run_phase(phase, _phase_context(ctx, phase, shard_index), shard)
    return _put(ctx, ctx.work_key(shard_index, phase, attempt), shard)


def phase_verify(ctx: StepContext, shard_index: int, key: str, attempt: int = 0) -> str:
    return run_stored_phase(ctx, "verify", shard_index, key, attempt)


def phase_localize(ctx: StepContext, shard_index: int, key: str, attempt: int = 0) -> str:
    return run_stored_phase(ctx, "localize", shard_index, key, attempt)


def phase_suffix(ctx: StepContext, shard_index: int, key: str, attempt: int = 0) -> str:
    return run_stored_phase(ctx, "suffix", shard_index, key, attempt)


def phase_verify_suffix(ctx: StepContext, shard_index: int, key: str, attempt: int = 0) -> str:
    return run_stored_phase(ctx, "verify_suffix", shard_index, key, attempt)


@dataclass(frozen=True)
class StepOutcome:
    step: int
    checkpoint: str  # store prefix of the step checkpoint
    metrics: dict
    manifest_sha: str


def phase_learn(ctx: StepContext, shard_keys: list[str]) -> StepOutcome:
    """Advantages over every group, the LoRA update (in this process, or `train.processes` FSDP
    processes under torchrun), and the step checkpoint + `latest`: in the training's learner
    worker when it has one (this process then imports no torch), else here."""
    if ctx.learner_dir:
        from srpo_core.learner_client import submit

        return StepOutcome(**submit(ctx.learner_dir, ctx, shard_keys, lease=os.environ.get(S.LEASE_ENV, "")))
    return learn_here(ctx, shard_keys)


def learn_here(ctx: StepContext, shard_keys: list[str], lease: str | None = None) -> StepOutcome:
    """`phase_learn` in this process, fenced by the training's lease (`lease`: its to_env form;
    default: $SRPO_LEASE, as flow_driver.launch_step hands it to the steps)."""
    from srpo_core.distributed import learn
    from srpo_core.runtime import set_threads
    from srpo_core.server.canary import CanaryReference

    cfg = ctx.cfg
    set_threads(cfg)
    store = open_root(ctx)
    result = step.finish(cfg, data_order.training_task(cfg), [_get(ctx, k) for k in shard_keys])
    metrics = result.metrics
    work = Path(tempfile.mkdtemp(prefix="srpo-learn-"))
    try:
        parent_dir = None
        if ctx.parent_step is not None:
            parent_dir = download_checkpoint(ctx, ctx.parent_step, work / "parent")
        out = work / "out"
        canary = work / "canary.json" if ctx.server_url else None
        metrics.update(learn(cfg, step.train_sequences(cfg, result.records), parent_dir, out, cfg.train.seed + ctx.step, canary_path=canary))
        cfg.method.spec.finish_records(result.records, checkpoint_dir=out)  # e.g. srppo: credits and P_k from out/critic/
        write_records(out / "rollouts.jsonl", result.records, ctx.step, cfg)
        from srpo_core.server.adapters import adapter_sha256

        (out / ADAPTER_HASH_FILE).write_text(adapter_sha256(out / "adapter") + "\n")
        (out / "metrics.json").write_text(json.dumps(metrics, sort_keys=True))
        parent_key = S.step_prefix(ctx.training_id, ctx.parent_step) if ctx.parent_step is not None else None
        lease = S.Lease.from_env(lease)  # the training's, from flow_driver.launch_step (fencing)
        manifest = S.save_step(store, ctx.training_id, ctx.step, out, config=results_config(ctx.config), parent_key=parent_key, data_cursor=data_order.data_cursor(cfg, ctx.step), lease=lease)
        if canary is not None:  # hot-load the new adapter and check the server samples from it
            metrics.update(sync_server(ctx, CanaryReference(**json.loads(canary.read_text())), out / "adapter"))
        S.set_latest_step(store, ctx.training_id, ctx.step, lease=lease)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return StepOutcome(ctx.step, S.step_prefix(ctx.training_id, ctx.step), metrics, S.sha256_bytes(manifest.to_json().encode()))


def sync_server(ctx: StepContext, reference, adapter_dir: Path) -> dict[str, float]:
    """Load this step's adapter into the inference server, then the weight-sync canary: the
    server's log-probs of a fixed sequence must match the learner's `reference` (a
    CanaryReference or a Learner), else StaleAdapterError."""
    from srpo_core.runtime import server_client
    from srpo_core.server.adapters import adapter_sha256
    from srpo_core.server.canary import canary_check

    version, sha = adapter_version(ctx.step), adapter_sha256(adapter_dir)
    server = server_client(ctx.cfg, ctx.server_url)
    server.load_adapter(adapter_source(ctx, ctx.step), version, sha)
    result = canary_check(server, reference, version, expected_sha256=sha)
    return {"canary/max_abs_diff": float(result.max_abs_diff), "canary/mean_abs_diff": float(result.mean_abs_diff)}


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
    sets = [(name, task, task.items("test", cfg.eval.items_per_benchmark, cfg.data.data_seed)) for name, task in ((n, data_order.eval_task(cfg, n)) for n in cfg.eval.benchmarks)] if due else []
    for at, ckpt in due:
        engine = load_engine(ctx, step_index=ckpt)  # ckpt None only before the first step: the base model
        accs = {}
        for name, task, items in sets:
            res = evaluate(engine, task, items, cfg, progress=progress, name=name)
            accs[name] = res.accuracy
            store.put_bytes(S.eval_key(ctx.training_id, at, ctx.run_id, name), "".join(json.dumps(o) + "\n" for o in res.outcomes).encode())
        out[str(at)] = accs
    return out

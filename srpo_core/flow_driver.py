"""The flow driver behind flows/srpo_flow.py: prepare (fail fast, resume point, MLflow run),
launch one epoch-step run (flows/srpo_step_flow.py, whose steps call srpo_core/flow_phases.py) per
step through Metaflow's Runner, log what it returns, summarise. Each function is one flow step's
work; the flow only stores what they return."""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from srpo_core import data_order, identity
from srpo_core import store as S
from srpo_core.config import Config, ConfigError, from_dict, results_config

PHASES = ("generation", "localization", "suffix", "learner", "evaluation", "verification")
DEFAULT_RESOURCES = {"cpu": 1, "gpu": 0, "memory": 4096, "timeout_minutes": 120, "shared_memory": None}  # shared_memory: MB of /dev/shm (Kubernetes)
STEP_FLOW = Path(__file__).resolve().parent.parent / "flows" / "srpo_step_flow.py"


def parse_config(text: str) -> dict:
    """Metaflow Config parser: YAML -> validated Config -> dict with every phase's resources."""
    data = yaml.safe_load(text) or {}
    cfg = from_dict(data)
    out = cfg.to_dict()
    res = dict(cfg.resources)
    for phase in PHASES:
        res[phase] = {**DEFAULT_RESOURCES, **(res.get(phase) or {})}
    res.setdefault("image", "")
    res.setdefault("shards", 1)
    out["resources"] = res
    return out


def default_config_path(_ctx=None) -> str:
    """`SRPO_CONFIG` (a preset name or a YAML file), default the `tiny` preset."""
    from srpo_core.config import resolve_config_path

    name = os.environ.get("SRPO_CONFIG", "tiny")
    try:
        return str(resolve_config_path(name))
    except ConfigError as exc:
        raise ConfigError(f"SRPO_CONFIG: {exc}") from None


def apply_overrides(cfg_dict: dict, method: str, split: str, localizer: str, seed: int, sets: str, steps: int) -> Config:
    """The flow's parameters (empty / negative: not given) over its config, by identity's rules."""
    over = identity.flag_overrides(method=method or None, split=split or None, localizer=localizer or None, seed=seed if seed >= 0 else None, steps=steps or None, sets=shlex.split(sets or ""))
    return from_dict(cfg_dict).override(**over) if over else from_dict(cfg_dict)


@dataclass
class Plan:
    config: dict
    training_id: str
    artifact_root: str
    total_steps: int
    next_step: int
    mlflow_run_id: str
    tracking_uri: str
    lease: str = ""  # the training's lease (store.Lease.to_env): renewed per step, handed to the phases


def prepare(cfg: Config, training_id: str = "", experiment: str = "srpo") -> Plan:
    """Everything that can fail cheaply, before any model is loaded: data, store, MLflow."""
    from srpo_core import tracking

    data_order.check_sources(cfg)  # a missing data file fails here, in one line naming it
    items = data_order.train_items(cfg)
    if len(items) < cfg.train.prompts_per_step:
        raise ValueError(f"data.task {cfg.data.task!r} has {len(items)} training items < train.prompts_per_step={cfg.train.prompts_per_step}")
    store = S.open_store()
    store.check_reachable()
    uri = tracking.check_tracking_reachable()
    if cfg.rollout.server_url not in ("", "auto"):
        from srpo_core.engine.remote import RemoteEngine

        RemoteEngine(cfg.rollout.server_url).check_ready()  # fails fast, naming the URL
    tid = training_id or identity.training_id(cfg)
    lease = S.acquire_lease(store, tid, S.LeaseHolder.current(**_lease_holder()))  # a second writer is refused here
    last = S.resume_point(store, tid, lease=lease)
    resumed = last is not None
    if resumed:
        old = S.read_manifest(store, tid, last)
        if old.config_hash != S.config_hash(results_config(cfg.to_dict())):
            lease.release(store)
            raise ConfigError(f"training {tid!r} was started with another config (hash {old.config_hash}); resume it with the same config and flags (resources, rollout.server_url, train.processes and model.threads may change)")
    tags = identity.tags(cfg, tid)
    run_id = find_mlflow_run(tid, experiment)
    with tracking.start_training_run(experiment, run_name=tid, tags=tags, params=tracking.flatten_config(cfg.to_dict()), run_id=run_id) as run:
        mlflow_run_id = run.run_id
    return Plan(cfg.to_dict(), tid, store.uri, data_order.n_steps(cfg, items), 0 if last is None else last + 1, mlflow_run_id, uri, lease.to_env())


def _lease_holder() -> dict:
    """The lease holder of this training: the Metaflow runtime (the parent of this task, alive for
    the whole training) and its run, or this process outside a flow."""
    try:
        from metaflow import current

        if current.is_running_flow:
            return {"pid": os.getppid(), "metaflow_run": f"{current.flow_name}/{current.run_id}"}
    except ImportError:
        pass
    return {}


def find_mlflow_run(training_id: str, experiment: str) -> str | None:
    import mlflow

    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = mlflow.search_runs([exp.experiment_id], filter_string=f"tags.training_id = '{training_id}'", output_format="list", max_results=1)
    return runs[0].info.run_id if runs else None


def inherited_options(argv: list[str]) -> dict:
    """Metaflow top-level options of this task's own command line (datastore, metadata,
    environment, --with), to launch epoch-step runs the same way this training runs."""
    keys = {"--datastore": "datastore", "--datastore-root": "datastore_root", "--metadata": "metadata", "--environment": "environment"}
    out: dict = {}
    decospecs = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, _, inline = arg.partition("=")
        if name in keys or name == "--with":
            value = inline if inline else (argv[i + 1] if i + 1 < len(argv) else "")
            i += 0 if inline else 1
            if name == "--with":
                if value and not value.startswith(("retry", "resources")):
                    decospecs.append(value)
            elif value:
                out[keys[name]] = value
        elif arg in ("step", "run", "resume"):
            break
        i += 1
    if decospecs:
        out["decospecs"] = decospecs
    return out


def kubernetes_env(cfg: Config) -> dict[str, str]:
    """The container image of the config's `resources.image` for steps run with --with kubernetes
    (Metaflow reads METAFLOW_KUBERNETES_CONTAINER_IMAGE); an image set in the environment wins."""
    image = str(cfg.resources.get("image") or "")
    if image and not os.environ.get("METAFLOW_KUBERNETES_CONTAINER_IMAGE"):
        return {"METAFLOW_KUBERNETES_CONTAINER_IMAGE": image}
    return {}


@dataclass
class StepReport:
    step: int
    metaflow_run: str
    metrics: dict
    evaluations: dict
    wall_seconds: float
    phase_seconds: float


def launch_step(plan: Plan, step: int, show_output: bool = True, argv: list[str] | None = None) -> StepReport:
    """Run epoch step `step` as its own Metaflow run (SRPOStepFlow) and wait for it."""
    cfg = from_dict(plan.config)
    options = inherited_options(sys.argv if argv is None else argv)
    ctx = {"training_id": plan.training_id, "step": step, "artifact_root": plan.artifact_root, "parent_step": step - 1 if step > 0 else None, "total_steps": plan.total_steps}
    tags = [f"training_id:{plan.training_id}", f"method:{cfg.method.method}", f"seed:{cfg.train.seed}", f"step:{step}"]
    env = {"SRPO_ARTIFACT_ROOT": plan.artifact_root, "MLFLOW_TRACKING_URI": plan.tracking_uri, "USERNAME": os.environ.get("USERNAME", "srpo"), **kubernetes_env(cfg)}
    if plan.lease:  # renewed per step; the learner checks it before it commits
        plan.lease = S.Lease.from_env(plan.lease).renew(S.open_store(plan.artifact_root)).to_env()
        env[S.LEASE_ENV] = plan.lease
        options["decospecs"] = [*options.get("decospecs", []), f'environment:vars={{"{S.LEASE_ENV}": "{plan.lease}"}}']  # into pods (Kubernetes) too
    start = time.perf_counter()
    with inference_server(cfg, plan.artifact_root) as (url, token):
        ctx["server_url"] = url
        if token:  # to the phase steps by environment only: never a parameter or an artifact
            env["SRPO_SERVER_TOKEN"] = token
        elif os.environ.get("SRPO_SERVER_TOKEN_FILE"):
            env["SRPO_SERVER_TOKEN_FILE"] = os.environ["SRPO_SERVER_TOKEN_FILE"]
        return _run_step(plan, step, ctx, tags, env, options, show_output, start)


@contextmanager
def inference_server(cfg: Config, artifact_root: str):
    """(URL, bearer token) of the server the phase steps call: none ("", ""), a local one for this
    epoch step ("auto": a fresh token, adapters only from `artifact_root`), or the configured URL
    (its token from $SRPO_SERVER_TOKEN, or $SRPO_SERVER_TOKEN_FILE read by the steps)."""
    if cfg.rollout.server_url != "auto":
        yield cfg.rollout.server_url, os.environ.get("SRPO_SERVER_TOKEN", "")
        return
    from srpo_core.runtime import resolve_model_path
    from srpo_core.server.launch import start_server

    with start_server(resolve_model_path(cfg.model.name_or_path), dtype=cfg.model.dtype, threads=cfg.model.threads or None, artifact_roots=[artifact_root]) as handle:
        yield handle.url, handle.token


def _run_step(plan: Plan, step: int, ctx: dict, tags: list[str], env: dict, options: dict, show_output: bool, start: float) -> "StepReport":
    from metaflow import Runner

    with Runner(str(STEP_FLOW), show_output=show_output, env=env, file_read_timeout=600, config_value=[("config", plan.config)], **options) as runner:
        result = runner.run(context=json.dumps(ctx), tags=tags)
        run = result.run
        if run is None or not run.successful:
            raise RuntimeError(f"epoch step {step} of {plan.training_id} failed: Metaflow run {getattr(run, 'pathspec', '?')} (status {result.status})\n{failure_report(run, result)}")
        end = run["end"].task.data
        report = StepReport(step, run.pathspec, dict(end.metrics), dict(end.evaluations), time.perf_counter() - start, float(end.phase_seconds))
    return report


def failure_report(run, result) -> str:
    """The failed tasks of an epoch-step run with the tail of their stderr."""
    lines = []
    for stp in run or []:
        for task in stp:
            if not task.successful:
                lines.append(f"--- {task.pathspec} (python {STEP_FLOW} logs {task.pathspec}) ---")
                lines.append("\n".join(task.stderr.splitlines()[-25:]))
    return "\n".join(lines) if lines else result.stderr[-3000:]


def log_report(plan: Plan, report: StepReport) -> None:
    import mlflow

    from srpo_core import tracking

    mlflow.set_tracking_uri(plan.tracking_uri)
    mlflow.MlflowClient().set_tag(plan.mlflow_run_id, f"metaflow_run.step_{report.step:04d}", report.metaflow_run)
    metrics = dict(report.metrics)
    metrics["time/orchestration_overhead"] = report.wall_seconds - report.phase_seconds
    metrics["time/epoch_step_wall"] = report.wall_seconds
    tracking.log_step_metrics(metrics, report.step, run_id=plan.mlflow_run_id)
    for at, accs in report.evaluations.items():
        tracking.log_eval(accs, int(at), run_id=plan.mlflow_run_id)



def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def finish(plan: Plan, reports: list[StepReport]) -> dict:
    """Summary table, learning-curve and reset-index plots to MLflow, and where to look."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow
    from rich.console import Console
    from rich.table import Table

    from srpo_core import tracking

    cfg = from_dict(plan.config)
    mlflow.set_tracking_uri(plan.tracking_uri)
    client = mlflow.MlflowClient()
    run = client.get_run(plan.mlflow_run_id)
    eval_keys = sorted(k for k in run.data.metrics if k.startswith("eval/"))
    curves = {k: _history(client, plan.mlflow_run_id, k) for k in eval_keys}
    reward = {k: _history(client, plan.mlflow_run_id, k) for k in ("reward/base/mean", "reward/shared_prefix/mean", "reward/fallback/mean") if k in run.data.metrics}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for k, pts in {**curves, **reward}.items():
        ax = axes[0] if k.startswith("eval/") else axes[1]
        ax.plot([s for s, _ in pts], [v for _, v in pts], marker="o", label=k)
    axes[0].set(title="evaluation accuracy", xlabel="training step")
    axes[1].set(title="training reward", xlabel="training step")
    hist: dict[int, float] = {}
    for key, value in run.data.metrics.items():
        if key.startswith("reset/index_hist/"):
            for _, v in _history(client, plan.mlflow_run_id, key):
                hist[int(key.rsplit("/", 1)[1])] = hist.get(int(key.rsplit("/", 1)[1]), 0.0) + v
    if hist:
        axes[2].bar(list(hist), list(hist.values()))
    axes[2].set(title="reset index h* (all steps)", xlabel="thought")
    for ax in axes[:2]:
        if ax.lines:
            ax.legend(fontsize=7)
    tracking.log_figure(fig, "plots/training.png", run_id=plan.mlflow_run_id)
    plt.close(fig)
    rows = []
    for k, pts in curves.items():
        rows.append([k.split("/")[1], pts[0][1] if pts else float("nan"), pts[-1][1] if pts else float("nan"), pts[-1][0] if pts else 0])
    if rows:
        tracking.log_table({"benchmark": [r[0] for r in rows], "before": [r[1] for r in rows], "after": [r[2] for r in rows], "step": [r[3] for r in rows]}, "accuracy", run_id=plan.mlflow_run_id)
    client.set_terminated(plan.mlflow_run_id, "FINISHED")
    if plan.lease:
        S.Lease.from_env(plan.lease).release(S.open_store(plan.artifact_root))
    wall = sum(r.wall_seconds for r in reports)
    overhead = sum(r.wall_seconds - r.phase_seconds for r in reports)
    table = Table(title=f"training {plan.training_id}")
    for col in ("method", "split", "localizer", "steps", "benchmark", "acc. before", "acc. after", "step time", "orchestration"):
        table.add_column(col)
    for r in rows or [["-", float("nan"), float("nan"), 0]]:
        table.add_row(cfg.method.method, cfg.method.split, cfg.method.resolved_localizer, str(plan.total_steps), r[0], f"{r[1]:.3f}", f"{r[2]:.3f}", f"{wall:.0f}s", f"{overhead:.0f}s")
    console = Console(width=200)
    console.print(table)
    console.print(f"MLflow:    mlflow ui --backend-store-uri {plan.tracking_uri}   (run {plan.mlflow_run_id})")
    console.print(f"artifacts: {plan.artifact_root}/runs/{plan.training_id}/")
    console.print(f"resume:    python flows/srpo_flow.py run --training-id {plan.training_id}")
    return {"training_id": plan.training_id, "accuracy": {r[0]: {"before": r[1], "after": r[2]} for r in rows}, "wall_seconds": wall, "orchestration_seconds": overhead, "mlflow_run_id": plan.mlflow_run_id}

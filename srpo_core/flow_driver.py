"""The flow driver behind flows/srpo_flow.py: prepare (fail fast, resume point, MLflow run),
launch one epoch-step run (flows/srpo_step_flow.py, whose steps call srpo_core/flow_phases.py) per
step through Metaflow's Runner, log what it returns, summarise. Each function is one flow step's
work; the flow only stores what they return."""

from __future__ import annotations

import json
import os
import re
import shlex
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from srpo_core import data_order, identity
from srpo_core import store as S
from srpo_core.audit import read_records
from srpo_core.config import Config, ConfigError, from_dict, results_config
from srpo_core.flow_config import DEFAULT_RESOURCES, PHASES, default_config_path, parse_config  # noqa: F401  (re-exported)
from srpo_core.watchdog import alive

STEP_FLOW = Path(__file__).resolve().parent.parent / "flows" / "srpo_step_flow.py"


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
    log_path: str = ""  # the epoch-step runs' task logs (local file)
    server_url: str = ""  # the training's own inference server (rollout.server_url: auto)
    server_pid: int = 0  # its watchdog
    learner_dir: str = ""  # the training's own learner worker (rollout.server_url: auto)
    learner_pid: int = 0  # its watchdog
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
        from srpo_core.runtime import server_client

        server_client(cfg, cfg.rollout.server_url).check_ready()  # fails fast, naming the URL (ours, or a vLLM server: rollout.engine openai)
    tid = training_id or identity.training_id(cfg)
    lease = S.acquire_lease(store, tid, S.LeaseHolder.current(**_lease_holder()))  # a second writer is refused here
    last = S.resume_point(store, tid, lease=lease)
    resumed = last is not None
    if resumed:
        old = S.read_manifest(store, tid, last)
        if old.config_hash != S.config_hash(results_config(cfg.to_dict())):
            lease.release(store)
            may_change = "resources, rollout.server_url, train.processes and model.threads may change"
            raise ConfigError(f"training {tid!r} was started with another config (hash {old.config_hash}); resume it with the same config and flags ({may_change})")
    tags = identity.tags(cfg, tid)
    run_id = find_mlflow_run(tid, experiment)
    with tracking.start_training_run(experiment, run_name=tid, tags=tags, params=tracking.flatten_config(cfg.to_dict()), run_id=run_id) as run:
        mlflow_run_id = run.run_id
    return Plan(cfg.to_dict(), tid, store.uri, data_order.n_steps(cfg, items), 0 if last is None else last + 1, mlflow_run_id, uri, log_path=str(step_log_path(tid)), lease=lease.to_env())


def announce(plan: Plan) -> None:
    """The training's first progress event: its id, steps, and where the task logs go."""
    from srpo_core import progress

    progress.emit({"type": "training", "training_id": plan.training_id, "total_steps": plan.total_steps, "first_step": plan.next_step, "log_path": plan.log_path, "artifacts": plan.artifact_root})


def step_log_path(training_id: str) -> Path:
    """Where the epoch-step runs' task logs of a training go: `SRPO_LOG_DIR` (default ./srpo_logs)
    /<training_id>/steps.log, appended on resume."""
    return (Path(os.environ.get("SRPO_LOG_DIR") or "srpo_logs") / training_id / "steps.log").resolve()


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


def launch_step(plan: Plan, step: int, show_output: bool = False, argv: list[str] | None = None) -> StepReport:
    """Run epoch step `step` as its own Metaflow run (SRPOStepFlow) and wait for it. Its task logs
    go to `plan.log_path` (and to stdout with `show_output`); the phase running is reported to
    the progress display (srpo_core/progress.py)."""
    cfg = from_dict(plan.config)
    options = inherited_options(sys.argv if argv is None else argv)
    ctx = {"training_id": plan.training_id, "step": step, "artifact_root": plan.artifact_root, "parent_step": step - 1 if step > 0 else None, "total_steps": plan.total_steps}
    tags = [f"training_id:{plan.training_id}", f"method:{cfg.method.method}", f"seed:{cfg.train.seed}", f"step:{step}"]
    env = {"SRPO_ARTIFACT_ROOT": plan.artifact_root, "MLFLOW_TRACKING_URI": plan.tracking_uri, **kubernetes_env(cfg)}
    start = time.perf_counter()
    if options.get("decospecs") and cfg.rollout.server_url == "auto":  # steps run elsewhere (--with kubernetes): no local services
        cfg = cfg.override(**{"rollout.server_url": ""})
    if plan.lease:  # renewed per step; the learner checks it before it commits
        plan.lease = S.Lease.from_env(plan.lease).renew(S.open_store(plan.artifact_root)).to_env()
        env[S.LEASE_ENV] = plan.lease
        options["decospecs"] = [*options.get("decospecs", []), f'environment:vars={{"{S.LEASE_ENV}": "{plan.lease}"}}']  # into pods (Kubernetes) too
    with inference_server(cfg, plan) as (url, token):
        ctx["server_url"] = url
        ctx["learner_dir"] = plan.learner_dir if plan.learner_pid and alive(plan.learner_pid) else ""
        # the token reaches the phase steps by environment only: never a parameter or an artifact
        if token:
            env["SRPO_SERVER_TOKEN"] = token
        elif plan.server_url and url == plan.server_url:  # ("" hides a token of another server from this one's callers)
            env.update({"SRPO_SERVER_TOKEN": "", "SRPO_SERVER_TOKEN_FILE": server_token_file(plan)})
        elif os.environ.get("SRPO_SERVER_TOKEN_FILE"):
            env["SRPO_SERVER_TOKEN_FILE"] = os.environ["SRPO_SERVER_TOKEN_FILE"]
        return _run_step(plan, step, StepLaunch(ctx, tags, env, options, show_output), start)


# ---- the inference server of a training ----------------------------------------------------------


@contextmanager
def inference_server(cfg: Config, plan: Plan):
    """(URL, bearer token) of the server the phase steps call: none ("", ""), the training's own
    ("auto": started once by `start_training_server`; its token is in `server_token_file`, so ""
    here), a local one for this epoch step when the plan has none ("auto": a fresh token, adapters
    only from the plan's artifact root), or the configured URL (its token from $SRPO_SERVER_TOKEN,
    or $SRPO_SERVER_TOKEN_FILE read by the steps)."""
    if cfg.rollout.server_url != "auto":
        yield cfg.rollout.server_url, os.environ.get("SRPO_SERVER_TOKEN", "")
        return
    if plan.server_url:
        from srpo_core.server.launch import http_status

        if http_status(plan.server_url + "/ready") != 200:  # e.g. a `resume` of this flow, whose start step was not rerun
            start_training_server(plan, watch_pid=os.getppid())
        yield plan.server_url, ""
        return
    from srpo_core.runtime import resolve_model_path
    from srpo_core.server.launch import start_server

    with start_server(resolve_model_path(cfg.model.name_or_path), dtype=cfg.model.dtype, threads=cfg.model.threads or None, artifact_roots=[plan.artifact_root]) as handle:
        yield handle.url, handle.token


def start_training_server(plan: Plan, watch_pid: int) -> None:
    """`rollout.server_url: auto`: the training's local services, started once for all its epoch
    steps: an inference server holding the base model (each step hot-loads its adapter), so the
    sampling phases import no torch and load no model, and a learner worker
    (srpo_core/learner_worker.py) that keeps torch and the learner code imported, so the learner
    step imports neither. Both outlive the flow step that starts them and stop in
    `stop_training_server` (the flow's `end`, or a failed step), or by themselves when process
    `watch_pid` (the Metaflow runtime of this training) is gone: a killed training leaves neither."""
    cfg = from_dict(plan.config)
    if cfg.rollout.server_url != "auto" or inherited_options(sys.argv).get("decospecs"):  # --with kubernetes: phases run in pods, which cannot reach it
        return
    from srpo_core.runtime import resolve_model_path
    from srpo_core.server.launch import start_server

    home = Path(plan.log_path).parent
    token_file = Path(server_token_file(plan))
    token_file.parent.mkdir(parents=True, exist_ok=True)
    args = {"dtype": cfg.model.dtype, "threads": cfg.model.threads or None, "artifact_roots": [plan.artifact_root], "workdir": home / "server", "command_prefix": watchdog_prefix(watch_pid)}
    handle = start_server(resolve_model_path(cfg.model.name_or_path), **args)
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # the steps and the learner worker read it; never an artifact
    with os.fdopen(fd, "w") as f:
        f.write(handle.token)
    plan.server_url, plan.server_pid = handle.url, handle.process.pid  # the watchdog's pid: SIGTERM reaches the server through it
    plan.learner_dir, plan.learner_pid = str(home / "learner"), start_learner_worker(home / "learner", watch_pid, {"SRPO_SERVER_TOKEN": "", "SRPO_SERVER_TOKEN_FILE": str(token_file)})


def server_token_file(plan: Plan) -> str:
    """The bearer token of the training's own server (mode 0600, beside its log)."""
    return str(Path(plan.log_path).parent / "server" / "token")


def start_learner_worker(workdir: Path, watch_pid: int, env: dict[str, str] | None = None) -> int:
    """Start the learner worker (under the watchdog); its watchdog's pid. The learner step waits
    for it to be ready (`learner_worker.submit` polls), so this does not."""
    import subprocess

    from srpo_core import learner_worker

    learner_worker.prepare_dir(workdir)
    (workdir / "pid").unlink(missing_ok=True)
    cmd = [*watchdog_prefix(watch_pid), sys.executable, "-m", "srpo_core.learner_worker", "--dir", str(workdir)]
    with open(workdir / "worker.log", "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    return proc.pid


def watchdog_prefix(watch_pid: int) -> list[str]:
    return [sys.executable, "-m", "srpo_core.watchdog", "--watch-pid", str(watch_pid), "--"]


def _stop(pid: int, grace_s: float) -> None:
    """SIGTERM a watchdog (it forwards it), SIGKILL its process group if it lingers."""
    import signal

    if not pid or not alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and alive(pid):
        time.sleep(0.2)
    if alive(pid):
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def stop_training_server(plan: Plan, grace_s: float = 15.0) -> None:
    """Stop the training's local services (server and learner worker), if it has them."""
    import shutil

    for pid in (plan.server_pid, plan.learner_pid):
        _stop(pid, grace_s)
    had = plan.server_pid or plan.learner_pid
    plan.server_pid = plan.learner_pid = 0
    if had:
        shutil.rmtree(Path(plan.log_path).parent / "server" / "cache", ignore_errors=True)
        Path(server_token_file(plan)).unlink(missing_ok=True)


# ---- one epoch-step run ------------------------------------------------------------------------


@dataclass
class StepLaunch:
    ctx: dict
    tags: list[str]
    env: dict
    options: dict
    show_output: bool


TASK_START = re.compile(r"\[[^/\]\s]+/(?P<step>[A-Za-z_][A-Za-z0-9_]*)/[^\s\]]+ \(pid \d+\)\] Task is starting")


def _run_step(plan: Plan, step: int, launch: StepLaunch, start: float) -> "StepReport":
    """The epoch-step run through Runner's async API: its stdout/stderr are followed while it
    runs, appended to the training's log file, and each task start is reported as the phase."""
    import asyncio

    from srpo_core import progress
    from srpo_core.metaflow_env import runner

    Runner = runner()
    log_path = Path(plan.log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)

    def on_line(line: str) -> None:
        m = TASK_START.search(line)
        if m:
            progress.emit({"type": "phase", "step": step, "phase": m.group("step")})

    async def drive():
        async with Runner(str(STEP_FLOW), env=launch.env, file_read_timeout=600, config_value=[("config", plan.config)], **launch.options) as mf_runner:
            executing = await mf_runner.async_run(context=json.dumps(launch.ctx), tags=launch.tags)
            with open(log_path, "a", encoding="utf-8") as log:
                log.write(f"===== epoch step {step}: Metaflow run {executing.run.pathspec if executing.run else '?'} =====\n")
                await follow(executing.command_obj, log, on_line, launch.show_output)
            await executing.wait()
            return executing

    executing = asyncio.run(drive())
    run = executing.run
    if executing.returncode != 0 or run is None or not run.successful:
        progress.emit({"type": "failed", "step": step, "message": f"Metaflow run {getattr(run, 'pathspec', '?')}"})
        where = f"Metaflow run {getattr(run, 'pathspec', '?')} (status {executing.status}); its task logs: {log_path}"
        raise RuntimeError(f"epoch step {step} of {plan.training_id} failed: {where}\n{failure_report(run, executing)}")
    end = run["end"].task.data
    report = StepReport(step, run.pathspec, dict(end.metrics), dict(end.evaluations), time.perf_counter() - start, float(end.phase_seconds))
    shown = {k: v for k, v in report.metrics.items() if k.startswith(("reward/", "pass_rate/"))}
    progress.emit({"type": "step_done", "step": step, "wall": report.wall_seconds, "metrics": shown, "evaluations": report.evaluations})
    return report


async def follow(command, log, on_line, echo: bool, poll_s: float = 0.2) -> None:
    """Append the run's stdout and stderr to `log` as they grow (whole lines), until it exits."""
    import asyncio

    files = {name: open(command.log_files[name], encoding="utf-8", errors="replace") for name in ("stdout", "stderr")}
    partial = dict.fromkeys(files, "")
    try:
        while True:
            finished = command.process.returncode is not None
            for name, f in files.items():
                *lines, partial[name] = (partial[name] + f.read()).split("\n")
                for line in lines:
                    log.write(line + "\n")
                    on_line(line)
                    if echo:
                        print(line, file=sys.stdout if name == "stdout" else sys.stderr, flush=True)
            log.flush()
            if finished:
                for rest in partial.values():
                    if rest:
                        log.write(rest + "\n")
                return
            await asyncio.sleep(poll_s)
    finally:
        for f in files.values():
            f.close()


def failure_report(run, executing) -> str:
    """The failed tasks of an epoch-step run with their whole stderr (the traceback)."""
    lines = []
    for stp in run or []:
        for task in stp:
            if not task.successful:
                lines.append(f"--- {task.pathspec} (python {STEP_FLOW} logs {task.pathspec}) ---")
                lines.append(task.stderr.rstrip())
    return "\n".join(lines) if lines else executing.stderr[-6000:]


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


# ---- the summary: query (MLflow, store) -> compute (pure) -> plot -> print ----------------------


@dataclass
class History:
    """What the summary reads back: metric histories from the training's MLflow run, and the
    per-item evaluation outcomes and rollout records from the store."""

    curves: dict[str, list[tuple[int, float]]]  # eval/<benchmark>/accuracy -> [(step, value)]
    reward: dict[str, list[tuple[int, float]]]
    reset_hist: dict[int, float]  # reset index -> count over all steps
    metrics: dict[str, float]  # the run's latest metric values
    outcomes: dict[str, dict[int, list[dict]]]  # benchmark -> evaluated step -> per-item outcomes
    records: list[dict]  # every step's rollouts.jsonl lines


def collect_history(plan: Plan, client) -> History:
    run = client.get_run(plan.mlflow_run_id)
    keys = run.data.metrics
    curves = {k: _history(client, plan.mlflow_run_id, k) for k in sorted(keys) if k.startswith("eval/") and k.endswith("/accuracy")}
    reward = {k: _history(client, plan.mlflow_run_id, k) for k in ("reward/base/mean", "reward/shared_prefix/mean", "reward/fallback/mean") if k in keys}
    hist: dict[int, float] = {}
    for key in keys:
        if key.startswith("reset/index_hist/"):
            index = int(key.rsplit("/", 1)[1])
            hist[index] = hist.get(index, 0.0) + sum(v for _, v in _history(client, plan.mlflow_run_id, key))
    store = S.open_store(plan.artifact_root)
    outcomes: dict[str, dict[int, list[dict]]] = {}
    for key in store.list(f"runs/{plan.training_id}/eval/"):  # runs/<tid>/eval/<step>/<run>/<benchmark>.jsonl
        at, _, name = key.split("/")[3], key.split("/")[4], key.rsplit("/", 1)[1].removesuffix(".jsonl")
        outcomes.setdefault(name, {})[int(at)] = read_records(store.get_bytes(key).decode(), key)
    records = []
    for step in range(plan.total_steps):
        try:  # one read per step; a step without records has no key
            key = f"{S.step_prefix(plan.training_id, step)}/rollouts.jsonl"
            records += read_records(store.get_bytes(key).decode(), key)
        except S.KeyNotFoundError:
            pass
    return History(curves, reward, hist, dict(keys), outcomes, records)


@dataclass(frozen=True)
class Gain:
    """Accuracy after minus before on the same items, with its paired 95% interval."""

    benchmark: str
    before: float
    after: float
    at_step: int
    n: int
    gain: float
    low: float
    high: float


def paired_gain(benchmark: str, before: list[dict], after: list[dict], at_step: int) -> Gain:
    """Mean of d_i = correct_after_i - correct_before_i over the items scored both times, with a
    normal 95% interval mean(d) +- 1.96 sd(d) / sqrt(n) (sd with ddof 1; n of a few hundred)."""
    b = {o["id"]: float(o["correct"]) for o in before if not o.get("skipped")}
    a = {o["id"]: float(o["correct"]) for o in after if not o.get("skipped")}
    ids = sorted(set(a) & set(b))
    d = [a[i] - b[i] for i in ids]
    n = len(d)
    mean = sum(d) / n if n else float("nan")
    half = 1.96 * statistics.stdev(d) / n**0.5 if n > 1 else float("nan")
    return Gain(benchmark, sum(b[i] for i in ids) / n if n else float("nan"), sum(a[i] for i in ids) / n if n else float("nan"), at_step, n, mean, mean - half, mean + half)


def gains(history: History) -> list[Gain]:
    """Per benchmark: the last evaluation against the one before training (step 0)."""
    out = []
    for name, by_step in sorted(history.outcomes.items()):
        if 0 in by_step and len(by_step) > 1:
            last = max(by_step)
            out.append(paired_gain(name, by_step[0], by_step[last], last))
    return out


def training_figure(history: History):
    """Evaluation accuracy and training reward per step, and the reset-index histogram."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), layout="constrained")
    for k, pts in {**history.curves, **history.reward}.items():
        ax = axes[0] if k.startswith("eval/") else axes[1]
        ax.plot([s for s, _ in pts], [v for _, v in pts], marker="o", label=k)
    axes[0].set(title="evaluation accuracy", xlabel="training step")
    axes[1].set(title="training reward", xlabel="training step")
    if history.reset_hist:
        axes[2].bar(list(history.reset_hist), list(history.reset_hist.values()))
    axes[2].set(title="reset index h* (all steps)", xlabel="thought")
    for ax in axes[:2]:
        if ax.lines:
            ax.legend(fontsize=7, loc="best")
    return fig


def print_summary(plan: Plan, cfg: Config, rows: list[Gain], reports: list[StepReport], console) -> None:
    from rich.table import Table

    wall = sum(r.wall_seconds for r in reports)
    overhead = sum(r.wall_seconds - r.phase_seconds for r in reports)
    table = Table(title=f"training {plan.training_id}")
    for col in ("method", "split", "localizer", "steps", "benchmark", "items", "acc. before", "acc. after", "gain [95% CI]", "step time", "orchestration"):
        table.add_column(col)
    tags = identity.tags(cfg, plan.training_id)
    for g in rows or [Gain("-", float("nan"), float("nan"), 0, 0, float("nan"), float("nan"), float("nan"))]:
        table.add_row(
            tags["method"],
            tags["split"],
            tags["localizer"],
            str(plan.total_steps),
            g.benchmark,
            str(g.n),
            f"{g.before:.3f}",
            f"{g.after:.3f}",
            f"{g.gain:+.3f} [{g.low:+.3f}, {g.high:+.3f}]",
            f"{wall:.0f}s",
            f"{overhead:.0f}s",
        )
    console.print(table)
    console.print(f"MLflow:    mlflow ui --backend-store-uri {plan.tracking_uri}   (run {plan.mlflow_run_id})")
    if reports:
        median = statistics.median(r.wall_seconds - r.phase_seconds for r in reports)
        console.print(f"orchestration per epoch step: median {median:.1f} s over {len(reports)} (time/orchestration_overhead)")
    console.print(f"artifacts: {plan.artifact_root}/runs/{plan.training_id}/")
    console.print(f"task logs: {plan.log_path}")
    console.print(f"resume:    python flows/srpo_flow.py run --training-id {plan.training_id}")


def finish(plan: Plan, reports: list[StepReport]) -> dict:
    """The end of a training: read back its history, log the figures (training curves, the
    localization audit, the critic's reliability) and the accuracy table with the paired gain to
    MLflow, close the run, print the summary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow
    from rich.console import Console

    from srpo_core import audit, tracking

    cfg = from_dict(plan.config)
    mlflow.set_tracking_uri(plan.tracking_uri)
    client = mlflow.MlflowClient()
    history = collect_history(plan, client)
    figures = {
        "plots/training.png": training_figure(history),
        "plots/localization_audit.png": audit.plot_audit(history.records, title=f"Localization audit ({plan.training_id})") if history.records else None,
    }
    if "critic/ece" in history.metrics:
        from srpo_core import critic

        figures["plots/critic_reliability.png"] = critic.reliability_figure(*critic.reliability_from_metrics(history.metrics))
    for name, fig in figures.items():
        if fig is not None:
            tracking.log_figure(fig, name, run_id=plan.mlflow_run_id)
            plt.close(fig)
    rows = gains(history)
    if rows:
        tracking.log_table(
            {
                "benchmark": [g.benchmark for g in rows],
                "before": [g.before for g in rows],
                "after": [g.after for g in rows],
                "step": [g.at_step for g in rows],
                "items": [g.n for g in rows],
                "gain": [g.gain for g in rows],
                "gain_low95": [g.low for g in rows],
                "gain_high95": [g.high for g in rows],
            },
            "accuracy",
            run_id=plan.mlflow_run_id,
        )
    client.set_terminated(plan.mlflow_run_id, "FINISHED")
    if plan.lease:
        S.Lease.from_env(plan.lease).release(S.open_store(plan.artifact_root))
    print_summary(plan, cfg, rows, reports, Console(width=200))
    return {
        "training_id": plan.training_id, "accuracy": {g.benchmark: {"before": g.before, "after": g.after, "gain": g.gain, "gain_ci95": [g.low, g.high], "items": g.n} for g in rows},
        "wall_seconds": sum(r.wall_seconds for r in reports), "orchestration_seconds": sum(r.wall_seconds - r.phase_seconds for r in reports), "mlflow_run_id": plan.mlflow_run_id,
    }  # fmt: skip

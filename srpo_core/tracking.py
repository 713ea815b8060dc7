"""Thin MLflow helpers for training runs: URI resolution, fail-fast checks, params, metrics, artifacts.

Tracking URI
    ``$MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<cwd>/mlflow.db`` (artifacts of runs logged that
    way go to ``<cwd>/mlruns``). Browse a local store with::

        mlflow ui --backend-store-uri sqlite:///mlflow.db

    For a team server set ``MLFLOW_TRACKING_URI=http://host:5000``;
    :func:`check_tracking_reachable` fails within a few seconds, naming the server, when it is down.

Experiments
    :func:`ensure_experiment` creates an experiment tagged ``mlflow.experimentKind =
    custom_model_development`` so that MLflow 3's UI opens it in the model-training view, not the
    GenAI one; :func:`experiment_url` gives a UI link that asks for that view.

Runs
    :func:`start_training_run` creates (or, given ``run_id``, resumes) the active run, so separate
    Metaflow steps can log into one MLflow run. Metrics go through ``MlflowClient.log_batch``
    (:func:`log_step_metrics`), non-finite values are dropped with a warning. Benchmark accuracies
    are logged as ``eval/<benchmark>/accuracy`` (:func:`log_eval`).

mlflow is imported lazily inside functions: importing it takes seconds, and light steps that only
flatten a config should not pay for it. This module must not import torch.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import re
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"
DEFAULT_DB_NAME = "mlflow.db"
MAX_PARAM_VALUE_LEN = 500  # the historical MLflow / Databricks limit; newer servers accept 6000
MAX_KEY_LEN = 250
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
_BAD_KEY_CHARS = re.compile(r"[^\w./\- :]")
# MLflow 3's UI shows an experiment in its GenAI view or its model-training view; the bundled UI
# (mlflow/server/js, 3.x) reads the kind from this experiment tag (values of its ExperimentKind
# enum: "genai_development", "custom_model_development", ...) and, in newer releases, from the
# `workflowType` URL parameter ("genai" | "machine_learning") or the user's last choice.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
WORKFLOW_TYPE_QUERY = "workflowType=machine_learning"


class TrackingUnreachableError(ConnectionError):
    """The MLflow tracking server / store cannot be used."""


class ParamConflictError(ValueError):
    """A resumed run was given parameter values that differ from the ones it was logged with."""


@dataclass(frozen=True)
class TrainingRun:
    """An active MLflow run started by :func:`start_training_run`; a context manager that ends it."""

    run_id: str
    experiment_id: str
    run_name: str | None
    tracking_uri: str
    resumed: bool

    def __enter__(self) -> TrainingRun:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        end_training_run("FINISHED" if exc_type is None else "FAILED")


# ----------------------------------------------------------------------------------- tracking URI


def default_tracking_uri() -> str:
    """``sqlite:///<cwd>/mlflow.db``."""
    return f"sqlite:///{Path.cwd() / DEFAULT_DB_NAME}"


def resolve_tracking_uri(uri: str | None = None) -> str:
    """Explicit ``uri``, else ``$MLFLOW_TRACKING_URI``, else :func:`default_tracking_uri`."""
    return uri or os.environ.get(ENV_TRACKING_URI) or default_tracking_uri()


def _http_get(url: str, timeout: float) -> int:
    """Status code of a GET (HTTP errors included); raises OSError on connection problems."""
    headers = {}
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    elif user and password:
        import base64

        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    request = urllib.request.Request(url, headers=headers, method="GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _check_http(uri: str, timeout: float) -> None:
    base = uri.rstrip("/")
    try:
        if _http_get(f"{base}/health", timeout) == 200:
            return
        status = _http_get(f"{base}/api/2.0/mlflow/experiments/search?max_results=1", timeout)
    except (OSError, ValueError) as exc:  # URLError, timeouts, refused connections, bad URLs
        raise TrackingUnreachableError(
            f"MLflow tracking server {uri} is unreachable ({exc}); start it or fix {ENV_TRACKING_URI}"
        ) from exc
    if status in (401, 403):
        raise TrackingUnreachableError(
            f"MLflow tracking server {uri} rejected the credentials (HTTP {status}); "
            "set MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN"
        )
    if status != 200:
        raise TrackingUnreachableError(
            f"MLflow tracking server {uri} answered HTTP {status} to /health and to the REST API"
        )


def _check_local(uri: str) -> None:
    path = uri[len("sqlite:///") :] if uri.startswith("sqlite:///") else urlsplit(uri).path
    target = Path(path) if uri.startswith("file:") else Path(path).parent
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrackingUnreachableError(f"MLflow tracking store {uri}: cannot create {target}: {exc}") from exc
    if not os.access(target, os.W_OK):
        raise TrackingUnreachableError(f"MLflow tracking store {uri}: {target} is not writable")


def check_tracking_reachable(uri: str | None = None, timeout: float = 3.0) -> str:
    """Fail fast (TrackingUnreachableError naming the server) if the tracking store is unusable.

    http(s): GET ``/health`` (falling back to the REST API) with ``timeout`` seconds;
    sqlite / file: the directory must be creatable and writable. Other schemes (databricks, ...)
    are not probed. Returns the resolved URI.
    """
    uri = resolve_tracking_uri(uri)
    scheme = urlsplit(uri).scheme
    if scheme in ("http", "https"):
        _check_http(uri, timeout)
    elif scheme in ("sqlite", "file") or scheme == "":
        _check_local(uri if scheme else f"file://{Path(uri).resolve()}")
    return uri


# -------------------------------------------------------------------------------------- params


def _clean_key(key: str) -> str:
    cleaned = _BAD_KEY_CHARS.sub("_", key)
    if len(cleaned) > MAX_KEY_LEN:
        digest = hashlib.sha256(cleaned.encode()).hexdigest()[:8]
        cleaned = f"{cleaned[: MAX_KEY_LEN - 9]}-{digest}"
    return cleaned


def _param_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value), default=str, separators=(",", ":"))
    return str(value)


def truncate_value(value: str, max_len: int = MAX_PARAM_VALUE_LEN) -> str:
    """Cut ``value`` to ``max_len`` chars, ending in a hash of the full value so distinct values stay distinct."""
    if len(value) <= max_len:
        return value
    suffix = f"...[sha256:{hashlib.sha256(value.encode()).hexdigest()[:12]}]"
    return value[: max_len - len(suffix)] + suffix


def flatten_config(
    config: Mapping[str, Any], *, sep: str = ".", max_value_len: int = MAX_PARAM_VALUE_LEN
) -> dict[str, str]:
    """Nested mapping -> ``{"a.b.c": "value"}`` ready for MLflow params.

    Lists/tuples become compact JSON, other leaves ``str(value)``; empty mappings ``"{}"``.
    Keys are cleaned to MLflow's allowed characters; values longer than ``max_value_len``
    are truncated with a hash suffix (see :func:`truncate_value`).
    """
    flat: dict[str, str] = {}

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{sep}{key}" if prefix else str(key)
            if isinstance(value, Mapping) and value:
                walk(value, name)
            else:
                text = "{}" if isinstance(value, Mapping) else _param_value(value)
                flat[_clean_key(name)] = truncate_value(text, max_value_len)

    walk(config, "")
    return flat


# ---------------------------------------------------------------------------------------- runs


_current_uri: str | None = None  # set by start_training_run; later helpers log to the same store


def client(uri: str | None = None):
    """An MlflowClient for ``uri``, else for the store this module logs to."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri or _current_uri or resolve_tracking_uri())


def _active_run_id(run_id: str | None) -> str:
    if run_id:
        return run_id
    import mlflow

    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("no active MLflow run: call start_training_run() first or pass run_id")
    return run.info.run_id


def _param_conflicts(run_id: str, params: Mapping[str, str], existing: Mapping[str, str]) -> None:
    changed = {k: (existing[k], v) for k, v in params.items() if k in existing and existing[k] != v}
    if changed:
        detail = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items()))
        raise ParamConflictError(f"run {run_id} was logged with different params ({detail}); start a new run")


def log_params(mlflow_client, run_id: str, params: Mapping[str, str]) -> None:
    """Log ``params`` (strings) in batches."""
    from mlflow.entities import Param

    batch = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(batch), MAX_PARAMS_PER_BATCH):
        mlflow_client.log_batch(run_id, params=batch[i : i + MAX_PARAMS_PER_BATCH])


def _log_new_params(run_id: str, params: Mapping[str, str], existing: Mapping[str, str]) -> None:
    log_params(client(), run_id, {k: v for k, v in params.items() if k not in existing})


def start_training_run(
    experiment: str,
    run_name: str | None = None,
    tags: Mapping[str, Any] | None = None,
    params: Mapping[str, Any] | None = None,
    run_id: str | None = None,
    *,
    tracking_uri: str | None = None,
) -> TrainingRun:
    """Start (or resume ``run_id``) the active run in ``experiment`` and log ``tags`` and ``params``.

    ``params`` may be nested (it is passed through :func:`flatten_config`). On resume, params already
    logged with the same value are skipped and a different value raises :class:`ParamConflictError`
    before the run is touched. Any active run in this process is ended first.
    """
    global _current_uri
    import mlflow

    uri = resolve_tracking_uri(tracking_uri)
    mlflow.set_tracking_uri(uri)
    _current_uri = uri
    if mlflow.active_run() is not None:
        mlflow.end_run()
    str_tags = {str(k): str(v) for k, v in (tags or {}).items()}
    flat = flatten_config(params or {})
    if run_id is not None:
        existing = dict(client().get_run(run_id).data.params)
        _param_conflicts(run_id, flat, existing)
        run = mlflow.start_run(run_id=run_id)
        if str_tags:
            mlflow.set_tags(str_tags)
    else:
        existing = {}
        exp = mlflow.set_experiment(experiment_id=ensure_experiment(client(), experiment))
        run = mlflow.start_run(experiment_id=exp.experiment_id, run_name=run_name, tags=str_tags)
    try:
        _log_new_params(run.info.run_id, flat, existing)
    except Exception:
        mlflow.end_run("FAILED")
        raise
    return TrainingRun(
        run_id=run.info.run_id,
        experiment_id=run.info.experiment_id,
        run_name=run.info.run_name,
        tracking_uri=uri,
        resumed=run_id is not None,
    )


def ensure_experiment(mlflow_client, name: str) -> str:
    """The id of experiment `name` (created if missing), tagged to open in MLflow 3's model-training
    view: `mlflow.experimentKind = custom_model_development` (an experiment without the tag is
    tagged; one that already has a kind keeps it). MLflow 3.x UIs that read the view from the
    tag open it there; newer UIs take it from the `workflowType` URL parameter instead, which
    :func:`experiment_url` sets."""
    exp = mlflow_client.get_experiment_by_name(name)
    if exp is None:
        return mlflow_client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    if EXPERIMENT_KIND_TAG not in (exp.tags or {}):
        mlflow_client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


def experiment_url(tracking_uri: str, experiment_id: str, run_id: str | None = None) -> str | None:
    """The MLflow UI link of an experiment (or run) in the model-training view, for an http(s)
    tracking server; None for a local store (open it with `mlflow ui --backend-store-uri ...`,
    then the same path under http://127.0.0.1:5000)."""
    if urlsplit(tracking_uri).scheme not in ("http", "https"):
        return None
    route = f"#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{tracking_uri.rstrip('/')}/{route}?{WORKFLOW_TYPE_QUERY}"


def end_training_run(status: str = "FINISHED") -> None:
    """End the active run (``FINISHED``, ``FAILED`` or ``KILLED``); no-op without one."""
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.end_run(status)


# ------------------------------------------------------------------------------------- metrics


def _finite_metrics(metrics: Mapping[str, Any], step: int) -> dict[str, float]:
    kept, dropped = {}, []
    for key, value in metrics.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            dropped.append(f"{key}={value!r}")
            continue
        if math.isfinite(number):
            kept[_clean_key(str(key))] = number
        else:
            dropped.append(f"{key}={number}")
    if dropped:
        warnings.warn(
            f"step {step}: not logging non-finite/non-numeric metrics: {', '.join(dropped)}", stacklevel=3
        )
    return kept


def log_step_metrics(metrics: Mapping[str, float], step: int, *, run_id: str | None = None, mlflow_client=None) -> int:
    """Log ``metrics`` at ``step`` in batches (active run unless ``run_id``; this module's store
    unless ``mlflow_client``); returns how many were logged."""
    from mlflow.entities import Metric

    rid = _active_run_id(run_id)
    kept = _finite_metrics(metrics, step)
    now = int(time.time() * 1000)
    batch = [Metric(key, value, now, int(step)) for key, value in kept.items()]
    mlflow_client = mlflow_client or client()
    for i in range(0, len(batch), MAX_METRICS_PER_BATCH):
        mlflow_client.log_batch(rid, metrics=batch[i : i + MAX_METRICS_PER_BATCH])
    return len(batch)


def eval_metric_key(benchmark: str) -> str:
    return f"eval/{benchmark}/accuracy"


def log_eval(benchmark_accuracies: Mapping[str, float], step: int, *, run_id: str | None = None) -> int:
    """Log each benchmark accuracy as ``eval/<benchmark>/accuracy`` at ``step``."""
    return log_step_metrics(
        {eval_metric_key(name): acc for name, acc in benchmark_accuracies.items()}, step, run_id=run_id
    )


# ----------------------------------------------------------------------------------- artifacts


def log_figure(figure: Any, artifact_file: str, *, run_id: str | None = None, dpi: int = 150) -> str:
    """Save a matplotlib ``figure`` as PNG artifact ``artifact_file`` (``.png`` added if missing)."""
    rid = _active_run_id(run_id)
    if not artifact_file.lower().endswith(".png"):
        artifact_file += ".png"
    artifact_dir, _, name = artifact_file.rpartition("/")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        figure.savefig(path, format="png", dpi=dpi, bbox_inches="tight")
        client().log_artifact(rid, str(path), artifact_path=artifact_dir or None)
    return artifact_file


Table = Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]]


def _table_rows(table: Table) -> tuple[list[str], list[list[Any]]]:
    """(columns, rows) from a list of row dicts or a dict of columns."""
    if isinstance(table, Mapping):
        columns = [str(c) for c in table]
        lengths = {len(v) for v in table.values()}
        if len(lengths) > 1:
            raise ValueError(f"table columns have different lengths: {sorted(lengths)}")
        return columns, [list(row) for row in zip(*table.values())]
    columns: list[str] = []
    for row in table:
        columns.extend(str(c) for c in row if str(c) not in columns)
    return columns, [[row.get(c, "") for c in columns] for row in table]


def _markdown_cell(value: Any) -> str:
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def table_to_markdown(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(_markdown_cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_markdown_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def table_to_csv(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    return buf.getvalue()


def log_table(
    table: Table,
    name: str,
    *,
    artifact_dir: str = "tables",
    run_id: str | None = None,
) -> tuple[str, str]:
    """Log a table (row dicts or column dict) as ``<artifact_dir>/<name>.csv`` and ``.md``; returns both paths."""
    rid = _active_run_id(run_id)
    columns, rows = _table_rows(table)
    mlflow_client = client()
    with tempfile.TemporaryDirectory() as tmp:
        csv_path, md_path = Path(tmp) / f"{name}.csv", Path(tmp) / f"{name}.md"
        csv_path.write_text(table_to_csv(columns, rows), encoding="utf-8")
        md_path.write_text(table_to_markdown(columns, rows), encoding="utf-8")
        for path in (csv_path, md_path):
            mlflow_client.log_artifact(rid, str(path), artifact_path=artifact_dir or None)
    prefix = f"{artifact_dir}/" if artifact_dir else ""
    return f"{prefix}{name}.csv", f"{prefix}{name}.md"

"""MLflow's UI compares methods: runs with ``eval/<benchmark>/accuracy`` on a real `mlflow server`,
opened on MLflow 3's compare-runs page in headless Chromium (DOM dump + screenshot).

Chromium comes from `.ci/install-chromium.sh` (Debian package `chromium`). Without it the test is
skipped, unless ``$CI`` is set, where it fails. The screenshot is saved under pytest's tmp dir and
copied to ``$SRPO_TEST_ARTIFACTS`` when that is set.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import pytest

BENCHMARKS = ("synthetic", "commonsenseqa")
# final accuracies per method (distinct, so each one must show up in the rendered page)
FINAL = {"grpo": (0.412, 0.208), "rrpo": (0.475, 0.236), "srpo": (0.538, 0.264)}
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
)  # fmt: skip


def chromium_binary() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    reason = "chromium is not installed (run .ci/install-chromium.sh)"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI is set, so the MLflow UI test must run")
    pytest.skip(reason)


def compare_runs_url(server: str, run_ids: list[str], experiment_ids: list[str]) -> str:
    """MLflow 3's hash route (Routes.getCompareRunPageRoute in the bundled UI):
    ``#/compare-runs?runs=[...]&experiments=[...]`` with JSON lists."""
    query = "runs=" + urllib.parse.quote(json.dumps(run_ids), safe="") + "&experiments=" + urllib.parse.quote(json.dumps(experiment_ids), safe="")
    return f"{server}/#/compare-runs?{query}"


def chromium(binary: str, profile: Path, *args: str, budget_ms: int = 15000) -> subprocess.CompletedProcess:
    cmd = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


@pytest.fixture
def comparison_runs(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.create_experiment(f"ui-compare-{tmp_path.name}")
    run_ids = []
    for method, finals in FINAL.items():
        run = client.create_run(exp, run_name=f"{method.upper()} seed 0", tags={"method": method, "seed": "0", "split": "1x4", "comparison_id": "ui-test"})
        rid = run.info.run_id
        client.log_param(rid, "method.method", method)
        for b, final in zip(BENCHMARKS, finals):
            for step, acc in ((0, 0.3), (1, (0.3 + final) / 2), (2, final)):
                client.log_metric(rid, f"eval/{b}/accuracy", acc, step=step)
        client.set_terminated(rid)
        run_ids.append(rid)
    return exp, run_ids


def test_compare_runs_page_shows_per_benchmark_accuracy(mlflow_server, comparison_runs, tmp_path):
    binary = chromium_binary()
    exp, run_ids = comparison_runs
    url = compare_runs_url(mlflow_server, run_ids, [exp])
    expected_values = {f"{v:g}" for finals in FINAL.values() for v in finals}

    dom, result = "", None
    for attempt, budget in enumerate((15000, 30000, 60000)):  # a busy machine renders slowly
        result = chromium(binary, tmp_path / f"profile-dom-{attempt}", "--window-size=1600,1200", "--dump-dom", url, budget_ms=budget)
        dom = result.stdout
        shown = set(re.findall(r'<span tooltip-data-state="closed">([^<]*)</span>', dom))
        if expected_values <= shown:
            break
    assert result is not None and result.returncode == 0, result.stderr[-2000:]
    assert "Comparing 3 Runs" in dom, dom[:2000]
    for b in BENCHMARKS:
        assert f"eval/{b}/accuracy" in dom
    for method in FINAL:
        assert f"{method.upper()} seed 0" in dom
    values = set(re.findall(r'<span tooltip-data-state="closed">([^<]*)</span>', dom))
    assert expected_values <= values, f"metric values rendered: {sorted(values)}"

    shot = tmp_path / "mlflow_compare_runs.png"
    result = chromium(binary, tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1600,2000", url)
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    artifacts = os.environ.get("SRPO_TEST_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(artifacts) / shot.name)

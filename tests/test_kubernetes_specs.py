"""The Kubernetes form of the epoch-step flow, compiled with `argo-workflows create --only-json`
against a loopback S3 server: GPU limits on the model steps only, the image from the paper
preset, retries and timeouts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from srpo_core.config import load_config
from srpo_core.flow_driver import kubernetes_env

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def test_argo_compile_of_paper_preset(tmp_path, s3_server, s3_bucket):
    pytest.importorskip("kubernetes", reason="argo-workflows compile needs the kubernetes package (test extra)")
    cfg = load_config("paper")
    env = {
        **os.environ, "USERNAME": "srpo-tests", "SRPO_CONFIG": "paper",
        "METAFLOW_S3_ENDPOINT_URL": s3_server, "METAFLOW_DEFAULT_DATASTORE": "s3",
        "METAFLOW_DATASTORE_SYSROOT_S3": f"s3://{s3_bucket}/metaflow",
        "METAFLOW_KUBERNETES_NAMESPACE": "srpo", "METAFLOW_KUBERNETES_SERVICE_ACCOUNT": "srpo-runner",
        **kubernetes_env(cfg),
    }
    p = subprocess.run(
        [sys.executable, str(ROOT / "flows" / "srpo_step_flow.py"), "--datastore=s3", "argo-workflows", "create", "--only-json"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stderr[-3000:]
    spec = json.loads(p.stdout[p.stdout.index("{"):])
    templates = {t["name"]: t for t in spec["spec"]["templates"] if "container" in t and t["name"] != "error-msg-capture-hook"}
    gpus = {name: int(t["container"]["resources"].get("limits", {}).get("nvidia.com/gpu", 0)) for name, t in templates.items()}
    res = cfg.resources
    assert gpus["learner"] == res["learner"]["gpu"] == 4
    assert gpus["generate"] == gpus["localize"] == gpus["suffix"] == res["generation"]["gpu"] == 1
    assert gpus["evaluate"] == 1
    assert gpus["verify"] == gpus["verify-suffix"] == gpus["start"] == gpus["join"] == gpus["end"] == 0
    assert {t["container"]["image"] for t in templates.values()} == {res["image"]}
    learner = templates["learner"]["container"]["resources"]["requests"]
    assert float(learner["cpu"]) == res["learner"]["cpu"] and learner["memory"].startswith(str(res["learner"]["memory"]))
    for name in ("generate", "verify", "localize", "suffix", "verify-suffix"):
        assert templates[name]["retryStrategy"]["limit"] == 1, name
    assert templates["learner"]["activeDeadlineSeconds"] == 240 * 60
    # the FSDP processes of the learner talk through /dev/shm: a memory-backed volume of the preset's size
    shm = [v for v in templates["learner"].get("volumes", []) if v.get("emptyDir", {}).get("medium") == "Memory"]
    assert [v["emptyDir"]["sizeLimit"] for v in shm] == [f"{res['learner']['shared_memory']}Mi"]
    mounts = {m["name"]: m["mountPath"] for m in templates["learner"]["container"].get("volumeMounts", [])}
    assert mounts[shm[0]["name"]] == "/dev/shm"
    assert templates["generate"]["activeDeadlineSeconds"] == 120 * 60

"""`srpo train` end to end on the tiny preset (the plain loop, no workflow engine)."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_srpo_train_cli_prints_accuracy_and_writes_records(tmp_path, tiny_model_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "srpo_core.cli", "train", "--config", "tiny", "--method", "srpo", "--localizer", "oracle", "--steps", "2", "--seed", "0", "--out", str(out),
           "--set", f"model.name_or_path={tiny_model_path}", "--set", "eval.items_per_benchmark=40", "--set", "train.prompts_per_step=8", "--set", "train.mini_batch_prompts=4"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "method=srpo split=1x4 localizer=oracle steps=2" in p.stdout
    line = next(l for l in p.stdout.splitlines() if l.startswith("accuracy before:"))
    before, after = float(line.split()[2]), float(line.split()[4])
    assert 0.0 <= before <= 1.0 and 0.0 <= after <= 1.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accuracy_before"] == pytest.approx(before, abs=5e-4) and summary["steps"] == 2
    assert summary["accuracy_after"] == pytest.approx(after, abs=5e-4)
    for step in (0, 1):
        rows = [json.loads(l) for l in (out / "steps" / f"{step:06d}" / "rollouts.jsonl").read_text().splitlines()]
        kinds = {r["group"] for r in rows}
        assert kinds <= {"base", "shared_prefix", "seed", "fallback"}
        trainable = [r for r in rows if r["group"] != "seed"]
        assert len(trainable) == 8 * 8  # budget of 8 per prompt
        for r in rows:
            if r["group"] == "seed":  # the oracle resets at the true first wrong thought
                assert r["reset_index"] == min(r["oracle_first_error"], len(r["thoughts"]))
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1] and sum(m["learner/optimizer_steps"] for m in metrics) >= 1
    assert (out / "adapter" / "adapter_model.safetensors").exists()


def test_bad_config_fails_with_file_line_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method:\n  method: srpo\n  split: 4x4\n")
    p = subprocess.run([sys.executable, "-m", "srpo_core.cli", "train", "--config", str(bad)], capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and f"{bad}:3: method.split: one of" in p.stderr

"""`srpo score`: agreement with intended verdicts, input order, summary, and errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAIRS = REPO / "tests" / "data" / "math_answer_pairs.jsonl"


def srpo_score(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "srpo_core.cli", "score", *args],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=120,
    )


def test_math_pairs_agree_with_intended_verdicts():
    pairs = [json.loads(line) for line in PAIRS.read_text().splitlines() if line.strip()]
    assert len(pairs) >= 60
    assert {p["expected"] for p in pairs} == {True, False}
    done = srpo_score(str(PAIRS), "--workers", "2")
    assert done.returncode == 0, done.stderr
    out = [json.loads(line) for line in done.stdout.splitlines()]
    assert [o["line"] for o in out] == list(range(1, len(pairs) + 1))
    assert all(isinstance(o["correct"], bool) and isinstance(o["score"], float) for o in out)
    misses = [(p["gold"], p["response"], p["expected"]) for p, o in zip(pairs, out) if o["correct"] != p["expected"]]
    known = [(p["gold"], p["response"], p["expected"]) for p in pairs if p.get("known_miss")]
    assert misses == known  # the verifier is deterministic: only the pairs marked known_miss (tests/test_verifiers_math.py)
    assert f"scored {len(pairs)} lines" in done.stderr
    assert "math500: n=" in done.stderr


def test_mixed_benchmarks_in_order(tmp_path):
    lines = [
        {"benchmark": "commonsenseqa", "gold": "A", "response": "\\boxed{A}", "choices": {"label": list("ABCDE"), "text": list("abcde")}},
        {"benchmark": "strategyqa", "gold": False, "response": "so yes"},
        {"benchmark": "sciknoweval_biology", "gold": "Yes", "response": "\\boxed{Yes}"},
        {"benchmark": "sciknoweval_chemistry", "gold": "NH4 + NO2 = 2H2O + 2N", "response": "NH4 + NO2 = 2H2O + 2N"},
        {"benchmark": "hmmt_nov_2025", "gold": "1/91", "response": "\\boxed{\\frac{1}{91}}"},
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    done = srpo_score(str(path))
    assert done.returncode == 0, done.stderr
    out = [json.loads(line) for line in done.stdout.splitlines()]
    assert [o["correct"] for o in out] == [True, False, True, True, True]
    assert [o["extracted"] for o in out] == ["A", "yes", "yes", None, "\\frac{1}{91}"]
    assert "scored 5 lines, 4 correct" in done.stderr


def test_unboxed_math_scores_zero_unless_math_fallback(tmp_path):
    lines = [
        {"benchmark": "aime24", "gold": "113", "response": "Hence m + n = 113."},
        {"benchmark": "aime24", "gold": "113", "response": "First \\boxed{13}, then corrected: \\boxed{113}"},
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    default = [json.loads(line) for line in srpo_score(str(path)).stdout.splitlines()]
    assert [(o["correct"], o["reason"]) for o in default] == [(False, "no_answer"), (True, "correct")]
    done = srpo_score(str(path), "--math-fallback")
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["correct"] for line in done.stdout.splitlines()] == [True, True]


@pytest.mark.skipif(os.geteuid() != 0, reason="the isolated sandbox needs root")
def test_code_record(tmp_path):
    tests = [{"input": "3\n", "output": "6", "testtype": "stdin"}, {"input": "5\n", "output": "10", "testtype": "stdin"}]
    record = {"benchmark": "livecodebench_medium", "tests": json.dumps(tests),
              "response": "```python\nn = int(input())\nprint(n * 2 if n < 4 else n)\n```"}
    path = tmp_path / "code.jsonl"
    path.write_text(json.dumps(record) + "\n")
    done = srpo_score(str(path))
    assert done.returncode == 0, done.stderr
    (out,) = [json.loads(line) for line in done.stdout.splitlines()]
    assert out["score"] == 0.5 and out["correct"] is False


def test_a_pickled_test_blob_is_refused_and_never_run(tmp_path):
    from tests.test_verifiers_code import hostile_blob

    marker = tmp_path / "pwned"
    record = {"benchmark": "livecodebench_medium", "tests": hostile_blob(marker), "response": "```python\nprint(1)\n```"}
    path = tmp_path / "hostile.jsonl"
    path.write_text(json.dumps(record) + "\n")
    done = srpo_score(str(path))
    assert done.returncode == 2
    assert f"{path}:1: test cases must be a JSON list" in done.stderr
    assert not marker.exists()


def test_errors_name_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        json.dumps({"benchmark": "math500", "gold": "1", "response": "\\boxed{1}"}) + "\n"
        + json.dumps({"benchmark": "math500", "response": "\\boxed{1}"}) + "\n"
        + "{broken\n"
        + json.dumps({"benchmark": "nope", "gold": "1", "response": "1"}) + "\n"
    )
    done = srpo_score(str(path))
    assert done.returncode == 2
    assert f"{path}:2: missing or empty field 'gold'" in done.stderr
    assert done.stdout == ""
    skipped = srpo_score(str(path), "--on-error", "skip")
    assert skipped.returncode == 0, skipped.stderr
    out = [json.loads(line) for line in skipped.stdout.splitlines()]
    assert [o["line"] for o in out] == [1, 2, 3, 4]
    assert out[0]["correct"] is True
    assert all(o["correct"] is None and f"{path}:" in o["error"] for o in out[1:])
    assert "unknown benchmark 'nope'" in out[3]["error"]
    assert "skipped 3 malformed lines" in skipped.stderr

"""Math verifier: extraction, equivalence on real golds, and hard timeouts off the main thread."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

from srpo_core.verifiers.extract import boxed_contents, last_boxed
from srpo_core.verifiers.math import extract_math_answer, verify_math

# A check that math-verify cannot finish quickly (sympy evaluates a gigantic factorial).
PATHOLOGICAL = "\\boxed{(10^{10^{10^{10}}})!}"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{\\frac{3\\sqrt{5}}{7}} done", "\\frac{3\\sqrt{5}}{7}"),
        ("\\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
        ("\\fbox{7}", "7"),
        ("\\boxed{3} and a cut \\boxed{4", "3"),  # unbalanced last box ignored
        ("no box", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_boxed_contents_nested():
    assert boxed_contents("\\boxed{\\frac{a}{b}} x \\boxed{{c}}") == ["\\frac{a}{b}", "{c}"]


@pytest.mark.parametrize(
    "response, expected",
    [
        ("We get \\boxed{91/6}.", "91/6"),
        ("The final answer is $\\frac{1}{2}$.", "\\frac{1}{2}"),
        ("Answer: 1,296", "1,296"),
        ("**Final answer:** 371", "371"),
        ("Janet makes 9 * 2 = 18 dollars.\n#### 18", "18"),
        ("first 12, then 13 remain", "13"),
        ("nothing numeric here", None),
    ],
)
def test_extract_math_answer(response, expected):
    assert extract_math_answer(response) == expected


# Golds from the sample files (hmmt_nov_2025, aime24, gsm8k, math500, numinamath_olympiads).
@pytest.mark.parametrize(
    "gold, response, correct",
    [
        ("1/91", "\\boxed{\\frac{1}{91}}", True),
        ("1/91", "\\boxed{\\frac{1}{19}}", False),
        ("\\frac{3\\sqrt{5}}{7}", "\\boxed{\\frac{3}{7}\\sqrt{5}}", True),
        ("\\frac{3\\sqrt{5}}{7}", "\\boxed{\\frac{3\\sqrt{7}}{5}}", False),
        ("025", "\\boxed{25}", True),
        ("073", "\\boxed{37}", False),
        ("2,125", "\\boxed{2125}", True),
        ("2,125", "\\boxed{2.125}", False),
        ("(3,4]", "\\boxed{(3, 4]}", True),
        ("(3,4]", "\\boxed{[3, 4]}", False),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\boxed{(3, \\pi/2)}", True),
        ("83\\%", "\\boxed{83\\%}", True),
        ("190 \\text{ cm}", "\\boxed{190}", True),
        ("\\text{Evelyn}", "\\boxed{\\text{Evelyn}}", True),
        ("\\text{Evelyn}", "\\boxed{\\text{Bob}}", False),
    ],
)
def test_verify_math_table(gold, response, correct):
    verdict = verify_math(response, gold)
    assert verdict.correct is correct, verdict
    assert verdict.score == (1.0 if correct else 0.0)


def test_no_answer_is_wrong_with_reason():
    verdict = verify_math("I give up.", "12")
    assert not verdict.correct and verdict.extracted is None and verdict.reason == "no_answer"


def test_empty_gold_is_an_error():
    with pytest.raises(ValueError):
        verify_math("\\boxed{1}", "  ")


def test_timeout_off_main_thread_returns_incorrect_and_never_hangs():
    results = []

    def worker():
        results.append(verify_math(PATHOLOGICAL, "3", timeout_s=1.0))

    thread = threading.Thread(target=worker)
    start = time.monotonic()
    thread.start()
    thread.join(timeout=20)
    assert not thread.is_alive(), "verify_math hung in a thread"
    assert time.monotonic() - start < 10
    (verdict,) = results
    assert verdict.timed_out and not verdict.correct and verdict.score == 0.0
    # The killed worker is replaced: the next check works.
    assert verify_math("\\boxed{\\frac{91}{6}}", "91/6", timeout_s=10).correct


def test_boxed_only_refuses_plain_answers():
    assert verify_math("The answer is 12.", "12").correct
    verdict = verify_math("The answer is 12.", "12", boxed_only=True)
    assert not verdict.correct and verdict.reason == "no_answer"
    assert verify_math("\\boxed{12}", "12", boxed_only=True).correct


# ---- a worker that breaks the protocol (issue 16) ---------------------------------------------

FAKE_WORKER = r"""
import json, os, sys, time
with open(sys.argv[1], "a") as f:
    f.write(f"{os.getpid()}\n")
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    if req["answer"] == "junk":
        print("Traceback (most recent call last): not a protocol line", flush=True)
        time.sleep(3600)  # alive until the parent kills it
    print(json.dumps({"equal": req["answer"] == req["gold"]}), flush=True)
"""


def test_a_non_json_reply_kills_and_reaps_the_worker_and_the_pool_keeps_working(tmp_path, monkeypatch):
    from srpo_core.verifiers import math as M

    script, pids = tmp_path / "fake_worker.py", tmp_path / "pids"
    script.write_text(FAKE_WORKER)
    pool = M.MathCheckerPool(1, command=(sys.executable, str(script), str(pids)))
    monkeypatch.setattr(M, "_POOL", pool)
    try:
        verdict = verify_math("so \\boxed{junk}", "1")
        assert not verdict.correct and verdict.score == 0.0 and verdict.extracted == "junk"
        assert verdict.reason.startswith("error: math-verify worker sent a malformed reply"), verdict.reason
        (first,) = [int(p) for p in pids.read_text().split()]
        assert not Path(f"/proc/{first}").exists(), "the worker must be killed and reaped, not leaked"
        assert pool._idle == []
        assert pool.check("2", "2", 30) == {"equal": True}  # a fresh worker answers
        assert verify_math("\\boxed{3}", "4").reason == "wrong"
        assert len(pids.read_text().split()) == 2 and pool._idle and pool._idle[0].proc.pid != first
    finally:
        pool.close()


def test_library_output_on_stdout_does_not_corrupt_the_worker_protocol():
    """The real worker with a check that prints (as sympy or a parser might): the replies stay clean."""
    from srpo_core.verifiers import math as M

    noisy = (
        "import srpo_core.verifiers._math_worker as w\n"
        "real = w.check\n"
        "def check(gold, answer):\n"
        "    print('noise from a library')\n"
        "    return real(gold, answer)\n"
        "w.check = check\n"
        "w.main()\n"
    )
    pool = M.MathCheckerPool(1, command=(sys.executable, "-c", noisy))
    try:
        assert pool.check("\\frac{1}{2}", "0.5", 30) == {"equal": True}
        assert pool.check("\\frac{1}{2}", "0.6", 30) == {"equal": False}
    finally:
        pool.close()


@pytest.mark.parametrize(
    "line, parsed",
    [
        (b'{"equal": true}\n', {"equal": True}),
        (b'{"error": "ValueError: x"}\n', {"error": "ValueError: x"}),
        (b'{"ready": true}\n', {"ready": True}),
        (b"noise\n", None),
        (b"\xff\xfe\n", None),
        (b"[1, 2]\n", None),
        (b'{"equal": "yes"}\n', None),
        (b'{"equal": true, "extra": 1}\n', None),
    ],
)
def test_parse_reply_accepts_only_protocol_lines(line, parsed):
    from srpo_core.verifiers.math import parse_reply

    assert parse_reply(line) == parsed

"""Code verifier on real LiveCodeBench items: extraction, stdin and functional tests, splits."""

from __future__ import annotations

import base64
import json
import os
import pickle
import zlib

import pytest

from srpo_core.benchmarks import get_benchmark
from srpo_core.verifiers.code import TestCase, parse_test_cases, split_test_cases, verify_code
from srpo_core.verifiers.extract import last_code_block

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the isolated sandbox needs root")

SNAKE_CORRECT = '''
def count(n):
    """Snake numbers in [10, n]."""
    if n < 10:
        return 0
    s = str(n)
    length = len(s)
    total = sum(top ** (k - 1) for k in range(2, length) for top in range(1, 10))
    top = int(s[0])
    total += sum(t ** (length - 1) for t in range(1, top))
    for i in range(1, length):
        d = int(s[i])
        total += min(d, top) * top ** (length - 1 - i)
        if d >= top:
            return total
    return total + 1

L, R = map(int, input().split())
print(count(R) - count(L - 1))
'''

SNAKE_WRONG = '''
L, R = map(int, input().split())
print(sum(1 for x in range(L, min(R, L + 10 ** 5) + 1) if all(int(c) < int(str(x)[0]) for c in str(x)[1:])))
'''

ROBOT_CORRECT = '''
class Solution:
    def maximumAmount(self, coins: List[List[int]]) -> int:
        m, n = len(coins), len(coins[0])
        NEG = float("-inf")
        dp = [[[NEG] * 3 for _ in range(n)] for _ in range(m)]
        for i in range(m):
            for j in range(n):
                v = coins[i][j]
                for k in range(3):
                    if i == 0 and j == 0:
                        best = 0
                    else:
                        best = max(dp[i - 1][j][k] if i else NEG, dp[i][j - 1][k] if j else NEG)
                    if best != NEG:
                        dp[i][j][k] = max(dp[i][j][k], best + v)
                        if v < 0 and k < 2:
                            dp[i][j][k + 1] = max(dp[i][j][k + 1], best)
        return max(dp[m - 1][n - 1])
'''

ROBOT_WRONG = '''
class Solution:
    def maximumAmount(self, coins):
        return sum(map(sum, coins))
'''


def fenced(code: str, tag: str = "python") -> str:
    return f"Here is my solution.\n```{tag}\n{code}\n```\nDone."


@pytest.fixture(scope="module")
def lcb_items():
    return {item.meta["title"]: item for item in get_benchmark("livecodebench_medium").load()}


def test_last_code_block_prefers_the_last_python_block():
    text = "```python\nprint(1)\n```\ntext\n```python\nprint(2)\n```\nsample output:\n```\n2\n```"
    assert last_code_block(text).strip() == "print(2)"
    assert last_code_block("```\nx = 1\n```").strip() == "x = 1"
    assert last_code_block("```python\nprint(1)") is None  # unterminated
    assert last_code_block("no code") is None


class RunsACommand:
    """Unpickling this calls os.system(command): what a hostile test-case blob would carry."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def hostile_blob(marker) -> str:
    """A LiveCodeBench-shaped blob (base64(zlib(pickle))) whose unpickling creates ``marker``."""
    return base64.b64encode(zlib.compress(pickle.dumps(RunsACommand(f"touch {marker}")))).decode()


def test_parse_test_cases_formats():
    raw = [{"input": "1 2", "output": "3", "testtype": "stdin"}]
    assert parse_test_cases(json.dumps(raw)) == (TestCase("1 2", "3", "stdin"),)
    assert parse_test_cases(raw) == (TestCase("1 2", "3", "stdin"),)
    with pytest.raises(ValueError):
        parse_test_cases([{"input": "1"}])


def test_parse_test_cases_is_json_only_and_never_unpickles(tmp_path):
    raw = [{"input": "1 2", "output": "3", "testtype": "stdin"}]
    plain_blob = base64.b64encode(zlib.compress(pickle.dumps(json.dumps(raw)))).decode()
    with pytest.raises(ValueError, match="JSON"):
        parse_test_cases(plain_blob)  # even a harmless blob: user input is JSON or nothing
    marker = tmp_path / "pwned"
    with pytest.raises(ValueError, match="JSON"):
        parse_test_cases(hostile_blob(marker))
    assert not marker.exists()


def test_split_is_seeded_disjoint_and_half():
    tests = tuple(TestCase(str(i), str(i), "stdin") for i in range(7))
    train, held_out = split_test_cases(tests, seed=42)
    assert split_test_cases(tests, seed=42) == (train, held_out)
    assert len(train) == 3 and len(held_out) == 4
    assert set(train).isdisjoint(held_out) and set(train) | set(held_out) == set(tests)
    assert split_test_cases(tests, seed=1) != (train, held_out)
    single = (tests[0],)
    assert split_test_cases(single) == (single, single)


@needs_root
def test_stdin_problem_correct_and_wrong(lcb_items):
    item = lcb_items["Snake Numbers"]
    assert len(item.tests) == 3 and all(t.testtype == "stdin" for t in item.tests)
    good = verify_code(fenced(SNAKE_CORRECT), item.tests)
    assert good.correct and good.score == 1.0, good.reason
    bad = verify_code(fenced(SNAKE_WRONG), item.tests)
    assert not bad.correct and bad.score < 1.0
    partial = verify_code(fenced("print(6)"), item.tests)
    assert partial.score == pytest.approx(1 / 3)


@needs_root
def test_functional_problem_correct_and_wrong(lcb_items):
    item = lcb_items["maximum-amount-of-money-robot-can-earn"]
    assert item.meta["func_name"] == "maximumAmount"
    assert all(t.testtype == "functional" for t in item.tests)
    good = verify_code(fenced(ROBOT_CORRECT), item.tests, item.meta["func_name"])
    assert good.correct and good.score == 1.0, good.reason
    bad = verify_code(fenced(ROBOT_WRONG), item.tests, item.meta["func_name"])
    assert not bad.correct and bad.score == 0.0
    crash = verify_code(fenced("class Solution:\n    def maximumAmount(self, c):\n        raise ValueError"), item.tests, "maximumAmount")
    assert crash.score == 0.0 and "runtime error" in crash.reason


def test_no_code_block_is_no_answer(lcb_items):
    verdict = verify_code("I would use dynamic programming.", lcb_items["Snake Numbers"].tests)
    assert not verdict.correct and verdict.reason == "no_answer" and verdict.extracted is None


@needs_root
def test_benchmark_scores_train_and_held_out_halves(lcb_items):
    bench = get_benchmark("livecodebench_medium")
    item = lcb_items["Snake Numbers"]
    # "print(6)" passes exactly the first sample (97 210 -> 6).
    first = item.tests[0]
    train, held_out = split_test_cases(item.tests, 42)
    expected = {"train": float(first in train) / len(train), "eval": float(first in held_out) / len(held_out)}
    for split, score in expected.items():
        assert bench.score(fenced("print(6)"), item, code_split=split).score == pytest.approx(score)
    assert bench.score(fenced(SNAKE_CORRECT), item, code_split="train").correct


@needs_root
def test_max_timeouts_bounds_the_cost_of_a_hanging_program(lcb_items):
    from srpo_core.verifiers.sandbox import SandboxLimits

    item = lcb_items["Snake Numbers"]
    verdict = verify_code(fenced("while True:\n    pass"), item.tests, limits=SandboxLimits(wall_s=1, cpu_s=1), max_timeouts=1)
    assert verdict.score == 0.0
    assert verdict.reason.count("not run after 1 timeouts") == len(item.tests) - 1

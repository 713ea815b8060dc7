"""Code answers: extract the last fenced block and run it on test cases in the sandbox.

Test cases follow LiveCodeBench: ``stdin`` cases feed ``input`` on standard input and compare
standard output with ``output`` (whitespace-normalised: per line, runs of whitespace are one
separator, blank lines and surrounding whitespace ignored); ``functional`` cases call the
method ``func_name`` of ``class Solution`` (LeetCode style; a top-level function of that name
also works) with the newline-separated JSON arguments of ``input`` and compare the JSON result
with ``output`` (tuples compare as lists). Each case is a separate sandboxed process with the
default limits of :class:`SandboxLimits` (10 s per case, REFERENCE.md).

Reward = fraction of the scored cases passed. :func:`split_test_cases` makes the seeded 50/50
split per problem: training scores the "train" half, evaluation the held-out half.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass

from srpo_core.verifiers.extract import last_code_block
from srpo_core.verifiers.sandbox import SandboxLimits, SandboxResult, run_python
from srpo_core.verifiers.verdict import CORRECT, NO_ANSWER, WRONG, Verdict

TEST_TYPES = ("stdin", "functional")

# Imports made available to every program (as LiveCodeBench does; builtins are restored last so
# that e.g. math.pow does not shadow pow).
PROGRAM_HEADER = """\
from string import *
from re import *
from datetime import *
from collections import *
from heapq import *
from bisect import *
from copy import *
from math import *
from random import *
from statistics import *
from itertools import *
from functools import *
from operator import *
from io import *
from sys import *
from json import *
from builtins import *
from typing import *
import string, re, datetime, collections, heapq, bisect, copy, math, random, statistics
import itertools, functools, operator, io, sys, json
sys.setrecursionlimit(50000)
"""

RESULT_MARKER = "@@SRPO_RESULT@@ "

# Runs inside the sandbox for functional cases: loads the solution, calls the function.
_FUNCTIONAL_DRIVER = f"""\
import json, sys
_marker = {RESULT_MARKER!r}
_src = open("solution.py", encoding="utf-8").read()
_ns = {{"__name__": "solution"}}
exec(compile(_src, "solution.py", "exec"), _ns)
_args = [json.loads(line) for line in sys.stdin.read().split("\\n") if line.strip()]
_cls = _ns.get("Solution")
_fn = getattr(_cls(), sys.argv[1]) if _cls is not None else _ns[sys.argv[1]]
_result = _fn(*_args)
sys.stdout.flush()
sys.stdout.write("\\n" + _marker + json.dumps(_result) + "\\n")
"""


@dataclass(frozen=True)
class TestCase:
    __test__ = False  # not a pytest class

    input: str
    output: str
    testtype: str

    def __post_init__(self) -> None:
        if self.testtype not in TEST_TYPES:
            raise ValueError(f"test type must be one of {TEST_TYPES}, got {self.testtype!r}")


@dataclass(frozen=True)
class CaseResult:
    passed: bool
    reason: str  # "ok", "wrong answer", "timeout", "runtime error: ..."


def parse_test_cases(raw: object) -> tuple[TestCase, ...]:
    """Test cases from a JSON string or a list of dicts (``input``, ``output``, ``testtype``).

    JSON only: anything else is a ValueError. LiveCodeBench's compressed private tests are decoded
    by the benchmark's row converter (:func:`srpo_core.benchmarks.catalog.decode_lcb_blob`), never
    here: this function reads user input (``srpo score``) and must not unpickle it."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(f"test cases must be a JSON list of {{input, output, testtype}} objects: {exc}") from None
    if not isinstance(raw, list):
        raise ValueError(f"test cases must be a list, got {type(raw).__name__}")
    out = []
    for i, case in enumerate(raw):
        if not isinstance(case, dict) or not {"input", "output", "testtype"} <= case.keys():
            raise ValueError(f"test case {i} must have input, output and testtype: {case!r:.200}")
        out.append(TestCase(str(case["input"]), str(case["output"]), str(case["testtype"])))
    return tuple(out)


def split_test_cases(
    tests: Sequence[TestCase], seed: int = 42
) -> tuple[tuple[TestCase, ...], tuple[TestCase, ...]]:
    """(train, held-out): the cases shuffled with ``random.Random(seed)``, first half train.

    The held-out half gets the extra case of an odd count. A problem with a single case uses it
    for both (otherwise one side would have nothing to score).
    """
    cases = list(tests)
    if len(cases) <= 1:
        return tuple(cases), tuple(cases)
    random.Random(seed).shuffle(cases)
    half = len(cases) // 2
    return tuple(cases[:half]), tuple(cases[half:])


def _stdout_lines(text: str) -> list[list[str]]:
    return [line.split() for line in text.strip().splitlines() if line.strip()]


def _as_json_value(value: object) -> object:
    if isinstance(value, (list, tuple)):
        return [_as_json_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _as_json_value(v) for k, v in value.items()}
    return value


def _failure_reason(result: SandboxResult) -> str | None:
    if result.timed_out:
        return "timeout"
    if result.returncode != 0:
        tail = result.stderr.strip().splitlines()[-1:] or [f"exit code {result.returncode}"]
        return f"runtime error: {tail[0][:200]}"
    return None


def run_test_case(
    program: str, case: TestCase, func_name: str | None = None, limits: SandboxLimits = SandboxLimits()
) -> CaseResult:
    """Run one case in the sandbox and compare its output."""
    source = PROGRAM_HEADER + "\n" + program
    if case.testtype == "stdin":
        stdin = case.input if case.input.endswith("\n") else case.input + "\n"
        result = run_python({"solution.py": source}, ["solution.py"], stdin, limits)
        failure = _failure_reason(result)
        if failure:
            return CaseResult(False, failure)
        same = _stdout_lines(result.stdout) == _stdout_lines(case.output)
        return CaseResult(same, "ok" if same else "wrong answer")
    if not func_name:
        raise ValueError("functional test cases need func_name (LiveCodeBench metadata)")
    files = {"solution.py": source, "driver.py": _FUNCTIONAL_DRIVER}
    result = run_python(files, ["driver.py", func_name], case.input, limits)
    failure = _failure_reason(result)
    if failure:
        return CaseResult(False, failure)
    marked = [ln for ln in result.stdout.splitlines() if ln.startswith(RESULT_MARKER)]
    if not marked:
        return CaseResult(False, "no result")
    try:
        got = json.loads(marked[-1][len(RESULT_MARKER):])
        expected = json.loads(case.output)
    except json.JSONDecodeError as exc:
        return CaseResult(False, f"unreadable result: {exc}")
    same = _as_json_value(got) == _as_json_value(expected)
    return CaseResult(same, "ok" if same else "wrong answer")


def score_program(
    program: str,
    tests: Sequence[TestCase],
    func_name: str | None = None,
    limits: SandboxLimits = SandboxLimits(),
    max_timeouts: int | None = None,
) -> Verdict:
    """Run ``program`` on ``tests``: score = fraction passed, correct = all passed.

    max_timeouts: after this many timed-out cases the remaining cases are not run and count as
    failed (bounds the cost of a non-terminating program to ``max_timeouts * wall_s``); None runs
    every case.
    """
    if not tests:
        raise ValueError("no test cases to score")
    results: list[CaseResult] = []
    timeouts = 0
    for case in tests:
        if max_timeouts is not None and timeouts >= max_timeouts:
            results.append(CaseResult(False, f"not run after {timeouts} timeouts"))
            continue
        result = run_test_case(program, case, func_name, limits)
        timeouts += result.reason == "timeout"
        results.append(result)
    passed = sum(r.passed for r in results)
    if passed == len(results):
        return Verdict(True, 1.0, program, CORRECT)
    failures = "; ".join(f"case {i + 1}: {r.reason}" for i, r in enumerate(results) if not r.passed)
    return Verdict(False, passed / len(results), program, f"{WRONG}: passed {passed}/{len(results)} ({failures})")


def verify_code(
    response: str,
    tests: Sequence[TestCase],
    func_name: str | None = None,
    limits: SandboxLimits = SandboxLimits(),
    max_timeouts: int | None = None,
) -> Verdict:
    """Extract the last fenced code block of ``response`` and score it on ``tests``."""
    if not tests:
        raise ValueError("no test cases to score")
    program = last_code_block(response)
    if program is None:
        return Verdict(False, 0.0, None, NO_ANSWER)
    return score_program(program, tests, func_name, limits, max_timeouts)

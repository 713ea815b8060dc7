"""Verifiers: math (math-verify, hard timeouts), multiple choice / yes-no / fill-in, and code in
a sandbox. Light on purpose: no torch or transformers, so verification steps stay cheap.
"""

from srpo_core.verifiers.choice import (
    extract_choice,
    extract_yes_no,
    verify_choice,
    verify_filling,
    verify_yes_no,
)
from srpo_core.verifiers.code import TestCase, parse_test_cases, split_test_cases, verify_code
from srpo_core.verifiers.math import extract_math_answer, verify_math, verify_math_answer
from srpo_core.verifiers.sandbox import SandboxLimits, SandboxResult, SandboxUnavailable, run_python
from srpo_core.verifiers.verdict import Verdict

__all__ = [
    "SandboxLimits", "SandboxResult", "SandboxUnavailable", "TestCase", "Verdict", "extract_choice",
    "extract_math_answer", "extract_yes_no", "parse_test_cases", "run_python", "split_test_cases",
    "verify_choice", "verify_code", "verify_filling", "verify_math", "verify_math_answer",
    "verify_yes_no",
]

"""Benchmarks: a registry of loaders, prompt formatters and scorers (SPEC.md section 3).

    from srpo_core.benchmarks import get_benchmark
    bench = get_benchmark("commonsenseqa")
    items = bench.load(n=bench.eval_n)              # local file; source="hub" for the full set
    prompt = bench.format_prompt(items[0])          # the {question} of the rollout template
    verdict = bench.score(response, items[0])       # Verdict(correct, score, extracted, reason)

Other modules register more entries with :func:`register_benchmark`. No torch here.
"""

from srpo_core.benchmarks.catalog import EVAL_SUITE, TRAIN_BENCHMARK, looks_verifiable, register_builtin
from srpo_core.benchmarks.items import ANSWER_TYPES, CHOICE, CODE, FILLING, MATH, YES_NO, Item
from srpo_core.benchmarks.registry import (
    BENCHMARKS,
    Benchmark,
    BenchmarkDataError,
    BenchmarkDataWarning,
    BenchmarkFileMissing,
    BenchmarkUnavailable,
    HubSource,
    RowError,
    benchmark_dir,
    check_sources,
    get_benchmark,
    list_benchmarks,
    register_benchmark,
    sample_items,
)
from srpo_core.benchmarks.samples import PACKAGED_DIR
from srpo_core.benchmarks.scoring import SCORERS, ScoreOptions, score_item, tests_for

register_builtin()

__all__ = [
    "ANSWER_TYPES", "BENCHMARKS", "Benchmark", "BenchmarkDataError", "BenchmarkDataWarning",
    "BenchmarkFileMissing", "BenchmarkUnavailable", "CHOICE", "CODE", "EVAL_SUITE", "FILLING", "HubSource",
    "Item", "MATH", "PACKAGED_DIR", "RowError", "SCORERS", "ScoreOptions", "TRAIN_BENCHMARK", "YES_NO",
    "benchmark_dir", "check_sources", "get_benchmark", "list_benchmarks", "looks_verifiable", "register_benchmark", "sample_items",
    "score_item", "tests_for",
]

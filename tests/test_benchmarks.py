"""Benchmark registry: every entry loads its packaged sample and formats a prompt; sampling,
splits, malformed rows, the lookup order of local files and the one-line error when a file is
missing, hub errors, and registration from other modules.

These tests read only the samples shipped in the package (srpo_core/assets/benchmarks): they
pass in a clone or a wheel with nothing beside it."""

from __future__ import annotations

import ast
import base64
import json
import pickle
import re
import sys
import types
import warnings
import zlib
from pathlib import Path

import pytest

from srpo_core.benchmarks import (
    BENCHMARKS,
    EVAL_SUITE,
    Benchmark,
    BenchmarkDataError,
    BenchmarkDataWarning,
    BenchmarkFileMissing,
    BenchmarkUnavailable,
    HubSource,
    Item,
    check_sources,
    get_benchmark,
    list_benchmarks,
    looks_verifiable,
    register_benchmark,
    sample_items,
)
from srpo_core.benchmarks.catalog import LCB_REVISION, decode_lcb_blob, livecodebench_item, math_prompt
from srpo_core.benchmarks.registry import RowError, benchmark_dir
from srpo_core.benchmarks.samples import PACKAGED_DIR, SAMPLE_RULES, SampleRule, select_lines
from tests.test_verifiers_code import hostile_blob

SRPO_CORE = Path(__file__).resolve().parents[1] / "srpo_core"

# name -> (items in the packaged sample after filtering, answer types present)
EXPECTED = {
    "numinamath_olympiads": (96, {"math"}),
    "hmmt_nov_2025": (20, {"math"}),
    "math_level5": (20, {"math"}),
    "math500": (20, {"math"}),
    "aime24": (20, {"math"}),
    "gsm8k": (20, {"math"}),
    "strategyqa": (20, {"yes_no"}),
    "commonsenseqa": (50, {"choice"}),
    "sciknoweval_chemistry": (20, {"choice", "filling"}),
    "sciknoweval_biology": (30, {"choice", "yes_no"}),
    "sciknoweval_materials": (10, {"choice"}),
    "sciknoweval_physics": (10, {"choice"}),
    "livecodebench_medium": (20, {"code"}),
}


def test_registry_has_the_suite():
    assert set(EVAL_SUITE) <= set(BENCHMARKS)
    assert set(EXPECTED) | {"acereason_math"} <= set(list_benchmarks())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_entry_loads_its_sample_and_formats_a_prompt(name):
    bench = get_benchmark(name)
    items = bench.load()
    count, kinds = EXPECTED[name]
    assert len(items) == count
    assert {item.answer_type for item in items} == kinds
    assert len({item.id for item in items}) == count, "ids must be unique"
    for item in items:
        assert item.question.strip()
        assert item.gold.strip() or item.answer_type == "code"
        assert item.answer_type in bench.answer_types
    prompt = bench.format_prompt(items[0])
    assert items[0].question.strip()[:40] in prompt
    if items[0].answer_type in ("choice", "yes_no"):
        assert "\\boxed{" in prompt


def test_commonsenseqa_prompt_layout():
    bench = get_benchmark("commonsenseqa")
    prompt = bench.format_prompt(bench.load()[0])
    assert "\n A) bank\n B) library\n C) department store\n D) mall\n E) new york\n" in prompt
    assert prompt.endswith("\\boxed{letter}.")


def test_sciknoweval_prompt_layout():
    bench = get_benchmark("sciknoweval_materials")
    item = bench.load()[0]
    prompt = bench.format_prompt(item)
    assert "\nA. Mg in Ir\nB. Mg in Hg\nC. Mg in In\nD. Mg in K\n" in prompt
    assert "\\boxed{letter}" in prompt
    assert "without any explanation" not in prompt  # the dataset's instruction is kept in meta only
    assert item.meta["instruction"].startswith("Given a question and four options")


def test_golds_of_special_sources():
    gsm8k = get_benchmark("gsm8k").load()
    assert gsm8k[0].gold == "18" and gsm8k[2].gold == "70000"
    level5 = get_benchmark("math_level5").load()[0]
    assert level5.gold == "\\frac{1}{2}" and level5.id == "test/algebra/2.json"
    assert get_benchmark("aime24").load()[0].gold == "113"
    hmmt = {i.id: i.gold for i in get_benchmark("hmmt_nov_2025").load()}
    assert hmmt["hmmt-nov-2025-29"] == "\\frac{3\\sqrt{5}}{7}"
    numina = get_benchmark("numinamath_olympiads").load()[0]
    assert numina.gold == "83\\%" and numina.question.startswith("The efficiency of an ideal heat engine")
    lcb = get_benchmark("livecodebench_medium").load()
    assert sum(i.meta["platform"] == "leetcode" for i in lcb) == 10
    assert all(i.meta["func_name"] for i in lcb if i.meta["platform"] == "leetcode")


def test_verifiable_filter():
    assert looks_verifiable("190 \\text{ cm}") and looks_verifiable("(-4, -3), (-3, -4), (3, 4), (4, 3)")
    assert not looks_verifiable("\\text{The equilibrium point } (0,0) \\text{ is unstable (saddle).}")
    assert not looks_verifiable("Assim, cada pessoa recebe exatamente 5 triângulos menores.")
    assert not looks_verifiable("x = -1 \\pm \\sqrt{\\pi k + 1}, \\quad k = 0, 1, 2, \\ldots")


def test_seeded_sampling_is_deterministic_and_seed_dependent():
    bench = get_benchmark("gsm8k")
    a = [i.id for i in bench.load(n=12, seed=42)]
    assert a == [i.id for i in bench.load(n=12, seed=42)]
    assert a != [i.id for i in bench.load(n=12, seed=7)]
    assert len(set(a)) == 12
    items = bench.load()
    expected = list(range(len(items)))
    import random

    random.Random(42).shuffle(expected)
    assert a == [items[k].id for k in expected[:12]]
    assert sample_items(items, None, 0) == items


def test_numinamath_train_test_split():
    bench = get_benchmark("numinamath_olympiads")
    train, test = bench.load(split="train"), bench.load(split="test")
    assert (len(train), len(test)) == (76, 20)  # 80/20 of the 96 verifiable items
    assert {i.id for i in train}.isdisjoint({i.id for i in test})
    with pytest.raises(ValueError):
        get_benchmark("gsm8k").load(split="train")


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_malformed_rows_raise_with_file_and_line(tmp_path):
    good = json.dumps({"problem": "1+1?", "answer": "2"})
    bad_json = _write(tmp_path / "bad.jsonl", [good, "{not json", good])
    with pytest.raises(BenchmarkDataError, match=r"bad\.jsonl:2: invalid JSON"):
        get_benchmark("math500").load(path=bad_json)
    missing = _write(tmp_path / "missing.jsonl", [good, good, json.dumps({"problem": "no answer"})])
    with pytest.raises(BenchmarkDataError, match=r"missing\.jsonl:3: .*answer"):
        get_benchmark("math500").load(path=missing)
    no_question = _write(tmp_path / "noq.jsonl", [json.dumps({"question": "", "answerKey": "A"})])
    with pytest.raises(BenchmarkDataError, match=r"noq\.jsonl:1"):
        get_benchmark("commonsenseqa").load(path=no_question)


def test_malformed_rows_skipped_with_a_counted_warning(tmp_path):
    good = json.dumps({"problem": "1+1?", "answer": "2"})
    path = _write(tmp_path / "mixed.jsonl", [good, "{oops", json.dumps({"problem": "x"}), good])
    with pytest.warns(BenchmarkDataWarning, match=r"skipped 2 malformed rows"):
        items = get_benchmark("math500").load(path=path, on_error="skip")
    assert [i.gold for i in items] == ["2", "2"]


def test_bad_choice_gold_is_malformed(tmp_path):
    row = {"question": "q?", "choices": {"label": ["A", "B"], "text": ["x", "y"]}, "answerKey": "C"}
    path = _write(tmp_path / "csqa.jsonl", [json.dumps(row)])
    with pytest.raises(BenchmarkDataError, match="answerKey"):
        get_benchmark("commonsenseqa").load(path=path)


def test_benchmark_dir_env_comes_first_then_the_packaged_samples(tmp_path, monkeypatch):
    _write(tmp_path / "aime24.jsonl", [json.dumps({"id": 1, "problem": "p", "answer": "7"})])
    monkeypatch.setenv("SRPO_BENCHMARK_DIR", str(tmp_path))
    assert benchmark_dir() == tmp_path
    assert [i.gold for i in get_benchmark("aime24").load()] == ["7"]
    gsm8k = get_benchmark("gsm8k")  # not in the folder: the packaged sample
    assert gsm8k.local_path() == PACKAGED_DIR / "gsm8k.jsonl" and gsm8k.is_packaged_sample()
    assert not get_benchmark("aime24").is_packaged_sample()
    monkeypatch.delenv("SRPO_BENCHMARK_DIR")
    assert benchmark_dir() == PACKAGED_DIR


def _one_line_error(exc_info, *needles):
    message = str(exc_info.value)
    assert "\n" not in message and all(n in message for n in needles), message


def test_a_missing_file_is_one_line_naming_it_and_the_ways_to_provide_it(tmp_path, monkeypatch):
    ghost = Benchmark("ghost_for_test", "toy", lambda row, i: None, math_prompt, ("math",), "ghost.jsonl", HubSource("org/ghost", "test"))
    register_benchmark(ghost)
    try:
        with pytest.raises(BenchmarkFileMissing) as info:
            ghost.load()
        _one_line_error(info, "ghost_for_test", "ghost.jsonl", "SRPO_BENCHMARK_DIR", "org/ghost", "datasets")
        assert info.value.file == "ghost.jsonl" and isinstance(info.value, (BenchmarkUnavailable, FileNotFoundError))
        monkeypatch.setenv("SRPO_BENCHMARK_DIR", str(tmp_path))
        with pytest.raises(BenchmarkFileMissing) as info:
            ghost.load()
        _one_line_error(info, str(tmp_path), "ghost.jsonl")
        with pytest.raises(BenchmarkFileMissing) as info:  # the check a command runs before it starts
            check_sources(["synthetic", "gsm8k", "ghost_for_test"])
        _one_line_error(info, "ghost.jsonl")
        check_sources(["synthetic", "gsm8k", "commonsenseqa"])  # all there: no error
    finally:
        BENCHMARKS.pop("ghost_for_test", None)
    with pytest.raises(BenchmarkFileMissing) as info:
        get_benchmark("math500").load(path=tmp_path / "typo.jsonl")
    _one_line_error(info, "typo.jsonl")
    with pytest.raises(BenchmarkFileMissing):
        check_sources(["math500"], paths={"math500": str(tmp_path / "typo.jsonl")})


def test_acereason_has_no_packaged_sample_and_hub_needs_datasets():
    bench = get_benchmark("acereason_math")
    with pytest.raises(BenchmarkFileMissing) as info:
        bench.load()
    _one_line_error(info, "acereason_math.jsonl", "SRPO_BENCHMARK_DIR", "nvidia/AceReason-Math")
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(BenchmarkUnavailable, match="datasets"):
            bench.load(source="hub")
        with pytest.raises(BenchmarkUnavailable, match="datasets"):
            check_sources(["acereason_math"], source="hub")
    else:  # pragma: no cover - depends on the environment
        pytest.skip("datasets is installed; the hub path is exercised elsewhere")


def test_register_benchmark_hook():
    def to_item(row, index):
        return Item(f"toy-{index}", row["q"], row["a"], "math")

    bench = Benchmark("toy_for_test", "toy", to_item, math_prompt, ("math",))
    try:
        register_benchmark(bench)
        assert get_benchmark("toy_for_test") is bench
        with pytest.raises(ValueError, match="already registered"):
            register_benchmark(bench)
        item = to_item({"q": "2+2?", "a": "4"}, 0)
        assert bench.score("\\boxed{4}", item).correct
    finally:
        BENCHMARKS.pop("toy_for_test", None)
    with pytest.raises(KeyError, match="unknown benchmark"):
        get_benchmark("toy_for_test")


def test_score_dispatches_by_answer_type():
    csqa = get_benchmark("commonsenseqa")
    item = csqa.load()[0]
    assert csqa.score("\\boxed{A}", item).correct
    assert not csqa.score("\\boxed{B}", item).correct
    strategy = get_benchmark("strategyqa")
    assert strategy.score("\\boxed{no}", strategy.load()[0]).correct
    chem = get_benchmark("sciknoweval_chemistry")
    filling = chem.load()[0]
    assert chem.score(f"\\boxed{{{filling.gold}}}", filling).correct
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        level5 = get_benchmark("math_level5")
        assert level5.score("\\boxed{0.5}", level5.load()[0]).correct


def test_no_torch_or_transformers_imported():
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys, srpo_core.benchmarks, srpo_core.verifiers, srpo_core.benchmarks.score\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_load_eval_follows_the_reference_protocol():
    assert len(get_benchmark("commonsenseqa").load_eval()) == 50  # eval_n = 500: all the sample has
    assert len(get_benchmark("aime24").load_eval()) == 20
    numina = get_benchmark("numinamath_olympiads")
    assert [i.id for i in numina.load_eval()] == [i.id for i in numina.load(split="test")]
    small = get_benchmark("gsm8k").load_eval(seed=3)
    assert len(small) == 20 and [i.id for i in small] != [i.id for i in get_benchmark("gsm8k").load()]


# ---- the packaged samples and what the package may read ----------------------------------------------


def test_the_code_reads_no_folder_outside_the_package():
    """No module names a path beside the repository (the old default was <repo>/../shared)."""
    pattern = re.compile(r"""\.\./shared|shared/data|["']shared["']""")
    offenders = [
        f"{path.relative_to(SRPO_CORE.parent)}:{n}"
        for path in sorted(SRPO_CORE.rglob("*"))
        if path.suffix in (".py", ".yaml", ".txt", ".md") and path.is_file()
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if pattern.search(line)
    ]
    assert offenders == []


def test_every_local_file_but_acereason_is_packaged_and_shipped_as_package_data():
    files = {b.local_file for b in BENCHMARKS.values() if b.local_file} - {"acereason_math.jsonl"}
    assert files == set(SAMPLE_RULES)
    assert all((PACKAGED_DIR / f).is_file() for f in files)
    assert (PACKAGED_DIR / "README.md").is_file()
    readme = (PACKAGED_DIR / "README.md").read_text()
    assert all(f"`{f}`" in readme for f in files), "each file's source and license is stated"
    package_data = re.search(r"(?ms)^\[tool\.setuptools\.package-data\]\s*\nsrpo_core = \[(.*?)\]", (SRPO_CORE.parent / "pyproject.toml").read_text())
    assert package_data and '"assets/**/*"' in package_data.group(1)  # tomllib needs Python 3.11; the project supports 3.10


@pytest.mark.parametrize("name", sorted(SAMPLE_RULES))
def test_each_packaged_sample_follows_its_rule(name):
    """A sample is a fixed point of its own selection rule: the first n (of each stratum) only."""
    lines = (PACKAGED_DIR / name).read_text(encoding="utf-8").splitlines(keepends=True)
    rule = SAMPLE_RULES[name]
    assert select_lines(lines, rule, name) == lines
    if rule.first is not None and rule.per is None:
        assert len(lines) == rule.first


def test_select_lines_keeps_the_first_of_each_stratum_in_file_order():
    rows = [json.dumps({"type": t, "k": i}) + "\n" for i, t in enumerate("aabbbacb")]
    kept = select_lines(["\n", *rows], SampleRule(2, per="type"))
    assert [json.loads(line)["k"] for line in kept] == [0, 1, 2, 3, 6]
    assert select_lines(rows, SampleRule(3)) == rows[:3] and select_lines(rows, SampleRule(None)) == rows
    with pytest.raises(ValueError, match="no field 'platform'"):
        select_lines(rows, SampleRule(1, per="platform"), "x.jsonl")


def test_benchmarks_never_import_the_task_registry():
    """srpo_core.tasks imports srpo_core.benchmarks (lazily, in get_task); never the reverse, at
    any level of a module (the tasks <-> benchmarks.tasks import circle of issue 11)."""
    offenders = []
    for path in sorted((SRPO_CORE / "benchmarks").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.name}: {n}" for n in names if n == "srpo_core.tasks" or n.startswith("srpo_core.tasks.")]
    assert offenders == []


def lcb_row(private: str) -> dict:
    return {
        "question_id": "q1", "question_content": "add", "question_title": "add", "platform": "atcoder",
        "difficulty": "medium", "metadata": "{}", "starter_code": "", "contest_date": "2025-01-01",
        "public_test_cases": json.dumps([{"input": "1 2", "output": "3", "testtype": "stdin"}]),
        "private_test_cases": private,
    }


def test_livecodebench_blob_decodes_plain_data_only(tmp_path):
    cases = [{"input": "2 2", "output": "4", "testtype": "stdin"}]
    blob = base64.b64encode(zlib.compress(pickle.dumps(json.dumps(cases)))).decode()
    assert decode_lcb_blob(blob) == cases
    item = livecodebench_item(lcb_row(blob), 0)
    assert item.meta["test_source"] == "private" and [t.output for t in item.tests] == ["4"]
    marker = tmp_path / "pwned"
    with pytest.raises(RowError, match="refused: the blob references posix.system"):
        decode_lcb_blob(hostile_blob(marker))
    with pytest.raises(RowError, match="refused"):
        livecodebench_item(lcb_row(hostile_blob(marker)), 0)
    assert not marker.exists()
    with pytest.raises(RowError, match="neither JSON nor"):
        decode_lcb_blob("not base64 at all!")


def test_livecodebench_hub_reads_json_files_at_a_pinned_revision(monkeypatch, tmp_path):
    """No loading script runs (packaged json builder, no trust_remote_code) and every file is
    read at one commit; a hostile blob among the hub rows is refused, never run."""
    calls = []
    marker = tmp_path / "pwned"
    good = base64.b64encode(zlib.compress(pickle.dumps(json.dumps([{"input": "2 2", "output": "4", "testtype": "stdin"}])))).decode()
    rows = [lcb_row(good), {**lcb_row(hostile_blob(marker)), "question_id": "q2"}]

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return rows

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    bench = get_benchmark("livecodebench_medium")
    with pytest.warns(BenchmarkDataWarning):
        items = bench.load(source="hub", on_error="skip")
    assert [item.id for item in items] == ["q1"] and not marker.exists()
    ((args, kwargs),) = calls
    assert args == ("json",) and "trust_remote_code" not in kwargs
    assert re.fullmatch(r"[0-9a-f]{40}", LCB_REVISION)
    urls = kwargs["data_files"][kwargs["split"]]
    assert len(urls) == 6 and all(url.startswith(f"hf://datasets/livecodebench/code_generation_lite@{LCB_REVISION}/") for url in urls)
    with pytest.raises(BenchmarkDataError, match="refused"):
        bench.load(source="hub")
    assert not marker.exists()


def test_hub_sources_refuse_remote_code_and_unpinned_files():
    with pytest.raises(ValueError, match="trust_remote_code"):
        HubSource("someone/dataset", "test", kwargs=(("trust_remote_code", True),))
    with pytest.raises(ValueError, match="40-hex commit"):
        HubSource("someone/dataset", "test", revision="main", data_files=("test.jsonl",))

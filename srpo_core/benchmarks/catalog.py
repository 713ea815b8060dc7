"""The built-in benchmarks (SPEC.md section 3, REFERENCE.md "Evaluation", SOURCES.md fields).

Each entry pairs a row converter (which reads both the local sample and the hub rows) with a
prompt formatter. Registered on import of :mod:`srpo_core.benchmarks`.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import pickle
import re
import zlib
from collections.abc import Callable
from typing import Any

from srpo_core.benchmarks.items import CHOICE, CODE, FILLING, MATH, YES_NO, Item
from srpo_core.benchmarks.registry import Benchmark, HubSource, RowError, register_benchmark
from srpo_core.verifiers.choice import normalize_labels, normalize_yes_no
from srpo_core.verifiers.code import parse_test_cases
from srpo_core.verifiers.extract import last_boxed

# ---------------------------------------------------------------------- field helpers


def _text(row: dict, *path: str) -> str:
    """A non-empty string at ``row[path[0]][path[1]]...`` (RowError otherwise)."""
    value: Any = row
    for key in path:
        if not isinstance(value, dict) or key not in value:
            raise RowError(f"missing field {'.'.join(path)!r}")
        value = value[key]
    if value is None or (isinstance(value, str) and not value.strip()):
        raise RowError(f"empty field {'.'.join(path)!r}")
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise RowError(f"field {'.'.join(path)!r} must be a string or number, got {type(value).__name__}")
    return str(value)


def _id(row: dict, key: str | None, name: str, index: int) -> str:
    value = row.get(key) if key else None
    return str(value) if value not in (None, "") else f"{name}-{index}"


def _boxed_gold(solution: str) -> str:
    gold = last_boxed(solution)
    if not gold:
        raise RowError("no \\boxed{...} answer in the solution")
    return gold


def _choices(row: dict) -> tuple[tuple[str, str], ...]:
    choices = row.get("choices")
    if not isinstance(choices, dict) or "label" not in choices or "text" not in choices:
        raise RowError("missing field 'choices' with 'label' and 'text'")
    labels, texts = list(choices["label"]), list(choices["text"])
    if not labels or len(labels) != len(texts):
        raise RowError(f"choices have {len(labels)} labels and {len(texts)} texts")
    return tuple(zip(normalize_labels(labels), (str(t) for t in texts)))


def _choice_gold(row: dict, choices: tuple[tuple[str, str], ...]) -> str:
    gold = _text(row, "answerKey").strip().upper()
    if gold not in {label for label, _ in choices}:
        raise RowError(f"answerKey {gold!r} is not one of the choice labels")
    return gold


# ---------------------------------------------------------------------- prompts

BOXED_LETTER = "Answer with the letter of the correct option, as \\boxed{letter}."
BOXED_YES_NO = "Answer yes or no, as \\boxed{yes} or \\boxed{no}."


def math_prompt(item: Item) -> str:
    return item.question


def commonsenseqa_prompt(item: Item) -> str:
    options = "\n".join(f" {label}) {text}" for label, text in item.choices)
    return f"{item.question}\n{options}\n\n{BOXED_LETTER}"


_SCIKNOWEVAL_INSTRUCTIONS = {
    CHOICE: BOXED_LETTER,
    YES_NO: "Answer Yes or No, as \\boxed{Yes} or \\boxed{No}.",
    FILLING: "Write your final answer inside \\boxed{}.",
}
_SCIKNOWEVAL_TASK_INSTRUCTIONS = {
    "balancing_chemical_equation": "Keep the reactants and products in the order given and write "
    "the balanced equation inside \\boxed{}.",
}


def sciknoweval_prompt(item: Item) -> str:
    options = "\n".join(f"{label}. {text}" for label, text in item.choices)
    instruction = _SCIKNOWEVAL_TASK_INSTRUCTIONS.get(
        item.meta.get("task", ""), _SCIKNOWEVAL_INSTRUCTIONS[item.answer_type]
    )
    body = f"{item.question}\n\n{options}" if options else item.question
    return f"{body}\n\n{instruction}"


def strategyqa_prompt(item: Item) -> str:
    return f"{item.question}\n\n{BOXED_YES_NO}"


def livecodebench_prompt(item: Item) -> str:
    starter = item.meta.get("starter_code", "")
    if starter.strip():
        how = (
            "Write a Python solution that completes the starter code below. Give the complete "
            f"solution in one ```python code block.\n\n```python\n{starter}\n```"
        )
    else:
        how = (
            "Write a Python program that reads the input from standard input and writes the answer "
            "to standard output. Give the complete program in one ```python code block."
        )
    return f"{item.question}\n\n{how}"


# ---------------------------------------------------------------------- math converters

_WORDS_RE = re.compile(r"[A-Za-z]{2,}")
_LATEX_CMD_RE = re.compile(r"\\[A-Za-z]+")
_UNVERIFIABLE_RE = re.compile(r"\\begin|\\ldots|\\cdots|\.\.\.|\$\{|proof|prove", re.IGNORECASE)


def looks_verifiable(gold: str) -> bool:
    """Heuristic for NuminaMath golds: short math, at most two words of text (units, "and").

    Drops free text, proofs, case analyses and templated artefacts (SOURCES.md asks for a
    verifiable subset; REFERENCE.md keeps only boxed answers that "look verifiable").
    """
    if not gold or len(gold) > 80 or _UNVERIFIABLE_RE.search(gold):
        return False
    return len(_WORDS_RE.findall(_LATEX_CMD_RE.sub(" ", gold))) <= 2


def numinamath_item(row: dict, index: int) -> Item:
    if "prompt" in row:  # PRIME/Eurus local sample: chat prompt + reward_model.ground_truth
        prompt = row["prompt"]
        if not isinstance(prompt, list) or not prompt:
            raise RowError("field 'prompt' must be a non-empty list of messages")
        question = _text(prompt[-1], "content")
        gold = _text(row, "reward_model", "ground_truth")
    else:  # AI-MO/NuminaMath-CoT: problem + solution with a boxed answer
        question = _text(row, "problem")
        gold = _boxed_gold(_text(row, "solution"))
    return Item(f"numinamath_olympiads-{index}", question, gold.strip(), MATH, meta={"source": "olympiads"})


def _plain_math(question_key: str, gold_key: str, id_key: str | None, name: str) -> Callable[[dict, int], Item]:
    def convert(row: dict, index: int) -> Item:
        return Item(_id(row, id_key, name, index), _text(row, question_key), _text(row, gold_key).strip(), MATH)

    convert.__name__ = f"{name}_item"
    return convert


def math_level5_item(row: dict, index: int) -> Item:
    gold = _boxed_gold(_text(row, "solution"))
    meta = {"type": row.get("type"), "level": row.get("level")}
    return Item(_id(row, "unique_id", "math_level5", index), _text(row, "problem"), gold, MATH, meta=meta)


def gsm8k_item(row: dict, index: int) -> Item:
    answer = _text(row, "answer")
    if "####" not in answer:
        raise RowError("no '####' final answer in field 'answer'")
    gold = answer.rsplit("####", 1)[1].strip()
    if not gold:
        raise RowError("empty final answer after '####'")
    return Item(f"gsm8k-{index}", _text(row, "question"), gold, MATH)


# ---------------------------------------------------------------------- other converters


def strategyqa_item(row: dict, index: int) -> Item:
    if "answer" not in row:
        raise RowError("missing field 'answer'")
    gold = normalize_yes_no(row["answer"])
    return Item(_id(row, "qid", "strategyqa", index), _text(row, "question"), gold, YES_NO)


def commonsenseqa_item(row: dict, index: int) -> Item:
    choices = _choices(row)
    return Item(
        _id(row, "id", "commonsenseqa", index), _text(row, "question"), _choice_gold(row, choices),
        CHOICE, choices=choices,
    )


_SCIKNOWEVAL_TYPES = {
    "mcq-4-choices": CHOICE,
    "mcq-2-choices": CHOICE,
    "true_or_false": YES_NO,
    "filling": FILLING,
}


def _sciknoweval_choice(row: dict) -> tuple[str, tuple[tuple[str, str], ...]]:
    choices = _choices(row)
    return _choice_gold(row, choices), choices


_SCIKNOWEVAL_GOLD: dict[str, Callable[[dict], tuple[str, tuple[tuple[str, str], ...]]]] = {
    CHOICE: _sciknoweval_choice,
    YES_NO: lambda row: (normalize_yes_no(_text(row, "answer")), ()),
    FILLING: lambda row: (_text(row, "answer").strip(), ()),
}


def sciknoweval_item(domain: str) -> Callable[[dict, int], Item]:
    def convert(row: dict, index: int) -> Item:
        kind = _SCIKNOWEVAL_TYPES.get(row.get("type", ""))
        if kind is None:
            raise RowError(f"unknown SciKnowEval type {row.get('type')!r}")
        gold, choices = _SCIKNOWEVAL_GOLD[kind](row)
        details = row.get("details") or {}
        meta = {
            "type": row["type"],
            "task": details.get("task", ""),
            "subtask": details.get("subtask", ""),
            "instruction": (row.get("prompt") or {}).get("default", ""),
        }
        return Item(f"sciknoweval_{domain}-{index}", _text(row, "question"), gold, kind, choices, meta=meta)

    convert.__name__ = f"sciknoweval_{domain}_item"
    return convert


def _metadata(row: dict) -> dict:
    raw = row.get("metadata") or {}
    meta = json.loads(raw) if isinstance(raw, str) else raw
    if not isinstance(meta, dict):
        raise RowError("field 'metadata' must be a JSON object")
    return meta


# LiveCodeBench private tests: base64(zlib(pickle(JSON string))). The largest release_v6 blob
# decompresses to well under this; a bigger one is refused instead of filling memory.
LCB_BLOB_MAX_BYTES = 1 << 30


class _NoClassesUnpickler(pickle.Unpickler):
    """Unpickles plain data only: str, bytes, numbers, None/bools and containers of them.

    Every opcode that needs a class or callable (GLOBAL/STACK_GLOBAL, INST/OBJ, the copyreg
    extension registry) goes through ``find_class``, and this one refuses them all, so a pickle
    cannot call anything (``os.system``, ``eval``, a constructor) while being read."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refused: the blob references {module}.{name} (only plain data is accepted)")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused: persistent ids are not plain data")


def decode_lcb_blob(raw: str) -> list:
    """LiveCodeBench's compressed private tests: base64(zlib(pickle(JSON string))) -> the JSON list.

    Only for rows of the LiveCodeBench source (this row converter); user input goes through the
    JSON-only :func:`parse_test_cases`. Hostile blobs are refused with RowError: a pickle that
    references any class or callable, more than ``LCB_BLOB_MAX_BYTES`` decompressed, bad
    base64/zlib, or a payload that is not a JSON string."""
    try:
        compressed = base64.b64decode(raw.encode("ascii"), validate=True)
        inflater = zlib.decompressobj()
        data = inflater.decompress(compressed, LCB_BLOB_MAX_BYTES)
        if inflater.unconsumed_tail:
            raise RowError(f"private_test_cases decompresses to more than {LCB_BLOB_MAX_BYTES} bytes")
        payload = _NoClassesUnpickler(io.BytesIO(data)).load()
    except (UnicodeEncodeError, binascii.Error, zlib.error, EOFError) as exc:
        raise RowError(f"private_test_cases is neither JSON nor a LiveCodeBench blob: {exc}") from None
    except pickle.UnpicklingError as exc:
        raise RowError(f"private_test_cases: {exc}") from None
    if isinstance(payload, bytes):
        payload = payload.decode("utf-8", errors="strict")
    if not isinstance(payload, str):
        raise RowError(f"private_test_cases blob holds {type(payload).__name__}, expected a JSON string")
    try:
        tests = json.loads(payload)
    except json.JSONDecodeError as exc:
        raise RowError(f"private_test_cases blob is not JSON: {exc}") from None
    if not isinstance(tests, list):
        raise RowError(f"private_test_cases blob holds a JSON {type(tests).__name__}, expected a list")
    return tests


def _private_tests(raw: object) -> tuple:
    """``private_test_cases``: a JSON list (or string) as is, else a LiveCodeBench blob."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            raw = decode_lcb_blob(raw)
    return parse_test_cases(raw)


def livecodebench_item(row: dict, index: int) -> Item:
    """Hub rows carry ``private_test_cases`` (scored, split 50/50); the local sample only public."""
    private = row.get("private_test_cases")
    tests = _private_tests(private) if private else ()
    source = "private"
    if not tests:
        tests, source = parse_test_cases(_text(row, "public_test_cases")), "public"
    if not tests:
        raise RowError("no test cases")
    meta = _metadata(row)
    if any(t.testtype == "functional" for t in tests) and not meta.get("func_name"):
        raise RowError("functional tests without metadata.func_name")
    return Item(
        _id(row, "question_id", "livecodebench_medium", index),
        _text(row, "question_content"),
        "",
        CODE,
        tests=tests,
        meta={
            "func_name": meta.get("func_name"),
            "starter_code": row.get("starter_code") or "",
            "platform": row.get("platform"),
            "title": row.get("question_title"),
            "contest_date": row.get("contest_date"),
            "test_source": source,
        },
    )


# ---------------------------------------------------------------------- the entries

# livecodebench/code_generation_lite is read as plain JSON lines at a pinned commit: its loading
# script (code_generation_lite.py) is never run, and a later push to the dataset cannot change
# what "release_v6" means here. release_v6 is the union of the first six files.
LCB_REVISION = "0fe84c3912ea0c4d4a78037083943e8f0c4dd505"
LCB_RELEASE_V6_FILES = ("test.jsonl", "test2.jsonl", "test3.jsonl", "test4.jsonl", "test5.jsonl", "test6.jsonl")

MATH_SUBJECTS = (
    "algebra", "counting_and_probability", "geometry", "intermediate_algebra",
    "number_theory", "prealgebra", "precalculus",
)
_SCIKNOWEVAL_DOMAINS = {"chemistry": "Chemistry", "biology": "Biology", "materials": "Material", "physics": "Physics"}


def _sciknoweval_where(domain_label: str) -> Callable[[dict], bool]:
    def where(row: dict) -> bool:
        return row.get("domain") == domain_label and (row.get("details") or {}).get("level") == "L3"

    return where


BUILTIN: tuple[Benchmark, ...] = (
    Benchmark(
        "numinamath_olympiads", "NuminaMath olympiad problems with verifiable answers (training set; 400/100)",
        numinamath_item, math_prompt, (MATH,), "numinamath_olympiads.jsonl",
        HubSource("AI-MO/NuminaMath-CoT", "train", where=lambda row: row.get("source") == "olympiads"),
        keep=lambda item: looks_verifiable(item.gold), train_fraction=0.8,
    ),
    Benchmark(
        "hmmt_nov_2025", "HMMT November 2025 (30 problems)",
        _plain_math("problem", "answer", "id", "hmmt_nov_2025"), math_prompt, (MATH,), "hmmt_nov_2025.jsonl",
        HubSource("MathArena/hmmt_nov_2025", "train"), eval_n=None,
    ),
    Benchmark(
        "math_level5", "MATH test, level 5 (500 sampled, seed 42)",
        math_level5_item, math_prompt, (MATH,), "math_level5.jsonl",
        HubSource("EleutherAI/hendrycks_math", "test", MATH_SUBJECTS, where=lambda row: row.get("level") == "Level 5"),
    ),
    Benchmark(
        "acereason_math", "AceReason-Math (no packaged sample: the hub, or acereason_math.jsonl in SRPO_BENCHMARK_DIR)",
        _plain_math("problem", "answer", None, "acereason_math"), math_prompt, (MATH,), "acereason_math.jsonl",
        HubSource("nvidia/AceReason-Math", "train"),
    ),
    Benchmark(
        "math500", "MATH-500", _plain_math("problem", "answer", "unique_id", "math500"), math_prompt, (MATH,),
        "math500.jsonl", HubSource("HuggingFaceH4/MATH-500", "test"),
    ),
    Benchmark(
        "aime24", "AIME 2024", _plain_math("problem", "answer", "id", "aime24"), math_prompt, (MATH,),
        "aime24.jsonl", HubSource("HuggingFaceH4/aime_2024", "train"), eval_n=None,
    ),
    Benchmark(
        "gsm8k", "GSM8K test", gsm8k_item, math_prompt, (MATH,), "gsm8k.jsonl",
        HubSource("openai/gsm8k", "test", ("main",)),
    ),
    Benchmark(
        "strategyqa", "StrategyQA (yes/no)", strategyqa_item, strategyqa_prompt, (YES_NO,), "strategyqa.jsonl",
        HubSource("ChilleD/StrategyQA", "test"),
    ),
    Benchmark(
        "commonsenseqa", "CommonsenseQA validation (5 options)", commonsenseqa_item, commonsenseqa_prompt,
        (CHOICE,), "commonsenseqa.jsonl", HubSource("tau/commonsense_qa", "validation"), labels=tuple("ABCDE"),
    ),
    *(
        Benchmark(
            f"sciknoweval_{domain}", f"SciKnowEval v2 {label}, level L3",
            sciknoweval_item(domain), sciknoweval_prompt, (CHOICE, YES_NO, FILLING),
            f"sciknoweval_{domain}.jsonl",
            HubSource("hicai-zju/SciKnowEval", "test", where=_sciknoweval_where(label)),
            labels=tuple("ABCD"),
        )
        for domain, label in _SCIKNOWEVAL_DOMAINS.items()
    ),
    Benchmark(
        "livecodebench_medium", "LiveCodeBench release_v6, medium (tests split 50/50 train/held-out)",
        livecodebench_item, livecodebench_prompt, (CODE,), "livecodebench_medium.jsonl",
        HubSource(
            "livecodebench/code_generation_lite", "test",
            where=lambda row: row.get("difficulty") == "medium",
            revision=LCB_REVISION, data_files=LCB_RELEASE_V6_FILES,
        ),
    ),
)

# The evaluation suite of SPEC.md section 3 (10 benchmarks plus LiveCodeBench).
EVAL_SUITE: tuple[str, ...] = (
    "numinamath_olympiads", "hmmt_nov_2025", "math_level5", "strategyqa", "acereason_math",
    "sciknoweval_chemistry", "sciknoweval_biology", "sciknoweval_materials", "sciknoweval_physics",
    "commonsenseqa", "livecodebench_medium",
)

# The training set: numinamath_olympiads with load(split="train").
TRAIN_BENCHMARK = "numinamath_olympiads"


def register_builtin() -> None:
    for benchmark in BUILTIN:
        register_benchmark(benchmark, replace_existing=True)

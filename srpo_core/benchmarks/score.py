"""``srpo score INPUT.jsonl``: score responses against gold answers, one JSON line per input.

Each input line is a JSON object with ``benchmark`` (a registry name), ``gold``, ``response``,
plus ``choices`` (labels, [label, text] pairs, or {"label": [...], "text": [...]}) for multiple
choice, ``tests`` (LiveCodeBench test list or JSON string) and ``func_name`` (or ``metadata``)
for code, and optionally ``answer_type`` and ``id``. Output, in input order, on stdout:
``{"line", "id", "benchmark", "correct", "score", "extracted", "reason"}``. A summary (counts and
accuracy per benchmark) goes to stderr.

Throughput: every expensive check already runs in a separate process (math-verify in a pool of
``--workers`` checker processes with hard timeouts, code in sandboxed processes), so lines are
dispatched from ``--workers`` threads; no torch, no fork of a threaded parent.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from srpo_core.benchmarks import CHOICE, CODE, YES_NO, Benchmark, Item, ScoreOptions, get_benchmark
from srpo_core.verifiers.choice import normalize_labels, normalize_yes_no
from srpo_core.verifiers.code import parse_test_cases
from srpo_core.verifiers.math import configure_pool
from srpo_core.verifiers.verdict import NO_ANSWER, Verdict


class InputError(ValueError):
    """A malformed input line (message starts with ``file:line:``)."""


@dataclass(frozen=True)
class Task:
    line: int
    benchmark: Benchmark
    item: Item
    response: str


# ---------------------------------------------------------------------- records -> items


def _choices(raw: object) -> tuple[tuple[str, str], ...]:
    if isinstance(raw, dict):
        labels, texts = list(raw.get("label", [])), list(raw.get("text", []))
        if len(labels) != len(texts):
            raise ValueError("choices.label and choices.text differ in length")
        pairs = list(zip(labels, texts))
    elif isinstance(raw, list):
        pairs = [(c[0], c[1]) if isinstance(c, (list, tuple)) else (c, "") for c in raw]
    else:
        raise ValueError(f"choices must be a list or an object, got {type(raw).__name__}")
    labels = normalize_labels([label for label, _ in pairs])
    return tuple(zip(labels, (str(text) for _, text in pairs)))


def _is_yes_no(gold: object) -> bool:
    try:
        normalize_yes_no(gold)
    except ValueError:
        return False
    return True


def infer_answer_type(bench: Benchmark, record: dict) -> str:
    """The record's ``answer_type``, else the benchmark's only type, else a guess from fields."""
    allowed = bench.answer_types
    if record.get("answer_type") is not None:
        kind = record["answer_type"]
        if kind not in allowed:
            raise ValueError(f"answer_type {kind!r} is not one of {allowed} for {bench.name}")
        return kind
    if len(allowed) == 1:
        return allowed[0]
    gold = record.get("gold")
    if CHOICE in allowed and (record.get("choices") or str(gold).strip().upper() in bench.labels):
        return CHOICE
    if YES_NO in allowed and _is_yes_no(gold):
        return YES_NO
    rest = [kind for kind in allowed if kind not in (CHOICE, YES_NO)]
    if not rest:
        raise ValueError(f"cannot tell the answer type of this {bench.name} record; add answer_type")
    return rest[0]


def _func_name(record: dict) -> str | None:
    if record.get("func_name"):
        return str(record["func_name"])
    meta = record.get("metadata") or {}
    meta = json.loads(meta) if isinstance(meta, str) else meta
    return meta.get("func_name") if isinstance(meta, dict) else None


def item_from_record(record: dict, line: int) -> tuple[Benchmark, Item, str]:
    for key in ("benchmark", "response"):
        if key not in record:
            raise ValueError(f"missing field {key!r}")
    if not isinstance(record["response"], str):
        raise ValueError("field 'response' must be a string")
    bench = get_benchmark(str(record["benchmark"]))
    kind = infer_answer_type(bench, record)
    if kind == CODE:
        if "tests" not in record:
            raise ValueError("code records need field 'tests'")
        tests = parse_test_cases(record["tests"])
        item = Item(str(record.get("id", line)), "", "", kind, tests=tests, meta={"func_name": _func_name(record)})
        return bench, item, record["response"]
    if "gold" not in record or record["gold"] is None or str(record["gold"]).strip() == "":
        raise ValueError("missing or empty field 'gold'")
    gold = record["gold"]
    choices: tuple[tuple[str, str], ...] = ()
    if kind == CHOICE:
        choices = _choices(record["choices"]) if record.get("choices") else _choices(list(bench.labels))
        if str(gold).strip().upper() not in {label for label, _ in choices}:
            raise ValueError(f"gold {gold!r} is not one of the choice labels")
        gold = str(gold).strip().upper()
    elif kind == YES_NO:
        gold = normalize_yes_no(gold)
    return bench, Item(str(record.get("id", line)), "", str(gold), kind, choices), record["response"]


def read_tasks(path: str, on_error: str) -> tuple[list[Task], list[tuple[int, str]]]:
    """Tasks and ``(line, message)`` errors; with on_error="raise" the first error raises."""
    tasks: list[Task] = []
    errors: list[tuple[int, str]] = []
    stream = sys.stdin if path == "-" else open(path, encoding="utf-8")  # noqa: SIM115
    try:
        for line_no, text in enumerate(stream, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
                if not isinstance(record, dict):
                    raise ValueError(f"expected a JSON object, got {type(record).__name__}")
                bench, item, response = item_from_record(record, line_no)
            except (ValueError, KeyError, TypeError) as exc:
                message = f"{path}:{line_no}: {exc.args[0] if isinstance(exc, KeyError) else exc}"
                if on_error == "raise":
                    raise InputError(message) from exc
                errors.append((line_no, message))
                continue
            tasks.append(Task(line_no, bench, item, response))
    finally:
        if stream is not sys.stdin:
            stream.close()
    return tasks, errors


# ---------------------------------------------------------------------- scoring and output


def score_task(task: Task, options: ScoreOptions) -> Verdict:
    return task.benchmark.score(task.response, task.item, options)


def summarize(tasks: Sequence[Task], verdicts: Sequence[Verdict], n_errors: int) -> str:
    per: dict[str, Counter] = defaultdict(Counter)
    for task, verdict in zip(tasks, verdicts):
        c = per[task.benchmark.name]
        c["n"] += 1
        c["correct"] += verdict.correct
        c["score"] += verdict.score
        c["timeout"] += verdict.timed_out
        c["no_answer"] += verdict.reason == NO_ANSWER
    total = len(tasks)
    right = sum(v.correct for v in verdicts)
    lines = [f"scored {total} lines, {right} correct ({right / total:.1%})" if total else "scored 0 lines"]
    if n_errors:
        lines.append(f"skipped {n_errors} malformed lines")
    for name in sorted(per):
        c = per[name]
        lines.append(
            f"  {name}: n={c['n']} correct={c['correct']} accuracy={c['correct'] / c['n']:.4f} "
            f"mean_score={c['score'] / c['n']:.4f} timeouts={c['timeout']} no_answer={c['no_answer']}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        tasks, errors = read_tasks(args.input, args.on_error)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot read {args.input}: {exc}", file=sys.stderr)
        return 2
    configure_pool(args.workers)
    options = ScoreOptions(math_timeout_s=args.timeout, code_split=args.code_split, math_fallback=args.math_fallback)
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        futures = [pool.submit(score_task, task, options) for task in tasks]
        verdicts = []
        for task, future in zip(tasks, futures):
            try:
                verdicts.append(future.result())
            except Exception as exc:  # noqa: BLE001 - name the line, then stop
                print(f"error: {args.input}:{task.line}: {type(exc).__name__}: {exc}", file=sys.stderr)
                for f in futures:
                    f.cancel()
                return 2
    by_line = {task.line: (task, verdict) for task, verdict in zip(tasks, verdicts)}
    out = sys.stdout
    error_at = dict(errors)
    for line in sorted([*by_line, *error_at]):
        if line in by_line:
            task, verdict = by_line[line]
            record = {"line": line, "id": task.item.id, "benchmark": task.benchmark.name, **verdict.to_dict()}
        else:
            record = {"line": line, "correct": None, "score": None, "error": error_at[line]}
        out.write(json.dumps(record) + "\n")
    out.flush()
    print(summarize(tasks, verdicts, len(errors)), file=sys.stderr)
    return 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "score", help="score responses against gold answers (JSONL in, JSONL out)",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument("input", help="JSONL file of {benchmark, gold, response, ...} ('-' = stdin)")
    parser.add_argument("--workers", type=int, default=2, help="parallel checks (default 2)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per math check (default 5)")
    parser.add_argument(
        "--code-split", choices=("all", "train", "eval"), default="all",
        help="which test cases score code records (default: all given)",
    )
    parser.add_argument(
        "--math-fallback", action="store_true",
        help="math: also read an unboxed answer ('answer is', '####', the last number); default: the last \\boxed{} or score 0",
    )
    parser.add_argument(
        "--on-error", choices=("raise", "skip"), default="raise",
        help="malformed input lines: stop with an error (default) or report them and go on",
    )
    parser.set_defaults(func=run)
    return parser

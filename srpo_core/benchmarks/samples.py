"""The benchmark samples shipped inside the package, and how they are cut from the full files.

The package carries a few real rows of every benchmark with a local file
(``srpo_core/assets/benchmarks/``, provenance and licenses in the README there), so that the
tests and the demos run from a clone or a wheel alone. A sample is a selection of whole lines of
the full file, byte for byte, in file order: :data:`SAMPLE_RULES` says which (all rows, the first
``n``, or the first ``n`` of each value of a field). Rebuild them from a folder holding the full
files (for example the ``SRPO_BENCHMARK_DIR`` of a paper run) with::

    python -m srpo_core.benchmarks.samples FULL_DIR [--out DIR]

Nothing here reads a fixed folder outside the package: the source folder is always an argument.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGED_DIR = Path(__file__).resolve().parents[1] / "assets" / "benchmarks"


@dataclass(frozen=True)
class SampleRule:
    """Which lines of a full file are shipped.

    first: keep the first ``first`` rows (per value of ``per`` when set); None keeps every row.
    per: a top-level field whose values each get their own ``first`` rows (answer types of
      SciKnowEval, platforms of LiveCodeBench), so that every kind a test scores is present.
    why: what needs these rows (tests, demos), said in the README.
    """

    first: int | None
    per: str | None = None
    why: str = ""


SAMPLE_RULES: dict[str, SampleRule] = {
    # the training set of the demos and of tests that count its 80/20 split (76/20 verifiable items)
    "numinamath_olympiads.jsonl": SampleRule(None, why="training demos; tests count its 76/20 split"),
    "hmmt_nov_2025.jsonl": SampleRule(None, why="evaluated whole (eval_n = all)"),
    "aime24.jsonl": SampleRule(None, why="evaluated whole (eval_n = all)"),
    "math500.jsonl": SampleRule(20),
    "math_level5.jsonl": SampleRule(20),
    "gsm8k.jsonl": SampleRule(20),
    "strategyqa.jsonl": SampleRule(20),
    # README's comparison demo evaluates 50 CommonsenseQA items
    "commonsenseqa.jsonl": SampleRule(50, why="README's `srpo compare ... --benchmarks commonsenseqa:50`"),
    "sciknoweval_chemistry.jsonl": SampleRule(10, per="type"),
    "sciknoweval_biology.jsonl": SampleRule(10, per="type"),
    "sciknoweval_materials.jsonl": SampleRule(10, per="type"),
    "sciknoweval_physics.jsonl": SampleRule(10, per="type"),
    "livecodebench_medium.jsonl": SampleRule(10, per="platform"),
}


def select_lines(lines: list[str], rule: SampleRule, source: str = "<lines>") -> list[str]:
    """The lines ``rule`` keeps, in file order (blank lines dropped; each kept line unchanged)."""
    kept: list[str] = []
    counts: dict[object, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if rule.first is None:
            kept.append(line)
            continue
        key: object = None
        if rule.per is not None:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{source}:{number}: invalid JSON: {exc}") from exc
            if not isinstance(row, dict) or rule.per not in row:
                raise ValueError(f"{source}:{number}: no field {rule.per!r} to stratify on")
            key = json.dumps(row[rule.per], sort_keys=True)
        if counts.get(key, 0) < rule.first:
            counts[key] = counts.get(key, 0) + 1
            kept.append(line)
    return kept


def build(source_dir: Path, out_dir: Path = PACKAGED_DIR) -> dict[str, tuple[int, int, str]]:
    """Write every sample of :data:`SAMPLE_RULES` from ``source_dir`` into ``out_dir``.

    Returns file -> (rows kept, rows in the source, sha256 of the source file).
    """
    missing = [name for name in SAMPLE_RULES if not (source_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{source_dir}: missing {', '.join(missing)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, tuple[int, int, str]] = {}
    for name, rule in SAMPLE_RULES.items():
        data = (source_dir / name).read_bytes()
        lines = [line for line in data.decode("utf-8").splitlines(keepends=True) if line.strip()]
        kept = select_lines(lines, rule, str(source_dir / name))
        text = "".join(line if line.endswith("\n") else line + "\n" for line in kept)
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out_dir / name)
        report[name] = (len(kept), len(lines), hashlib.sha256(data).hexdigest())
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m srpo_core.benchmarks.samples", description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="folder holding the full benchmark files")
    parser.add_argument("--out", type=Path, default=PACKAGED_DIR, help=f"where to write the samples (default {PACKAGED_DIR})")
    args = parser.parse_args(argv)
    try:
        report = build(args.source, args.out)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, (kept, total, digest) in report.items():
        print(f"{name}: {kept} of {total} rows (source sha256 {digest})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

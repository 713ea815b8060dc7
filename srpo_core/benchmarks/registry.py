"""Benchmark registry: name -> :class:`Benchmark`, with local-JSONL and hub loaders.

Other modules add entries with :func:`register_benchmark` (e.g. the synthetic task of
``srpo_core.tasks``); the built-in entries live in :mod:`srpo_core.benchmarks.catalog`.

Local files: an explicit ``path``, else ``$SRPO_BENCHMARK_DIR/<file>``, else the sample shipped
in the package (``srpo_core/assets/benchmarks/<file>``, a few rows per benchmark: see
:mod:`srpo_core.benchmarks.samples`). A file found nowhere raises :class:`BenchmarkFileMissing`,
whose message is one line naming the file and the ways to provide it. Hub:
``datasets.load_dataset`` (imported lazily; a clear :class:`BenchmarkUnavailable` when it is
missing or the hub cannot be reached).
Sampling: ``random.Random(seed)`` shuffles the items, the first ``n`` are kept (REFERENCE.md).
Malformed rows (bad JSON, missing question or gold) are reported with file and line and are
either fatal (``on_error="raise"``) or skipped with a warning that counts them
(``on_error="skip"``); they are never scored.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import random
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from srpo_core.benchmarks.items import Item
from srpo_core.benchmarks.samples import PACKAGED_DIR
from srpo_core.benchmarks.scoring import ScoreOptions, score_item
from srpo_core.verifiers.verdict import Verdict

log = logging.getLogger(__name__)

ON_ERROR = ("raise", "skip")
SOURCES = ("local", "hub")
ENV_BENCHMARK_DIR = "SRPO_BENCHMARK_DIR"
ENV_BENCHMARK_SOURCE = "SRPO_BENCHMARK_SOURCE"  # read by the benchmark tasks: "local" (default) or "hub"


class BenchmarkDataError(ValueError):
    """A malformed row or file; the message starts with ``file:line:``."""


class BenchmarkUnavailable(RuntimeError):
    """The requested source cannot be read here (no local file, no ``datasets``, no hub).

    Its message is one line meant for the console: a command catches it and prints it.
    """


class BenchmarkFileMissing(BenchmarkUnavailable, FileNotFoundError):
    """A benchmark's local file exists nowhere it is looked for (``file`` names it)."""

    def __init__(self, message: str, benchmark: str, file: str):
        super().__init__(message)
        self.benchmark = benchmark
        self.file = file

    def __str__(self) -> str:
        return str(self.args[0])


class BenchmarkDataWarning(UserWarning):
    """Malformed rows were skipped (``on_error="skip"``); ``skipped`` says how many."""

    def __init__(self, message: str, skipped: int = 0):
        super().__init__(message)
        self.skipped = skipped


class RowError(ValueError):
    """Raised by row converters for a row that cannot become an :class:`Item`."""


@dataclass(frozen=True)
class HubSource:
    """Where the full dataset lives: ``load_dataset(path, config, split=split, **kwargs)``
    for each config, rows concatenated, then filtered by ``where``.

    With ``data_files`` the repository's files are read by datasets' packaged ``json`` builder
    from ``hf://datasets/<path>@<revision>/<file>`` (no loading script of the repository runs);
    ``revision`` (a commit hash) is then required. ``trust_remote_code`` is refused."""

    path: str
    split: str
    configs: tuple[str | None, ...] = (None,)
    where: Callable[[dict], bool] | None = None
    kwargs: tuple[tuple[str, Any], ...] = ()
    revision: str | None = None
    data_files: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if any(key == "trust_remote_code" for key, _ in self.kwargs):
            raise ValueError(f"{self.path}: trust_remote_code is not allowed (it runs the dataset repository's code)")
        if self.data_files and not (self.revision and re.fullmatch(r"[0-9a-f]{40}", self.revision)):
            raise ValueError(f"{self.path}: data_files need revision= a 40-hex commit hash, got {self.revision!r}")
        if self.data_files and self.configs != (None,):
            raise ValueError(f"{self.path}: data_files name the files directly; configs must be (None,)")

    def load_args(self, config: str | None) -> tuple[tuple, dict]:
        """(args, kwargs) of ``datasets.load_dataset`` for one config."""
        if self.data_files:
            urls = [f"hf://datasets/{self.path}@{self.revision}/{name}" for name in self.data_files]
            return ("json",), {"data_files": {self.split: urls}, "split": self.split, **dict(self.kwargs)}
        revision = {"revision": self.revision} if self.revision else {}
        return (self.path, config), {"split": self.split, **revision, **dict(self.kwargs)}


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: its sources, how rows become items, prompts and scoring.

    to_item(row, index) -> Item converts a local or hub row (raising RowError/KeyError/
      TypeError for a malformed one).
    prompt(item) -> str is the question text for the rollout template's ``{question}``.
    keep(item) -> bool drops valid but unusable items (e.g. unverifiable golds); not errors.
    eval_n / seed: the evaluation sample size and shuffle seed of REFERENCE.md.
    train_fraction: for a benchmark that is also a training set, the share of the sample
      used for training (``load(split="train"|"test")``).
    answer_types: the answer types its items can have (first = default for ``srpo score``).
    labels: default choice labels for ``srpo score`` records without ``choices``.
    """

    name: str
    description: str
    to_item: Callable[[dict, int], Item]
    prompt: Callable[[Item], str]
    answer_types: tuple[str, ...]
    local_file: str | None = None
    hub: HubSource | None = None
    keep: Callable[[Item], bool] | None = None
    eval_n: int | None = 500
    seed: int = 42
    train_fraction: float | None = None
    labels: tuple[str, ...] = ()

    # ------------------------------------------------------------------ loading

    def local_path(self, path: str | os.PathLike | None = None) -> Path:
        """The local JSONL file to read: ``path``, else ``$SRPO_BENCHMARK_DIR/<file>``, else the
        packaged sample (:class:`BenchmarkFileMissing` when none exists)."""
        if path is not None:
            candidate = Path(path)
            if not candidate.is_file():
                raise BenchmarkFileMissing(
                    f"{self.name}: benchmark file not found: {candidate} (check data.path / path=)", self.name, str(candidate)
                )
            return candidate
        if self.local_file is None:
            raise BenchmarkFileMissing(f"{self.name}: no local file is known; {self._provide_hint()}", self.name, "")
        env = os.environ.get(ENV_BENCHMARK_DIR)
        places = [Path(env) / self.local_file] if env else []
        places.append(PACKAGED_DIR / self.local_file)
        for candidate in places:
            if candidate.is_file():
                if env and candidate.parent == PACKAGED_DIR:
                    log.warning("%s: %s is not in $%s=%s; reading the packaged sample %s", self.name, self.local_file, ENV_BENCHMARK_DIR, env, candidate)
                return candidate
        looked = (f"${ENV_BENCHMARK_DIR} ({env}) or " if env else "") + "the packaged samples"
        raise BenchmarkFileMissing(
            f"{self.name}: benchmark file {self.local_file} not found in {looked}; {self._provide_hint()}", self.name, self.local_file
        )

    def _provide_hint(self) -> str:
        """The ways to provide this benchmark's data, for one-line errors."""
        ways = []
        if self.local_file is not None:
            ways.append(f"set {ENV_BENCHMARK_DIR} to a folder holding {self.local_file}")
        if self.hub is not None:
            ways.append(f"load {self.hub.path} from the hub (pip install datasets; {ENV_BENCHMARK_SOURCE}=hub or source='hub')")
        return "provide it: " + ", or ".join(ways) if ways else "no source is known"

    def is_packaged_sample(self, path: str | os.PathLike | None = None) -> bool:
        """Whether local loads read the sample shipped in the package (a few rows, not the benchmark)."""
        try:
            return self.local_path(path).parent == PACKAGED_DIR
        except BenchmarkUnavailable:
            return False

    def load(
        self,
        source: str = "local",
        *,
        path: str | os.PathLike | None = None,
        n: int | None = None,
        seed: int | None = None,
        split: str | None = None,
        on_error: str = "raise",
    ) -> list[Item]:
        """Items of this benchmark.

        source: "local" (JSONL sample) or "hub" (full dataset by name).
        n: keep the first ``n`` items after a seeded shuffle; None keeps all in file order.
        split: "train" or "test" for benchmarks with ``train_fraction``: the seeded shuffle,
          the first ``n`` (default ``eval_n``), then the first ``train_fraction`` is train.
        """
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        seed = self.seed if seed is None else seed
        if source == "local":
            items = self.load_local(path, on_error=on_error)
        else:
            items = self.load_hub(on_error=on_error)
        if split is None:
            return sample_items(items, n, seed)
        return self._split(items, split, n, seed)

    def load_eval(self, source: str = "local", *, seed: int | None = None, on_error: str = "raise") -> list[Item]:
        """The evaluation set of REFERENCE.md: the test split for a training benchmark, else the
        first ``eval_n`` items after the seeded shuffle (all items when ``eval_n`` is None)."""
        if self.train_fraction is not None:
            return self.load(source, seed=seed, split="test", on_error=on_error)
        return self.load(source, n=self.eval_n, seed=seed, on_error=on_error)

    def load_local(self, path: str | os.PathLike | None = None, *, on_error: str = "raise") -> list[Item]:
        """All items of the local JSONL file, in file order (after ``keep``)."""
        file = self.local_path(path)
        rows, errors = read_jsonl(file)
        return self._convert(((f"{file}:{line}", row) for line, row in rows), errors, on_error, str(file))

    def load_hub(self, *, on_error: str = "raise") -> list[Item]:
        """All items of the full dataset from the Hugging Face hub (after ``where``/``keep``)."""
        if self.hub is None:
            raise BenchmarkUnavailable(f"{self.name}: no hub source is known")
        rows = load_hub_rows(self.hub)
        label = f"hub:{self.hub.path}"
        return self._convert(((f"{label}#{i}", row) for i, row in enumerate(rows)), [], on_error, label)

    def _convert(
        self, located_rows: Iterable[tuple[str, dict]], errors: list[str], on_error: str, label: str
    ) -> list[Item]:
        items: list[Item] = []
        dropped = 0
        if errors and on_error == "raise":
            raise BenchmarkDataError(errors[0])
        for index, (where, row) in enumerate(located_rows):
            try:
                item = self.to_item(row, index)
            except (RowError, KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
                message = f"{where}: {self.name}: {type(exc).__name__}: {exc}"
                if on_error == "raise":
                    raise BenchmarkDataError(message) from exc
                errors.append(message)
                continue
            if self.keep is not None and not self.keep(item):
                dropped += 1
                continue
            items.append(item)
        if errors:
            warnings.warn(
                BenchmarkDataWarning(f"{self.name}: skipped {len(errors)} malformed rows of {label}; first: {errors[0]}", len(errors)),
                stacklevel=3,
            )
            for message in errors:
                log.warning("skipped malformed row: %s", message)
        if dropped:
            log.info("%s: %d items of %s dropped by the benchmark's filter", self.name, dropped, label)
        return items

    def _split(self, items: list[Item], split: str, n: int | None, seed: int) -> list[Item]:
        if self.train_fraction is None:
            raise ValueError(f"{self.name} has no train/test split")
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        pool = sample_items(items, n if n is not None else (self.eval_n or len(items)), seed)
        cut = int(len(pool) * self.train_fraction)
        return pool[:cut] if split == "train" else pool[cut:]

    # ------------------------------------------------------------------ prompts and scores

    def format_prompt(self, item: Item) -> str:
        """The question text (with options and answer instruction) for the rollout template."""
        return self.prompt(item)

    def score(self, response: str, item: Item, options: ScoreOptions | None = None, **overrides: Any) -> Verdict:
        """Verdict for ``response``; ``overrides`` replace fields of ``options`` (e.g.
        ``code_split="train"`` for the training reward of a code problem)."""
        opts = options or ScoreOptions()
        if overrides:
            opts = replace(opts, **overrides)
        return score_item(response, item, opts)


# ---------------------------------------------------------------------- registry

BENCHMARKS: dict[str, Benchmark] = {}


def register_benchmark(benchmark: Benchmark, *, replace_existing: bool = False) -> Benchmark:
    """Add ``benchmark`` to the registry (a second registration of a name is an error)."""
    if benchmark.name in BENCHMARKS and not replace_existing:
        raise ValueError(f"benchmark {benchmark.name!r} is already registered")
    BENCHMARKS[benchmark.name] = benchmark
    return benchmark


def get_benchmark(name: str) -> Benchmark:
    try:
        return BENCHMARKS[name]
    except KeyError:
        known = ", ".join(sorted(BENCHMARKS)) or "(none)"
        raise KeyError(f"unknown benchmark {name!r}; known: {known}") from None


def list_benchmarks() -> list[str]:
    return sorted(BENCHMARKS)


def check_sources(names: Iterable[str], *, source: str | None = None, paths: dict[str, str] | None = None) -> None:
    """Fail early, with the one-line :class:`BenchmarkUnavailable` a command prints, when a named
    benchmark's data cannot be read here. Cheap: files are located, not parsed.

    names: task or benchmark names (names that are not benchmarks, e.g. "synthetic", are skipped).
    source: "local" or "hub" (default ``$SRPO_BENCHMARK_SOURCE``, else "local").
    paths: name -> an explicit local file (``data.path``), which then must exist.
    """
    source = source or os.environ.get(ENV_BENCHMARK_SOURCE) or "local"
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r} (${ENV_BENCHMARK_SOURCE})")
    paths = paths or {}
    for name in names:
        bench = BENCHMARKS.get(name)
        if bench is None:
            continue
        if paths.get(name):
            bench.local_path(paths[name])
        elif source == "local":
            bench.local_path()
        elif bench.hub is None:
            raise BenchmarkUnavailable(f"{name}: no hub source is known; {bench._provide_hint()}")
        elif importlib.util.find_spec("datasets") is None:
            raise BenchmarkUnavailable(f"{name}: loading {bench.hub.path} from the hub needs the `datasets` library (pip install datasets)")


# ---------------------------------------------------------------------- helpers


def benchmark_dir() -> Path:
    """The first folder searched for local files: ``$SRPO_BENCHMARK_DIR`` if set, else the
    packaged samples (a file missing from ``$SRPO_BENCHMARK_DIR`` is then read from the samples)."""
    env = os.environ.get(ENV_BENCHMARK_DIR)
    return Path(env) if env else PACKAGED_DIR


def read_jsonl(path: Path) -> tuple[list[tuple[int, dict]], list[str]]:
    """(line number, object) pairs and ``file:line: why`` messages for unreadable lines."""
    rows: list[tuple[int, dict]] = []
    errors: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                errors.append(f"{path}:{line_no}: invalid JSON: {exc}")
                continue
            if not isinstance(obj, dict):
                errors.append(f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}")
                continue
            rows.append((line_no, obj))
    return rows, errors


def sample_items(items: Sequence[Item], n: int | None, seed: int) -> list[Item]:
    """All items (n=None) or the first ``n`` after shuffling with ``random.Random(seed)``."""
    if n is None:
        return list(items)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    shuffled = list(items)
    random.Random(seed).shuffle(shuffled)
    return shuffled[:n]


def load_hub_rows(hub: HubSource) -> list[dict]:
    """Rows of a hub dataset via ``datasets.load_dataset`` (lazy import, clear errors)."""
    try:
        import datasets  # noqa: PLC0415 - optional, heavy dependency
    except ImportError as exc:
        raise BenchmarkUnavailable(
            f"loading {hub.path} from the hub needs the `datasets` library (pip install datasets); "
            "or use source='local'"
        ) from exc
    rows: list[dict] = []
    for config in hub.configs:
        try:
            args, kwargs = hub.load_args(config)
            ds = datasets.load_dataset(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - network, auth, missing config: all unavailable
            raise BenchmarkUnavailable(
                f"could not load {hub.path} (config={config}, split={hub.split}) from the hub: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        rows.extend(dict(row) for row in ds if hub.where is None or hub.where(row))
    return rows

"""The `srpo` command. Each subcommand lives in its own module with `register(subparsers)`.

Modules are imported lazily so that `srpo score` does not pay for torch and `srpo train` does
not pay for the theory code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module that defines `register(subparsers)` and sets `func` on its parser
SUBCOMMANDS: dict[str, str] = {
    "train": "srpo_core.loop",
    "build-tiny": "srpo_core.tiny.build",
    "score": "srpo_core.benchmarks.score",
    "compare": "srpo_core.compare",
    "theory": "srpo_core.theory.cli",
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="srpo", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    for name, module in SUBCOMMANDS.items():
        if wanted is not None and name != wanted:
            sub.add_parser(name)
            continue
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name is not None and exc.name.startswith("srpo_core"):
                sub.add_parser(name, help="(not available in this build)")
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.error(f"subcommand {args.command!r} is not available in this build")
    from srpo_core.benchmarks.registry import BenchmarkUnavailable  # no torch
    from srpo_core.config import ConfigError

    try:
        return int(func(args) or 0)
    except (ConfigError, BenchmarkUnavailable) as exc:
        print(f"srpo {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

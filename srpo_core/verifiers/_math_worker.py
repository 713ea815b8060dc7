"""Child process of :mod:`srpo_core.verifiers.math`: runs math-verify checks one at a time.

Protocol (JSON lines): after its imports it writes ``{"ready": true}``; then for every request
``{"gold": str, "answer": str}`` read on stdin it writes ``{"equal": bool}`` or
``{"error": str}``. The parent enforces the wall-clock limit by killing this process, so
math-verify's own signal-based timeouts are disabled here (``timeout_seconds=None``).

Only protocol lines reach the parent: they go to a private copy of the original stdout, and
``sys.stdout`` (and file descriptor 1) point at stderr, so a library that prints (sympy, the
LaTeX parser, a warning hook) cannot corrupt the stream. The parent still treats any line that
is not a protocol reply as a failed check and replaces the worker.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import threading
import time

# Bound the address space so a pathological expression fails with MemoryError, not an OOM kill.
_MEMORY_BYTES = 4 << 30


def _limit_memory() -> None:
    try:
        _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = _MEMORY_BYTES if hard == resource.RLIM_INFINITY else min(_MEMORY_BYTES, hard)
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    except (ValueError, OSError):
        pass


def as_latex(expr: str) -> str:
    """Wrap a bare answer so math-verify's LaTeX extractor reads all of it."""
    return "\\boxed{" + expr + "}"


def check(gold: str, answer: str) -> bool:
    from math_verify import parse, verify

    gold_parsed = parse(as_latex(gold), parsing_timeout=None)
    answer_parsed = parse(as_latex(answer), parsing_timeout=None)
    if not gold_parsed or not answer_parsed:
        return False
    # allow_set_relation_comp: an interval gold matches an inequality answer ((2,oo) vs x>2).
    return bool(verify(gold_parsed, answer_parsed, allow_set_relation_comp=True, timeout_seconds=None))


def _exit_with_parent() -> None:
    """Exit when the parent dies, even in the middle of a long computation."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _protocol_stream():
    """A private text stream on the original stdout; fd 1 and ``sys.stdout`` then go to stderr."""
    sys.stdout.flush()
    out = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return out


def main() -> int:
    out = _protocol_stream()
    _exit_with_parent()
    logging.disable(logging.WARNING)  # math-verify warns that its timeout is disabled
    _limit_memory()
    check("1", "1")  # warm the parser caches before declaring readiness
    out.write('{"ready": true}\n')
    out.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            reply = {"equal": check(str(req["gold"]), str(req["answer"]))}
        except Exception as exc:  # noqa: BLE001 - every failure is reported to the parent
            reply = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        out.write(json.dumps(reply) + "\n")
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())

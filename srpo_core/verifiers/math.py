"""Math answer checking with math-verify, with a hard wall-clock limit that works anywhere.

Extraction (pure string work, done in the caller): the last brace-balanced ``\\boxed{...}``; else
the text after the last "final answer is" / "answer:" phrase on its line; else the text after the
last ``####``; else the last number in the response.

Comparison: math-verify (``parse`` + ``verify``) on the extracted answer against the gold, both
wrapped as ``\\boxed{...}`` so that the whole string is read as one LaTeX expression.

Timeouts. math-verify's own timeouts use ``signal.alarm`` and only work on the main thread of
the main interpreter. Here its timeouts are turned off (``timeout_seconds=None``) and each check
runs in a child process from a small reusable pool (:class:`MathCheckerPool`). The caller waits
at most ``timeout_s`` for the reply; on expiry the child is killed (SIGKILL) and replaced, and
the verdict is "incorrect, timeout". This works from threads, from daemonic processes and from
pool workers, and a pathological expression can never hang the caller. The children are plain
``subprocess`` processes speaking JSON lines, so no pickling and no fork of a threaded parent.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import select
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from srpo_core.verifiers.extract import last_boxed
from srpo_core.verifiers.verdict import ERROR, NO_ANSWER, TIMEOUT, WRONG, Verdict, right, wrong

DEFAULT_TIMEOUT_S = 5.0
_STARTUP_TIMEOUT_S = 120.0

# --------------------------------------------------------------------------- extraction

_ANSWER_PHRASE_RE = re.compile(
    r"(?:final\s+answer|the\s+answer|answer)\s*(?:is|:|=)\s*:?\s*(?P<rest>[^\n]+)", re.IGNORECASE
)
_HASH_ANSWER_RE = re.compile(r"####\s*(?P<rest>[^\n]+)")
_NUMBER_RE = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:\s*/\s*\d+)?|-?\.\d+")
_WRAPPERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"), ("**", "**"), ("`", "`"))


def _clean(answer: str) -> str:
    """Strip math delimiters, markdown emphasis and trailing punctuation from a plain answer."""
    s = answer.strip()
    changed = True
    while changed and s:
        changed = False
        s2 = s.rstrip(" .;,").strip("*").strip()
        for left, right_ in _WRAPPERS:
            if len(s2) >= len(left) + len(right_) and s2.startswith(left) and s2.endswith(right_):
                s2 = s2[len(left) : len(s2) - len(right_)].strip()
        if s2 != s:
            s, changed = s2, True
    # An inline formula followed by prose: keep the first $...$ span.
    inline = re.match(r"^\$([^$]+)\$", s)
    if inline:
        s = inline.group(1).strip()
    return s


def extract_math_answer(response: str, boxed_only: bool = False) -> str | None:
    """The final answer of a response (see module docstring), or None if there is none.

    boxed_only: accept only a ``\\boxed{}`` answer (the reference's rule), no plain fallbacks.
    """
    boxed = last_boxed(response)
    if boxed is not None or boxed_only:
        return boxed or None
    for pattern in (_ANSWER_PHRASE_RE, _HASH_ANSWER_RE):
        matches = list(pattern.finditer(response))
        if matches:
            cleaned = _clean(matches[-1].group("rest"))
            if cleaned:
                return cleaned
    numbers = _NUMBER_RE.findall(response)
    return numbers[-1].replace(" ", "") if numbers else None


# --------------------------------------------------------------------------- normalisation

_QUICK_DROP_RE = re.compile(r"\\left|\\right|\\!|\\,|\\;|\\ |\s|\$")


def normalize_gold(gold: str) -> str:
    """Gold as stored in the datasets, with surrounding math delimiters removed."""
    s = str(gold).strip()
    boxed = last_boxed(s) if "\\boxed" in s else None
    return _clean(boxed if boxed is not None else s)


def _quick_key(expr: str) -> str:
    return _QUICK_DROP_RE.sub("", expr).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")


# --------------------------------------------------------------------------- worker pool


def _package_root() -> str:
    return str(Path(__file__).resolve().parents[2])


def _read_line(fd: int, deadline: float) -> bytes | None:
    """One newline-terminated line from ``fd``; None on deadline; EOFError if the pipe closed."""
    buf = b""
    while not buf.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            raise EOFError("math-verify worker closed its output")
        buf += chunk
    return buf


WORKER_COMMAND: tuple[str, ...] = (sys.executable, "-m", "srpo_core.verifiers._math_worker")


def parse_reply(line: bytes) -> dict | None:
    """A worker's reply line as ``{"equal": bool}``, ``{"error": str}`` or ``{"ready": True}``;
    None for anything else (not JSON, not an object, other keys or types)."""
    try:
        reply = json.loads(line)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return None
    if not isinstance(reply, dict) or len(reply) != 1:
        return None
    ((key, value),) = reply.items()
    if (key in ("equal", "ready") and isinstance(value, bool)) or (key == "error" and isinstance(value, str)):
        return reply
    return None


class _Worker:
    """One math-verify child process."""

    def __init__(self, startup_timeout_s: float, command: tuple[str, ...] = WORKER_COMMAND) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_package_root(), env.get("PYTHONPATH", "")) if p
        )
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            list(command),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            bufsize=0,
            env=env,
            start_new_session=True,  # a Ctrl-C aimed at the parent does not kill checks midway
        )
        try:
            line = _read_line(self.proc.stdout.fileno(), time.monotonic() + startup_timeout_s)
        except EOFError:
            line = None
        if line is None or parse_reply(line) != {"ready": True}:
            self._stop()
            self._stderr.seek(0)
            detail = self._stderr.read().decode(errors="replace")[-2000:]
            self.kill()
            seen = f"; its first line was {line[:200]!r}" if line else ""
            raise RuntimeError(f"math-verify worker failed to start: {detail or 'no output'}{seen}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def request(self, gold: str, answer: str, timeout_s: float) -> dict | None:
        """The worker's reply, or None on timeout (the worker is then killed)."""
        payload = (json.dumps({"gold": gold, "answer": answer}) + "\n").encode()
        try:
            os.write(self.proc.stdin.fileno(), payload)
            line = _read_line(self.proc.stdout.fileno(), time.monotonic() + timeout_s)
        except (BrokenPipeError, EOFError, OSError) as exc:
            self.kill()
            return {"error": f"math-verify worker died: {exc}"}
        if line is None:
            self.kill()
            return None
        reply = parse_reply(line)
        if reply is None or "ready" in reply:
            # A corrupted protocol stream: this worker's next lines cannot be trusted either.
            self.kill()
            return {"error": f"math-verify worker sent a malformed reply: {line[:200]!r}"}
        return reply

    def _stop(self) -> None:
        """SIGKILL (if still running) and reap the child."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def kill(self) -> None:
        """Stop and reap the child and close its pipes (idempotent)."""
        self._stop()
        for stream in (self.proc.stdin, self.proc.stdout, self._stderr):
            try:
                stream.close()
            except OSError:
                pass


class MathCheckerPool:
    """A bounded, thread-safe pool of math-verify child processes with hard timeouts.

    At most ``size`` checks run at once; further callers wait for a free worker (that wait is
    bounded because every check is). Workers start lazily and are replaced after a kill: a worker
    that times out, dies, or answers with anything but a protocol line (:func:`parse_reply`) is
    killed and reaped, and that check is reported as ``{"error": ...}`` (scored 0 with a reason).
    ``command`` starts one worker (the real one by default).
    """

    def __init__(self, size: int, startup_timeout_s: float = _STARTUP_TIMEOUT_S, command: tuple[str, ...] = WORKER_COMMAND) -> None:
        if size < 1:
            raise ValueError(f"pool size must be >= 1, got {size}")
        self.size = size
        self.command = tuple(command)
        self.pid = os.getpid()
        self._startup_timeout_s = startup_timeout_s
        self._slots = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._closed = False

    def check(self, gold: str, answer: str, timeout_s: float) -> dict | None:
        """``{"equal": bool}`` or ``{"error": str}``; None when the check ran past ``timeout_s``."""
        with self._slots:
            with self._lock:
                if self._closed:
                    raise RuntimeError("math checker pool is closed")
                worker = self._idle.pop() if self._idle else None
            if worker is not None and not worker.alive():
                worker.kill()  # reap it and close its pipes
                worker = None
            if worker is None:
                worker = _Worker(self._startup_timeout_s, self.command)
            reply = worker.request(gold, answer, timeout_s)
            if worker.alive():
                with self._lock:
                    if self._closed:
                        worker.kill()
                    else:
                        self._idle.append(worker)
            else:
                worker.kill()
            return reply

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.kill()


_POOL: MathCheckerPool | None = None
_POOL_LOCK = threading.Lock()


def default_pool_size() -> int:
    env = os.environ.get("SRPO_MATH_WORKERS")
    return int(env) if env else max(1, min(4, os.cpu_count() or 1))


def get_pool() -> MathCheckerPool:
    """The process-wide pool (recreated after a fork: children never reuse inherited workers)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL.pid != os.getpid():
            _POOL = MathCheckerPool(default_pool_size())
        return _POOL


def configure_pool(size: int) -> MathCheckerPool:
    """Replace the process-wide pool by one of ``size`` workers (e.g. ``srpo score --workers``)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is not None and _POOL.pid == os.getpid():
            _POOL.close()
        _POOL = MathCheckerPool(size)
        return _POOL


@atexit.register
def _close_pool() -> None:
    if _POOL is not None and _POOL.pid == os.getpid():
        _POOL.close()


# --------------------------------------------------------------------------- public API


def verify_math_answer(answer: str, gold: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Verdict:
    """Compare an already extracted ``answer`` with ``gold``."""
    gold_n = normalize_gold(gold)
    if not gold_n:
        raise ValueError("empty gold answer")
    answer_n = _clean(answer)
    if not answer_n:
        return wrong(None, NO_ANSWER)
    if _quick_key(answer_n) == _quick_key(gold_n):
        return right(answer_n)
    reply = get_pool().check(gold_n, answer_n, timeout_s)
    if reply is None:
        return wrong(answer_n, TIMEOUT)
    if "error" in reply:
        return wrong(answer_n, f"{ERROR}: {reply['error']}")
    return right(answer_n) if reply["equal"] else wrong(answer_n, WRONG)


def verify_math(
    response: str, gold: str, timeout_s: float = DEFAULT_TIMEOUT_S, *, boxed_only: bool = False
) -> Verdict:
    """Check a free-form response against a gold answer (thread-safe; never hangs)."""
    extracted = extract_math_answer(response, boxed_only)
    if extracted is None:
        if not normalize_gold(gold):
            raise ValueError("empty gold answer")
        return wrong(None, NO_ANSWER)
    return verify_math_answer(extracted, gold, timeout_s)

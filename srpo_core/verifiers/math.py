"""Math answer checking with math-verify, with a hard wall-clock limit that works anywhere.

Extraction (pure string work, done in the caller): the content of the last brace-balanced
``\\boxed{...}``. A response without one has no answer and scores 0: the paper's rule
(REFERENCE.md, "Rollouts"), which also makes a chain cut off before its box worth nothing. With
``fallback=True`` (an option, off by default; ``ScoreOptions.math_fallback``, ``srpo score
--math-fallback``) an unboxed response is read instead: the text after the last "final answer
is" / "answer:" phrase on its line; else the text after the last ``####``; else the last number.

Normalisation (:func:`answer_form`, :func:`comparison_pairs`; pure string work, on the gold and
the answer alike): forms math-verify's parser misreads or drops are rewritten before it sees
them: currencies and units in words or symbols, degree marks (a degree gold against an answer in
radians is compared in degrees), percent marks and words (83% also matches 0.83), digit-group
separators, repeating decimals (to exact fractions), plain mixed numbers ("1 4/5"), chained
equalities ("x = y = 1/2") and unions of inequalities ("x < 2 or x > 3").

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
from dataclasses import dataclass
from fractions import Fraction
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


def extract_math_answer(response: str, fallback: bool = False) -> str | None:
    """The content of the last ``\\boxed{}`` of a response, or None if it has none.

    fallback: read an unboxed response too ("answer is" / "####" / last number; see the module
    docstring). Off by default: the paper scores a response without a box 0.
    """
    boxed = last_boxed(response)
    if boxed is not None or not fallback:
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


# --------------------------------------------------------------------------- answer forms
# Rewrites of forms math-verify's parser misreads or drops, applied to the gold and the answer
# alike before any comparison (each was a miss on tests/data/math_answer_pairs.jsonl).

_TEXT_CMD = r"\\(?:text|textrm|mathrm|mbox|operatorname)\s*"
_CURRENCY_RE = re.compile(r"US\\\$|\\\$|\$|\\textdollar|\\euro|€|£|\\pounds|¥|¢|\\textcent|\\cent\b|\bUSD\b|\bEUR\b")
_EMPTY_TEXT_RE = re.compile(_TEXT_CMD + r"\{[\s~]*\}")
_DEGREE_RE = re.compile(
    r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|°|\\degree|" + _TEXT_CMD + r"\{\s*(?:°|degrees?)\s*\}|\bdegrees?\b"
)
_RADIAN_RE = re.compile(_TEXT_CMD + r"\{\s*(?:radians?|rad)\s*\}|\bradians?\b")
_PERCENT_RE = re.compile(_TEXT_CMD + r"\{\s*(?:\\?%|percent|per\s?cent)\s*\}|\\%|%|\bper\s?cent\b")
# trailing units: \text{ cm}, \mathrm{~kg}^2, or plain words after a number ("190 cm", "400 g")
_TEXT_UNIT_RE = re.compile(r"^(?P<value>.*?[\d}])\s*(?:\\[,;!: ]|~|\s)*" + _TEXT_CMD + r"\{\s*~?[A-Za-z][A-Za-z\s.~/]*\}(?:\^\{?\d\}?)?\s*$")
_WORD_UNIT_RE = re.compile(r"^(?P<value>.*?[\d}])\s+(?:[A-Za-z]{2,}|[gmsLhK])(?:\s+[A-Za-z]+)*\.?(?:\^\{?\d\}?)?\s*$")
_GROUP_SEP_RE = re.compile(r"(?<=\d)(?:\{,\}|,\\!|\\,|\\;|\\:|\\ |~|\\!)(?=\d{3}(?!\d))")
_SPACE_GROUPS_RE = re.compile(r"(?<![\d.,])\d{1,3}(?: \d{3})+(?![\d/.,])")
_COMMA_NUMBER_RE = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_BRACED_COMMA_NUMBER_RE = re.compile(r"\{(-?\d{1,3}(?:,\d{3})+(?:\.\d+)?)\}")
_OVERLINE_RE = re.compile(r"(?<![\d.])(-?)(\d*)\.(\d*)\\overline\s*(?:\{(\d+)\}|(\d))")
_PAREN_REPEAT_RE = re.compile(r"(?<![\d.])(-?)(\d*)\.(\d*)\((\d+)\)")
_ELLIPSIS_RE = re.compile(r"(?<![\d.])(-?)(\d*)\.(\d+)\s*(?:\\ldots|\\cdots|\\dots|\.\.\.|…)")
_PLAIN_MIXED_RE = re.compile(r"^(-?)(\d+)\s+(\d+)\s*/\s*(\d+)$")
_CHAIN_EQ_RE = re.compile(r"^([A-Za-z](?:_\{?\w+\}?)?)((?:\s*=\s*[A-Za-z](?:_\{?\w+\}?)?)+)\s*=\s*(?P<value>[^=]+)$")
_OR_RE = re.compile(r"\s*(?:" + _TEXT_CMD + r"\{\s*or\s*\}|\\lor|\\vee|\bor\b)\s*")
_AND_RE = re.compile(r"\s*(?:" + _TEXT_CMD + r"\{\s*(?:and|or)\s*\}|\band\b|\bor\b)\s*")
_NUM = r"(-?(?:\d+(?:\.\d+)?|\\frac\{[^{}]+\}\{[^{}]+\}|\\infty|[^<>=\s\\]+))"
_LT = {"<": ")", "\\lt": ")", "\\le": "]", "\\leq": "]", "\\leqslant": "]"}
_GT = {">": "(", "\\gt": "(", "\\ge": "[", "\\geq": "[", "\\geqslant": "["}
_REL = r"(<|>|\\lt|\\gt|\\leqslant|\\geqslant|\\leq|\\geq|\\le|\\ge)"
_ONE_SIDED_RE = re.compile(r"^([A-Za-z])\s*" + _REL + r"\s*(.+)$")
_TWO_SIDED_RE = re.compile(r"^(.+?)\s*" + _REL + r"\s*([A-Za-z])\s*" + _REL + r"\s*(.+)$")


@dataclass(frozen=True)
class AnswerForm:
    """An answer rewritten for comparison, with the marks that were removed from it."""

    text: str
    degrees: bool = False
    radians: bool = False
    percent: bool = False


def _repeating_fraction(sign: str, whole: str, prefix: str, period: str) -> str:
    """``\\frac{p}{q}`` of sign whole.prefix(period)(period)... (exact)."""
    a, p = len(prefix), len(period)
    value = Fraction(int(whole or "0")) + Fraction(int((prefix + period) or "0") - int(prefix or "0"), 10**a * (10**p - 1))
    value = -value if sign else value
    return f"\\frac{{{value.numerator}}}{{{value.denominator}}}" if value.denominator != 1 else str(value.numerator)


def _ellipsis_period(digits: str) -> tuple[str, str] | None:
    """(non-repeating prefix, period) of decimals written "0.8626262...": the shortest period seen
    at least twice after the shortest prefix; None when no repetition is visible."""
    for p in range(1, len(digits) // 2 + 1):
        for a in range(len(digits) - 2 * p + 1):
            tail = digits[a:]
            if all(tail[i] == tail[i % p] for i in range(len(tail))):
                return digits[:a], tail[:p]
    return None


def _interval(part: str) -> str | None:
    """Interval notation of one inequality in one variable ("x > 2", "-3 \\le x < 1"), or None."""
    m = _TWO_SIDED_RE.match(part)
    if m and m.group(2) in _LT and m.group(4) in _LT:  # a < x <= b
        left = "(" if _LT[m.group(2)] == ")" else "["
        return f"{left}{m.group(1).strip()}, {m.group(5).strip()}{_LT[m.group(4)]}"
    m = _ONE_SIDED_RE.match(part)
    if not m:
        return None
    rel, bound = m.group(2), m.group(3).strip()
    if rel in _LT:
        return f"(-\\infty, {bound}{_LT[rel]}"
    return f"{_GT[rel]}{bound}, \\infty)"


def answer_form(expr: str) -> AnswerForm:
    """``expr`` with currencies, units, degree/radian/percent marks, digit-group separators,
    repeating decimals, plain mixed numbers, chained equalities ("x = y = 1/2") and unions of
    inequalities ("x < 2 or x > 3") rewritten into forms math-verify compares correctly."""
    s = expr.replace("\u2212", "-").replace("\\displaystyle", "").strip()
    s = _EMPTY_TEXT_RE.sub("", _CURRENCY_RE.sub("", s))
    degrees = bool(_DEGREE_RE.search(s))
    s = _DEGREE_RE.sub("", s)
    radians = bool(_RADIAN_RE.search(s))
    s = _RADIAN_RE.sub("", s)
    percent = bool(_PERCENT_RE.search(s))
    s = _PERCENT_RE.sub("", s).strip()
    for pattern in (_TEXT_UNIT_RE, _TEXT_UNIT_RE, _WORD_UNIT_RE):
        m = pattern.match(s)
        if m:
            s = m.group("value").strip()
    s = _GROUP_SEP_RE.sub("", s)
    s = _SPACE_GROUPS_RE.sub(lambda m: m.group(0).replace(" ", ""), s)
    if _COMMA_NUMBER_RE.match(s):
        s = s.replace(",", "")
    s = _BRACED_COMMA_NUMBER_RE.sub(lambda m: "{" + m.group(1).replace(",", "") + "}", s)
    s = _OVERLINE_RE.sub(lambda m: _repeating_fraction(m.group(1), m.group(2), m.group(3), m.group(4) or m.group(5)), s)
    s = _PAREN_REPEAT_RE.sub(lambda m: _repeating_fraction(*m.group(1, 2, 3, 4)), s)

    def ellipsis(m: re.Match) -> str:
        found = _ellipsis_period(m.group(3))
        return _repeating_fraction(m.group(1), m.group(2), *found) if found else m.group(0)

    s = _ELLIPSIS_RE.sub(ellipsis, s)
    m = _PLAIN_MIXED_RE.match(s)
    if m:
        sign, whole, num, den = m.groups()
        s = f"{sign}\\frac{{{int(whole) * int(den) + int(num)}}}{{{den}}}"
    m = _CHAIN_EQ_RE.match(s)
    if m and "," not in m.group("value"):
        count = 1 + m.group(2).count("=")
        s = "(" + ", ".join([m.group("value").strip()] * count) + ")"
    parts = _OR_RE.split(s)
    if len(parts) > 1:
        intervals = [_interval(part.strip()) for part in parts]
        if all(intervals):
            s = " \\cup ".join(intervals)
    s = _AND_RE.sub(", ", s)
    return AnswerForm(re.sub(r"\s+", " ", s).strip(), degrees, radians, percent)


def _split_top_level(s: str) -> list[str]:
    """Comma-separated elements of ``s`` outside any brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(s):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(s[start:i])
            start = i + 1
    parts.append(s[start:])
    return [p.strip() for p in parts]


def _scaled(text: str, factor: str) -> str:
    return ", ".join(f"\\left({e}\\right)\\cdot {factor}" for e in _split_top_level(text))


def comparison_pairs(gold: str, answer: str) -> list[tuple[str, str]]:
    """The (gold, answer) strings to check, in order; the answer is right if any pair is equal.

    Angles: a degree gold against an answer in radians (it has \\pi and no degree mark) compares
    the answer times 180/pi, and the other way round. Percentages: when one side only carries a
    percent mark, its number is compared both as written and divided by 100 (83% = 83 = 0.83).
    """
    g, a = answer_form(gold), answer_form(answer)
    g_text, a_text = g.text, a.text
    if g.degrees and not a.degrees and "\\pi" in a_text:
        a_text = _scaled(a_text, "\\frac{180}{\\pi}")
    elif a.degrees and not g.degrees and "\\pi" in g_text:
        a_text = _scaled(a_text, "\\frac{\\pi}{180}")
    pairs = [(g_text, a_text)]
    if g.percent and not a.percent:
        pairs.append((f"\\frac{{{g_text}}}{{100}}", a_text))
    elif a.percent and not g.percent:
        pairs.append((g_text, f"\\frac{{{a_text}}}{{100}}"))
    return pairs


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
    """Compare an already extracted ``answer`` with ``gold`` (after :func:`comparison_pairs`);
    ``timeout_s`` bounds all the checks of one answer together."""
    gold_n = normalize_gold(gold)
    if not gold_n:
        raise ValueError("empty gold answer")
    answer_n = _clean(answer)
    if not answer_n:
        return wrong(None, NO_ANSWER)
    if _quick_key(answer_n) == _quick_key(gold_n):
        return right(answer_n)
    pairs = comparison_pairs(gold_n, answer_n)
    if any(_quick_key(a) == _quick_key(g) for g, a in pairs if a and g):
        return right(answer_n)
    deadline = time.monotonic() + timeout_s
    failure = WRONG
    for g, a in pairs:
        if not a or not g:
            continue
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return wrong(answer_n, TIMEOUT)
        reply = get_pool().check(g, a, remaining)
        if reply is None:
            return wrong(answer_n, TIMEOUT)
        if "error" in reply:
            failure = f"{ERROR}: {reply['error']}"
        elif reply["equal"]:
            return right(answer_n)
    return wrong(answer_n, failure)


def verify_math(
    response: str, gold: str, timeout_s: float = DEFAULT_TIMEOUT_S, *, fallback: bool = False
) -> Verdict:
    """Check a response's last ``\\boxed{}`` against a gold answer (thread-safe; never hangs).

    fallback: also read an unboxed response (off: no box is "no_answer", score 0).
    """
    extracted = extract_math_answer(response, fallback)
    if extracted is None:
        if not normalize_gold(gold):
            raise ValueError("empty gold answer")
        return wrong(None, NO_ANSWER)
    return verify_math_answer(extracted, gold, timeout_s)

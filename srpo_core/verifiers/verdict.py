"""The result every verifier returns: a small frozen record, cheap to log and to serialise."""

from __future__ import annotations

from dataclasses import asdict, dataclass

# Reasons shared by all verifiers (free text may follow after a colon).
CORRECT = "correct"
WRONG = "wrong"
NO_ANSWER = "no_answer"
TIMEOUT = "timeout"
ERROR = "error"


@dataclass(frozen=True)
class Verdict:
    """Outcome of checking one response.

    correct: whether the response counts as right (for code: all scored tests passed).
    score: the reward in [0, 1] (1/0 for answers, fraction of tests passed for code).
    extracted: the answer (or program) taken from the response, None when nothing was found.
    reason: one of the constants above, optionally followed by ": detail".
    """

    correct: bool
    score: float
    extracted: str | None
    reason: str

    @property
    def timed_out(self) -> bool:
        return self.reason.split(":", 1)[0] == TIMEOUT

    def to_dict(self) -> dict:
        return asdict(self)


def right(extracted: str | None) -> Verdict:
    return Verdict(True, 1.0, extracted, CORRECT)


def wrong(extracted: str | None, reason: str = WRONG) -> Verdict:
    return Verdict(False, 0.0, extracted, reason)

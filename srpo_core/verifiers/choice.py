"""Multiple-choice, yes/no and fill-in answer checking (CommonsenseQA, SciKnowEval, StrategyQA).

Multiple choice (REFERENCE.md "Rewards"), first rule that yields a valid label wins:
  1. the last ``\\boxed{X}`` holding a label (``\\boxed{B}``, ``\\boxed{(B)}``, ``\\boxed{\\text{B}}``);
  2. the last "answer is (X)" / "answer is X";
  3. a trailing "X." or "X)" at the very end of the response;
  4. the last standalone capital letter.
Only the item's labels count (a "C" is ignored for a 2-option question).

Yes/no (StrategyQA, SciKnowEval true_or_false): the last boxed yes/no/true/false, else the last
standalone "yes"/"no" word. Gold may be a JSON bool or "Yes"/"No"/"true"/"false".

Fill-in (SciKnowEval ``filling``): the normalised gold must occur in the normalised response
(REFERENCE.md), with one tightening: not glued to a digit on either side, so a wrong leading
coefficient or trailing subscript is not accepted as a substring match.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from srpo_core.verifiers.extract import boxed_contents, last_boxed
from srpo_core.verifiers.verdict import NO_ANSWER, Verdict, right, wrong

LETTERS = "ABCDEFGHIJ"

_LATEX_WRAP_RE = re.compile(r"\\(?:text|textbf|mathrm|mathbf|textrm|ce)\s*\{([^{}]*)\}")
_BOXED_LABEL_RE = re.compile(r"^\(?([A-J])\)?(?:[.):]|\s|$)")
_ANSWER_IS_RE = re.compile(r"(?i:answer\s+is)\s*:?\s*\**\s*\(?([A-J])\b")
_TRAILING_RE = re.compile(r"(?:^|[\s(*])([A-J])[.)]\**\s*$")
_STANDALONE_RE = re.compile(r"(?<![A-Za-z0-9_\\])([A-J])(?![A-Za-z0-9_])")


def _unwrap_latex(s: str) -> str:
    prev = None
    while prev != s:
        prev, s = s, _LATEX_WRAP_RE.sub(r"\1", s)
    return s


def normalize_labels(labels: Sequence[str]) -> tuple[str, ...]:
    out = tuple(str(label).strip().upper() for label in labels)
    bad = [label for label in out if len(label) != 1 or label not in LETTERS]
    if not out or bad:
        raise ValueError(f"choice labels must be letters A-J, got {list(labels)!r}")
    return out


def extract_choice(response: str, labels: Sequence[str]) -> str | None:
    """The chosen label (see module docstring), or None."""
    valid = set(normalize_labels(labels))
    for content in reversed(boxed_contents(response)):
        m = _BOXED_LABEL_RE.match(_unwrap_latex(content).strip().strip("*").strip())
        if m and m.group(1) in valid:
            return m.group(1)
    for m in reversed(list(_ANSWER_IS_RE.finditer(response))):
        if m.group(1) in valid:
            return m.group(1)
    m = _TRAILING_RE.search(response.strip())
    if m and m.group(1) in valid:
        return m.group(1)
    for letter in reversed(_STANDALONE_RE.findall(response)):
        if letter in valid:
            return letter
    return None


def verify_choice(response: str, gold: str, labels: Sequence[str]) -> Verdict:
    gold_label = str(gold).strip().upper()
    if gold_label not in normalize_labels(labels):
        raise ValueError(f"gold label {gold!r} is not one of the labels {list(labels)!r}")
    chosen = extract_choice(response, labels)
    if chosen is None:
        return wrong(None, NO_ANSWER)
    return right(chosen) if chosen == gold_label else wrong(chosen)


# --------------------------------------------------------------------------- yes / no

_YES_NO_WORDS = {"yes": "yes", "no": "no", "true": "yes", "false": "no"}
_YES_NO_RE = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


def normalize_yes_no(gold: object) -> str:
    """'yes' or 'no' from a bool or a yes/no/true/false string (ValueError otherwise)."""
    if isinstance(gold, bool):
        return "yes" if gold else "no"
    word = _YES_NO_WORDS.get(str(gold).strip().strip(".").lower())
    if word is None:
        raise ValueError(f"yes/no gold must be a bool or yes/no/true/false, got {gold!r}")
    return word


def extract_yes_no(response: str) -> str | None:
    for content in reversed(boxed_contents(response)):
        word = _unwrap_latex(content).strip().strip(".*()").strip().lower()
        if word in _YES_NO_WORDS:
            return _YES_NO_WORDS[word]
    found = _YES_NO_RE.findall(response)
    return found[-1].lower() if found else None


def verify_yes_no(response: str, gold: object) -> Verdict:
    gold_word = normalize_yes_no(gold)
    said = extract_yes_no(response)
    if said is None:
        return wrong(None, NO_ANSWER)
    return right(said) if said == gold_word else wrong(said)


# --------------------------------------------------------------------------- fill-in

_ARROWS_RE = re.compile(r"<=>|<->|->|=>|→|⟶|⇌|⇒|\\(?:rightarrow|longrightarrow|to|rightleftharpoons)")
_FILL_DROP_RE = re.compile(r"\\(?:mathrm|text|ce|textrm|mathbf)|[\s${}_]")


def normalize_filling(text: str) -> str:
    """Lower-case, arrows as '=', LaTeX wrappers, braces, underscores and whitespace removed."""
    return _FILL_DROP_RE.sub("", _ARROWS_RE.sub("=", str(text))).lower()


def contains_whole(hay: str, needle: str) -> bool:
    """``needle`` occurs in ``hay`` with no digit glued to either end (so "2NaBr" does not match
    inside "12NaBr" and "2N" does not match inside "2N2": a different coefficient or subscript)."""
    start = hay.find(needle)
    while start != -1:
        end = start + len(needle)
        before_ok = start == 0 or not hay[start - 1].isdigit()
        after_ok = end == len(hay) or not hay[end].isdigit()
        if before_ok and after_ok:
            return True
        start = hay.find(needle, start + 1)
    return False


def verify_filling(response: str, gold: str) -> Verdict:
    needle = normalize_filling(gold)
    if not needle:
        raise ValueError("empty gold answer")
    extracted = last_boxed(response)
    if contains_whole(normalize_filling(response), needle):
        return right(extracted)
    return wrong(extracted)

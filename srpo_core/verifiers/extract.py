"""Answer extraction shared by the verifiers: boxed expressions and fenced code blocks.

Everything here is pure string processing (no math-verify, no subprocesses), so it is safe to
call from any thread and costs microseconds.
"""

from __future__ import annotations

import re

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")


def boxed_contents(text: str) -> list[str]:
    """All brace-balanced ``\\boxed{...}`` / ``\\fbox{...}`` contents, in order of appearance.

    An unbalanced (truncated) last box is ignored.
    """
    out: list[str] = []
    for match in _BOX_RE.finditer(text):
        start = match.end()
        depth = 1
        i = start
        while i < len(text):
            ch = text[i]
            if ch == "\\" and i + 1 < len(text):  # skip escaped braces like \{ \}
                i += 2
                continue
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    out.append(text[start:i].strip())
                    break
            i += 1
    return out


def last_boxed(text: str) -> str | None:
    """Content of the last brace-balanced ``\\boxed{...}``, or None."""
    found = boxed_contents(text)
    return found[-1] if found else None


_FENCE_RE = re.compile(r"```[ \t]*([A-Za-z0-9_+#.-]*)[^\n]*\n(.*?)```", re.DOTALL)


def last_code_block(text: str) -> str | None:
    """Body of the last closed fenced code block (any language tag), or None.

    A block left open at the end (a truncated response) does not count.
    """
    blocks = _FENCE_RE.findall(text)
    if not blocks:
        return None
    # Prefer the last block tagged as Python, else the last block of any tag.
    python_blocks = [body for tag, body in blocks if tag.lower() in ("python", "py", "python3")]
    body = (python_blocks or [body for _tag, body in blocks])[-1]
    return body if body.strip() else None

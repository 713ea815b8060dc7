"""Versioned prompt templates (rollout and self-localization), kept as files in templates/.

Templates are used verbatim: only the named fields `{question}`, `{chain_text}` and `{n_steps}`
are substituted, so literal braces such as `\\boxed{answer}` survive. A template name is either a
file stem in the package (`rollout_v1`) or a path to a text file.
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

FIELDS = ("question", "chain_text", "n_steps")
THOUGHT_END = "</thought>"


@functools.lru_cache(maxsize=None)
def load_template(name: str) -> str:
    path = Path(name)
    if path.suffix == ".txt" and path.exists():
        return path.read_text(encoding="utf-8")
    pkg = resources.files("srpo_core") / "templates" / f"{name}.txt"
    if not pkg.is_file():
        known = sorted(p.name[:-4] for p in (resources.files("srpo_core") / "templates").iterdir() if p.name.endswith(".txt"))
        raise FileNotFoundError(f"template {name!r} is neither a .txt file nor one of {known}")
    return pkg.read_text(encoding="utf-8")


def render(template: str, **fields: object) -> str:
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise KeyError(f"unknown template fields {sorted(unknown)}; allowed {FIELDS}")
    out = template
    for key, value in fields.items():
        out = out.replace("{" + key + "}", str(value))
    return out


def render_chain(thoughts: list[str]) -> str:
    """Steps as the localization prompt shows them: '\\nStep i: ' + thought without its delimiter."""
    return "".join(f"\nStep {i}: {t.replace(THOUGHT_END, '').strip()}" for i, t in enumerate(thoughts, 1))


def rollout_prompt(template_name: str, question: str) -> str:
    return render(load_template(template_name), question=question)


def localization_prompt(template_name: str, question: str, thoughts: list[str]) -> str:
    return render(load_template(template_name), question=question, chain_text=render_chain(thoughts), n_steps=len(thoughts))

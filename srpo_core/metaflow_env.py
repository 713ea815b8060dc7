"""Two things a process needs before it drives Metaflow, in one place (the flow files and every
process that launches a flow with Metaflow's `Runner` call them):

ensure_metaflow_user()
    Metaflow refuses to run without a user name, and it never accepts `root` (it reads
    METAFLOW_USER or its config's USER, then SUDO_USER, USERNAME, USER). In a container run as
    root with a bare environment none is usable, so the README's first command failed with
    "Metaflow could not determine your user name". When Metaflow finds none, the process (and the
    tasks it starts, which inherit the environment) runs as DEFAULT_USER, said once on stderr.
    A user name Metaflow does find (environment or config file) is never replaced.

runner()
    Metaflow's `Runner` class, imported so that torch can still be imported afterwards.
    Metaflow's Runner imports its vendored typeguard, which imports Metaflow's vendored copy of
    typing_extensions. On Python < 3.13 every typing_extensions copy replaces
    `typing._collect_parameters` (and, on older Pythons, `_check_generic` / `_collect_type_vars`)
    with its own, which recognises only ITS OWN `NoDefault` sentinel. After the vendored copy wins,
    a Generic over TypeVars made by the real typing_extensions (torch.distributed.tensor, imported
    by peft) sees their "no default" marker as a default and raises "Type parameter ~_T1 without a
    default follows type parameter with a default" (Netflix/metaflow#2462). `runner()` imports the
    Runner's machinery, then gives every hook the vendored copy took back to the real
    typing_extensions, the copy torch, transformers and peft use; Metaflow's own vendored typeguard
    only checks the types of arguments and is unaffected by which copy collects parameters.
"""

from __future__ import annotations

import os
import sys
import typing

DEFAULT_USER = "srpo"
TYPING_HOOKS = ("_collect_parameters", "_check_generic", "_collect_type_vars")
VENDORED = "metaflow._vendor.typing_extensions"


def ensure_metaflow_user(default: str = DEFAULT_USER) -> str:
    """The user name Metaflow will run as; DEFAULT_USER (set in METAFLOW_USER, said once) when
    Metaflow can find none."""
    import metaflow.metaflow_config as mf_config
    from metaflow.util import get_username

    user = get_username()
    if user or os.environ.get("METAFLOW_PRODUCTION_TOKEN"):
        return user or ""
    os.environ["METAFLOW_USER"] = default  # inherited by every task and epoch-step run
    mf_config.USER = default  # get_username() reads it at each call
    print(f"srpo: no user name for Metaflow (METAFLOW_USER, USERNAME and USER are unset or root); running as {default!r} (set METAFLOW_USER to choose)", file=sys.stderr)
    return default


def restore_typing_hooks() -> list[str]:
    """Give back to the real typing_extensions every `typing` hook Metaflow's vendored copy took;
    the names restored."""
    try:
        import typing_extensions as real
    except ImportError:  # pragma: no cover - torch requires typing_extensions
        return []
    restored = []
    for name in TYPING_HOOKS:
        current = getattr(typing, name, None)
        if current is not None and getattr(current, "__module__", "") == VENDORED and hasattr(real, name):
            setattr(typing, name, getattr(real, name))
            restored.append(name)
    return restored


def runner():
    """Metaflow's Runner class, with the typing hooks restored after its imports (see above)."""
    import typing_extensions  # noqa: F401  (the real copy first, so its hooks exist to restore)
    from metaflow import Runner
    from metaflow.runner.click_api import MetaflowAPI  # noqa: F401  (what Runner() imports: the vendored typeguard)

    restore_typing_hooks()
    return Runner

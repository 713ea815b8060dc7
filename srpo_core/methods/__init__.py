"""The method registry: every training method is one module here, registered by name.

A method says, for the step algorithm of srpo_core/step.py,
  - which phases do work (`phases`, a subset of step.PHASES; the flow still runs every step and
    the others log that they have nothing to do for it), and which of them sample (`model_phases`:
    the flow loads the policy only for those);
  - how its groups form (the phase functions `generate`, `verify`, `localize`, `suffix`,
    `verify_suffix` over a shard.Shard, ending with rollout records in `shard.records`);
  - its advantage (`advantages`, default group-normalised over each record's `group_id`) and the
    losses it allows (`losses`, names of algos.LOSSES; the config's `loss.loss` picks one);
  - its settings: the shared `method.*` keys it reads, its own `method.options` (a frozen
    dataclass `options_class`, validated like every config section) and its cross-field rules
    (`validate`);
  - the variants a comparison runs (`variants`).

Config choices come from here: `config.METHODS` is `names()`.

Adding a method (e.g. `mymethod`)
  1. srpo_core/methods/mymethod.py: `class MyMethod(Method)` with `name = "mymethod"`, its phases
     and phase functions (reuse srpo_core/rollouts.py's building blocks), then
     `register(MyMethod())` at the bottom of that module;
  2. add the module name to `BUILTIN` below (the registry imports it);
  3. a preset srpo_core/presets/mymethod.yaml if it has its own hyperparameters.
  No flow, loop, comparison or CLI edit: `srpo train --method mymethod`, the flows' `--method`,
  `srpo compare --methods ...`, MLflow tags and records all take the registered name.
"""

from __future__ import annotations

from srpo_core.methods.base import Method, Variant  # noqa: F401  (the interface a method implements)

REGISTRY: dict[str, Method] = {}
BUILTIN = ("grpo", "resets", "score", "critique_grpo", "spo_tree", "srppo")  # modules of srpo_core.methods that register the built-in methods


def register(method: Method) -> Method:
    if method.name in REGISTRY and type(REGISTRY[method.name]) is not type(method):
        raise ValueError(f"method {method.name!r} is registered twice ({type(REGISTRY[method.name]).__name__}, {type(method).__name__})")
    REGISTRY[method.name] = method
    return method


def _load_builtin() -> None:
    import importlib

    for mod in BUILTIN:
        importlib.import_module(f"srpo_core.methods.{mod}")


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def get(name: str) -> Method:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; registered: {', '.join(REGISTRY)}") from None


_load_builtin()

"""The flows' Metaflow `Config` parser and default, apart from the driver so that every Metaflow
task of the flows (each a new process importing its flow file) imports only these: yaml and
srpo_core.config, not the store, MLflow or the driver."""

from __future__ import annotations

import os

from srpo_core.config import ConfigError, from_dict, read_config_data

PHASES = ("generation", "localization", "suffix", "learner", "evaluation", "verification")
DEFAULT_RESOURCES = {"cpu": 1, "gpu": 0, "memory": 4096, "timeout_minutes": 120, "shared_memory": None}  # shared_memory: MB of /dev/shm (Kubernetes)


def parse_config(text: str) -> dict:
    """Metaflow Config parser: YAML -> validated Config -> dict with every phase's resources."""
    data = read_config_data(text, "--config")
    cfg = from_dict(data)
    out = cfg.to_dict()
    res = dict(cfg.resources)
    for phase in PHASES:
        res[phase] = {**DEFAULT_RESOURCES, **(res.get(phase) or {})}
    res.setdefault("image", "")
    res.setdefault("shards", 1)
    out["resources"] = res
    return out


def default_config_path(_ctx=None) -> str:
    """`SRPO_CONFIG` (a preset name or a YAML file), default the `demo` preset (the main job)."""
    from srpo_core.config import resolve_config_path

    name = os.environ.get("SRPO_CONFIG", "demo")
    try:
        return str(resolve_config_path(name))
    except ConfigError as exc:
        raise ConfigError(f"SRPO_CONFIG: {exc}") from None

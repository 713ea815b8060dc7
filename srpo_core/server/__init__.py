"""The persistent inference server (`python -m srpo_core.server`), its launcher and the weight-sync canary.

    from srpo_core.server import start_server, canary_check, StaleAdapterError
    from srpo_core.engine.remote import RemoteEngine

Importing this package is light (no torch): the server module, the launcher and the canary load
their heavy dependencies when used.
"""

from __future__ import annotations

__all__ = ["CanaryReference", "CanaryResult", "ServerHandle", "ServerStartError", "StaleAdapterError", "adapter_sha256", "canary_check", "canary_reference", "start_server"]


def __getattr__(name: str):
    if name in ("start_server", "ServerHandle", "ServerStartError"):
        from srpo_core.server import launch

        return getattr(launch, name)
    if name in ("canary_check", "canary_reference", "StaleAdapterError", "CanaryResult", "CanaryReference"):
        from srpo_core.server import canary

        return getattr(canary, name)
    if name == "adapter_sha256":
        from srpo_core.server.adapters import adapter_sha256

        return adapter_sha256
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

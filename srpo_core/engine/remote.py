"""`RemoteEngine`: the rollout-engine interface over HTTP, against `python -m srpo_core.server`.

    engine = RemoteEngine("http://inference:8000", adapter_version="step-3")
    engine.check_ready()                      # fails fast, naming the URL, before any phase work
    engine.load_adapter("s3://bucket/runs/t/steps/000003/adapter", "step-3")
    engine.generate_thoughts(requests, limits, sampling)   # every Rollout carries adapter_version

`adapter_version` is the version this client requires: every model call names it and the server
answers 409 (raised here as `AdapterVersionError`) rather than serve another. With
`adapter_version=None` the server uses its active version and the results say which.

Light on purpose (stdlib urllib + json, no torch): a workflow step that only orchestrates can use it.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request

from srpo_core.engine.base import Completion, Rollout, RolloutEngine, SamplingParams, ThoughtLimits, ThoughtRequest, TokenScores
from srpo_core.server import protocol as P


class RemoteEngineError(RuntimeError):
    """The inference server answered with an error."""

    def __init__(self, message: str, status: int | None = None, url: str | None = None):
        super().__init__(message)
        self.status = status
        self.url = url


class ServerUnreachableError(RemoteEngineError, ConnectionError):
    """No inference server answers at the URL (refused, timed out, DNS failure)."""


class ServerNotReadyError(RemoteEngineError):
    """The server is up but its model is not loaded (HTTP 503)."""


class AdapterVersionError(RemoteEngineError):
    """The server does not hold the adapter version the request requires (HTTP 409)."""


class RemoteEngine(RolloutEngine):
    def __init__(self, url: str, adapter_version: str | None = None, timeout: float = 3600.0, connect_timeout: float = 5.0):
        self.url = url.rstrip("/")
        self.adapter_version = adapter_version
        self.timeout = timeout  # model calls (long: a generation phase on a big batch)
        self.connect_timeout = connect_timeout  # health/ready/adapter listing

    def __repr__(self) -> str:
        return f"RemoteEngine({self.url!r}, adapter_version={self.adapter_version!r})"

    # ---- HTTP ------------------------------------------------------------------------------
    def _call(self, method: str, path: str, body: dict | None = None, timeout: float | None = None) -> dict:
        url = self.url + path
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"} if data is not None else {})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout if timeout is None else timeout) as resp:
                return json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                msg = json.loads(raw).get("error") or raw.decode(errors="replace")
            except (ValueError, AttributeError):
                msg = raw.decode(errors="replace") or exc.reason
            cls = {409: AdapterVersionError, 503: ServerNotReadyError}.get(exc.code, RemoteEngineError)
            raise cls(f"inference server at {self.url}: {method} {path} -> HTTP {exc.code}: {msg}", status=exc.code, url=self.url) from None
        except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ServerUnreachableError(f"inference server at {self.url} is unreachable ({method} {path}): {reason}", url=self.url) from None

    def _model_call(self, path: str, body: dict) -> dict:
        body["adapter_version"] = self.adapter_version
        return self._call("POST", path, body)

    # ---- server state ----------------------------------------------------------------------
    def health(self) -> dict:
        return self._call("GET", "/health", timeout=self.connect_timeout)

    def ready(self) -> dict:
        return self._call("GET", "/ready", timeout=self.connect_timeout)

    def check_ready(self, wait_s: float = 0.0) -> dict:
        """Raise (naming the URL) unless the server is up with its model loaded and, if this client
        requires a version, holding it. `wait_s` > 0 polls that long for a starting server."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                info = self.ready()
                break
            except (ServerUnreachableError, ServerNotReadyError):
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.5)
        if self.adapter_version is not None and self.adapter_version not in info.get("versions", []):
            raise AdapterVersionError(f"inference server at {self.url} does not hold adapter version {self.adapter_version!r} (it holds {info.get('versions')}); load it with load_adapter(uri, version)", status=409, url=self.url)
        return info

    def adapters(self) -> dict:
        return self._call("GET", "/adapters", timeout=self.connect_timeout)

    def load_adapter(self, uri: str, version: str, use: bool = True) -> dict:
        """Load the PEFT adapter at `uri` (local dir, file:// or s3://) on the server as `version`;
        with `use`, this client then requires that version."""
        out = self._call("POST", "/adapters/load", {"uri": str(uri), "version": version})
        if use:
            self.adapter_version = version
        return out

    def unload_adapter(self, version: str) -> dict:
        return self._call("POST", "/adapters/unload", {"version": version})

    # ---- RolloutEngine -----------------------------------------------------------------------
    def encode_many(self, texts: list[str]) -> list[list[int]]:
        return self._call("POST", "/encode", {"texts": list(texts)})["ids"]

    def encode(self, text: str) -> list[int]:
        return self.encode_many([text])[0]

    def encode_chat(self, text: str) -> list[int]:
        return self._call("POST", "/encode_chat", {"texts": [text]})["ids"][0]

    def decode_many(self, ids: list[list[int]]) -> list[str]:
        return self._call("POST", "/decode", {"ids": [list(i) for i in ids]})["texts"]

    def decode(self, ids: list[int]) -> str:
        return self.decode_many([ids])[0]

    def generate_thoughts(self, requests: list[ThoughtRequest], limits: ThoughtLimits, sampling: SamplingParams) -> list[list[Rollout]]:
        out = self._model_call("/generate_thoughts", {"requests": [P.request_to_json(r) for r in requests], "limits": P.limits_to_json(limits), "sampling": P.sampling_to_json(sampling)})
        return [[P.rollout_from_json(r) for r in group] for group in out["results"]]

    def complete(self, prompts: list[list[int]], max_tokens: int, sampling: SamplingParams) -> list[Completion]:
        out = self._model_call("/complete", {"prompts": [list(p) for p in prompts], "max_tokens": int(max_tokens), "sampling": P.sampling_to_json(sampling)})
        return [P.completion_from_json(c) for c in out["results"]]

    def teacher_force(self, prompts: list[list[int]], responses: list[list[int]], temperature: float = 1.0) -> list[TokenScores]:
        out = self._model_call("/teacher_force", {"prompts": [list(p) for p in prompts], "responses": [list(r) for r in responses], "temperature": float(temperature)})
        return [P.scores_from_json(s) for s in out["results"]]

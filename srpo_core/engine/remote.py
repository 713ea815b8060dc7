"""`RemoteEngine`: the rollout-engine interface over HTTP, against `python -m srpo_core.server`.

    engine = RemoteEngine("http://inference:8000", token=token)   # or $SRPO_SERVER_TOKEN(_FILE)
    engine.check_ready()                      # fails fast, naming the URL, before any phase work
    engine.load_adapter("s3://bucket/runs/t/steps/000003/adapter", "step-3", sha256=adapter_sha)
    engine.generate_thoughts(requests, limits, sampling)   # every Rollout carries adapter_version

Authentication: the bearer token is the `token` argument, else $SRPO_SERVER_TOKEN, else the
contents of the file named by $SRPO_SERVER_TOKEN_FILE; it is sent on every request and never
appears in repr() or error messages. A 401 raises `ServerAuthError`.

`adapter_version` is the version this client requires, `adapter_sha256` the content it requires:
every model call names both and the server answers 409 (raised here as `AdapterVersionError`)
rather than serve another version or other weights under the same name. `load_adapter(...,
sha256=...)` sets both. With `adapter_version=None` the server uses its active version and the
results say which.

Light on purpose (stdlib urllib + json, no torch): a workflow step that only orchestrates can use it.
"""

from __future__ import annotations

import json
import os
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
    """The server does not hold the adapter version the request requires, or holds other weights
    under it (HTTP 409)."""


class ServerAuthError(RemoteEngineError):
    """The server refused the bearer token (HTTP 401): none given, or not the server's."""


TOKEN_ENV = "SRPO_SERVER_TOKEN"
TOKEN_FILE_ENV = "SRPO_SERVER_TOKEN_FILE"


def token_from_env() -> str | None:
    """$SRPO_SERVER_TOKEN, else the contents of the file named by $SRPO_SERVER_TOKEN_FILE."""
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV].strip()
    path = os.environ.get(TOKEN_FILE_ENV)
    if path:
        try:
            return open(path).read().strip() or None
        except OSError as exc:
            raise ServerAuthError(f"${TOKEN_FILE_ENV}={path}: cannot read the server token ({exc.strerror})") from None
    return None


class RemoteEngine(RolloutEngine):
    def __init__(self, url: str, adapter_version: str | None = None, timeout: float = 3600.0, connect_timeout: float = 5.0, *, token: str | None = None, adapter_sha256: str | None = None):
        self.url = url.rstrip("/")
        self.adapter_version = adapter_version
        self.adapter_sha256 = adapter_sha256
        self.timeout = timeout  # model calls (long: a generation phase on a big batch)
        self.connect_timeout = connect_timeout  # health/ready/adapter listing
        self._token = token or token_from_env()

    def __repr__(self) -> str:  # never the token
        return f"RemoteEngine({self.url!r}, adapter_version={self.adapter_version!r})"

    # ---- HTTP ------------------------------------------------------------------------------
    def _call(self, method: str, path: str, body: dict | None = None, timeout: float | None = None) -> dict:
        url = self.url + path
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout if timeout is None else timeout) as resp:
                return json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                msg = json.loads(raw).get("error") or raw.decode(errors="replace")
            except (ValueError, AttributeError):
                msg = raw.decode(errors="replace") or exc.reason
            cls = {401: ServerAuthError, 409: AdapterVersionError, 503: ServerNotReadyError}.get(exc.code, RemoteEngineError)
            raise cls(f"inference server at {self.url}: {method} {path} -> HTTP {exc.code}: {msg}", status=exc.code, url=self.url) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ServerUnreachableError(f"inference server at {self.url} is unreachable ({method} {path}): {reason}", url=self.url) from None

    def _model_call(self, path: str, body: dict) -> dict:
        body["adapter_version"] = self.adapter_version
        body["adapter_sha256"] = self.adapter_sha256
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
            raise AdapterVersionError(
                f"inference server at {self.url} does not hold adapter version {self.adapter_version!r} (it holds {info.get('versions')}); load it with load_adapter(uri, version)",
                status=409,
                url=self.url,
            )
        return info

    def adapters(self) -> dict:
        return self._call("GET", "/adapters", timeout=self.connect_timeout)

    def load_adapter(self, uri: str, version: str, sha256: str, use: bool = True) -> dict:
        """Load the PEFT adapter at `uri` (a path, file:// or s3:// under the server's artifact
        root) on the server as `version`, refused unless its content hash (`adapter_sha256`) is
        `sha256`; with `use`, this client then requires that version with that hash."""
        out = self._call("POST", "/adapters/load", {"uri": str(uri), "version": version, "sha256": sha256})
        if use:
            self.adapter_version, self.adapter_sha256 = version, out["sha256"]
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

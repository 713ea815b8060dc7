"""The inference server: one long-lived process holds the base model and serves the rollout-engine
interface over HTTP/JSON (wire format: `server.protocol`), with LoRA adapters hot-loaded by version.

    SRPO_SERVER_TOKEN=... python -m srpo_core.server --model PATH --artifact-root s3://bucket/srpo \
        --host 0.0.0.0 --port 8000 [--engine hf|vllm]

Stack: FastAPI (routes, pydantic request bodies, error handlers) served by uvicorn's h11 protocol
in one event loop (`InferenceServer`), with the limits uvicorn does not give in two small layers of
our own: `_Gate` (ASGI middleware: the token, the streamed body cap) and `_Protocol` (uvicorn's h11
protocol subclassed: stall timeouts, the connection cap, JSON answers to malformed requests).
Model work (generation, scoring, adapter loads, tokenizer calls) runs in the thread pool, serialised
by one lock, except that concurrent sampling calls under one version decode together in one shared
continuous batch (`server.batching`; `--serial-calls` turns that off); `/health`, `/ready` and `/adapters` run on the event loop and never take it, so probes
answer while a long generation runs.

Authentication and limits (README, "Security model")
    Every endpoint but `/health` and `/ready` requires `Authorization: Bearer <token>` (the token
    from `--token-file` or `$SRPO_SERVER_TOKEN`, compared in constant time); the unauthenticated
    `/ready` says only whether the server is ready. Without a token the server refuses to bind
    anything but a loopback address. Requests are bounded (`ServerLimits`): body size (counted while
    it streams in), stall timeout, concurrent connections (excess answered 503), rows and rows x
    tokens per request; token ids are range-checked against the model's vocabulary (400). A device error
    during a model call (CUDA error, device-side assert) marks the server failed: `/ready` answers
    503 from then on and model calls are refused, so an orchestrator replaces the process.

Adapter versions
    `POST /adapters/load {uri, version, sha256}` copies a PEFT adapter directory from under the
    server's `--artifact-root` (a local directory or s3:// prefix; `server.adapters` for the rules:
    size caps, no `..`/symlink escape, the step manifest's per-file sha256 when one sits beside the
    adapter), checks its content hash (`adapter_sha256`) against `sha256`, loads it as a named
    adapter and makes it the active version. Versions are immutable: loading a held version again
    with the same content is a no-op, with other content a 409. At most `--max-adapters` are held;
    the oldest non-active ones are unloaded. The base model is always held as version
    `--base-version` (default "base").
    A model call may name the version it requires (`adapter_version`) and the content hash it
    requires (`adapter_sha256`): it is served by exactly that adapter, selected under the model
    lock, or refused with 409 if the server does not hold it or holds other weights under that name.
    Null means the active version. Every result carries the version that produced it.

HF engine: the base model is wrapped in a `peft.PeftModel` on the first load; each version is a
named adapter (`load_adapter` + `set_adapter`; `delete_adapter` to unload; the base version runs
under `disable_adapter()`). vLLM engine: each version is a `LoRARequest` with a fresh integer id.
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import contextlib
import hmac
import http
import ipaddress
import json
import logging
import os
import shutil
import signal
import socket
import stat
import sys
import tempfile
import threading
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import anyio.to_thread
import h11
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainValidator, StrictInt, StrictStr, model_validator
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from uvicorn.protocols.http.h11_impl import H11Protocol

from srpo_core.engine.base import SamplingParams, ThoughtLimits, ThoughtRequest
from srpo_core.server import protocol as P
from srpo_core.server.adapters import ADAPTER_FILES, AdapterRefused, AdapterSource, FetchLimits, adapter_sha256  # noqa: F401 (ADAPTER_FILES, adapter_sha256: re-exported)
from srpo_core.server.batching import SharedBatch

log = logging.getLogger("srpo.server")

TOKEN_ENV = "SRPO_SERVER_TOKEN"
MIN_TOKEN_CHARS = 16
OPEN_PATHS = ("/health", "/ready")  # answered without a token (probes); /ready then says only ready or not


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ServerLimits:
    """Per-request bounds. Defaults fit the paper preset with room to spare: a generation call of
    32 prompts x 8 chains at max_model_len 32768 is 256 rows and 8.4M row-tokens; a localization
    teacher_force of 32 x 4096 response tokens is ~1 MB of JSON."""

    max_body_bytes: int = 16 << 20  # counted while the body streams in: 413 at the first byte past it
    socket_timeout_s: float = 60.0  # a connection the server waits on (request, body, or its reading of the answer) closes after this long without progress
    max_connections: int = 32  # connections open at once; the request of one more is answered 503 and the connection closed
    max_rows: int = 4096  # sequences per request (generation: sum of n)
    max_request_tokens: int = 1 << 25  # rows x tokens (generation: rows x max_model_len)

    def __post_init__(self):
        for name in ("max_body_bytes", "max_connections", "max_rows", "max_request_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"ServerLimits.{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not self.socket_timeout_s > 0:
            raise ValueError(f"ServerLimits.socket_timeout_s must be > 0, got {self.socket_timeout_s!r}")


def is_device_error(exc: BaseException) -> bool:
    """A failure of the accelerator itself (the CUDA context is unusable afterwards), as opposed
    to a bad request or an out-of-memory that the next, smaller call may survive."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
        return False
    if torch is not None and isinstance(exc, getattr(torch, "AcceleratorError", ())):
        return True
    text = str(exc)
    markers = ("CUDA error", "device-side assert", "CUBLAS_STATUS", "CUDNN_STATUS", "illegal memory access", "NCCL error", "cudaError", "unspecified launch failure")
    return isinstance(exc, RuntimeError) and any(m in text for m in markers)


def read_token_file(path: str) -> str:
    """The token in `path`: refuses a file others can read (mode must be 0600 or stricter)."""
    st = os.stat(path)
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SystemExit(f"--token-file {path}: mode {stat.S_IMODE(st.st_mode):04o} lets others read it; chmod 600 it")
    return Path(path).read_text().strip()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---- backends ---------------------------------------------------------------------------------------

class Backend(abc.ABC):
    engine = None  # a RolloutEngine
    keeps_adapter_files = False  # True: the adapter dir must outlive the load (vLLM reloads from disk)

    @abc.abstractmethod
    def load_adapter(self, name: str, path: str) -> None: ...

    @abc.abstractmethod
    def delete_adapter(self, name: str) -> None: ...

    @abc.abstractmethod
    def select(self, name: str | None, version: str):
        """Context manager: run the engine with adapter `name` (None: the base model)."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Token ids the model accepts: 0 <= id < vocab_size (the embedding rows)."""

    def describe(self) -> dict:
        return {}


class HFBackend(Backend):
    def __init__(self, model_path: str, dtype: str | None = None, device: str | None = None, max_batch_rows: int = 256):
        from srpo_core.engine.hf import HFEngine
        from srpo_core.runtime import default_device, load_model, load_tokenizer

        self.device = device or default_device()
        self.dtype = dtype or ("bfloat16" if self.device.startswith("cuda") else "float32")
        model = load_model(model_path, self.dtype, device=self.device)
        self.base = model
        self.peft = None
        self.engine = HFEngine(model, load_tokenizer(model_path), max_batch_rows=max_batch_rows)

    def load_adapter(self, name: str, path: str) -> None:
        from peft import PeftModel

        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self.base, path, adapter_name=name, is_trainable=False).eval()
            self.engine.model = self.peft
        else:
            try:
                self.peft.load_adapter(path, adapter_name=name, is_trainable=False)
            except Exception:
                with contextlib.suppress(Exception):
                    self.peft.delete_adapter(name)
                raise
        self.peft.eval()

    def delete_adapter(self, name: str) -> None:
        if self.peft is not None and name in self.peft.peft_config:
            self.peft.delete_adapter(name)

    @contextlib.contextmanager
    def select(self, name: str | None, version: str):
        self.engine.adapter_version = version
        if name is None:
            if self.peft is None:
                yield self.engine
            else:
                with self.peft.disable_adapter():
                    yield self.engine
        else:
            self.peft.set_adapter(name)
            yield self.engine

    @property
    def vocab_size(self) -> int:
        return int(self.base.get_input_embeddings().num_embeddings)

    def describe(self) -> dict:
        return {"dtype": self.dtype, "device": self.device}


class VLLMBackend(Backend):
    keeps_adapter_files = True

    def __init__(self, model_path: str, options):
        from srpo_core.engine.vllm import VLLMEngine

        self.options = options
        self.engine = VLLMEngine(model_path, options)
        self.requests: dict[str, object] = {}

    def load_adapter(self, name: str, path: str) -> None:
        req = self.engine.make_lora_request(name, path)
        self.engine.preload_adapter(req)
        self.requests[name] = req

    def delete_adapter(self, name: str) -> None:
        req = self.requests.pop(name, None)
        if req is not None:
            self.engine.remove_adapter(req)

    @contextlib.contextmanager
    def select(self, name: str | None, version: str):
        self.engine.use_adapter(self.requests[name] if name is not None else None, version)
        yield self.engine

    @property
    def vocab_size(self) -> int:
        return int(self.engine.llm.llm_engine.model_config.get_vocab_size())

    def describe(self) -> dict:
        return {"dtype": self.options.dtype, "device": "cuda", "tensor_parallel_size": self.options.tensor_parallel_size}


# ---- the model host: backend + adapter registry + version rules ------------------------------------

@dataclass
class Adapter:
    version: str
    name: str  # backend-internal adapter name (peft module keys cannot hold '.')
    uri: str
    sha256: str
    path: str
    temporary: bool
    loaded_at: float

    def public(self) -> dict:
        return {"version": self.version, "uri": self.uri, "sha256": self.sha256, "loaded_at": self.loaded_at}


class ModelHost:
    def __init__(
        self, backend_factory, model_path: str, engine_kind: str = "hf", base_version: str = "base", max_adapters: int = 2, cache_dir: str | None = None, *,
        adapter_source: AdapterSource | None = None, shared_batch: bool = True,
    ):
        self.backend_factory = backend_factory
        self.model_path = model_path
        self.engine_kind = engine_kind
        self.base_version = P.check_version(base_version, "base_version")
        if max_adapters < 1:
            raise ValueError("max_adapters must be >= 1")
        self.max_adapters = max_adapters
        self.adapter_source = adapter_source or AdapterSource(())
        self.cache_dir = Path(cache_dir or tempfile.mkdtemp(prefix="srpo-server-"))
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.backend: Backend | None = None
        self.load_error: str | None = None
        self.device_error: str | None = None  # set once by a device failure: never ready again
        self.started = time.time()
        self.model_lock = threading.Lock()  # serialises all model work
        self.meta_lock = threading.Lock()  # guards the registry (probes take only this one)
        self.tok_lock = threading.Lock()  # fast tokenizers are not safe to share across threads
        self.adapters: OrderedDict[str, Adapter] = OrderedDict()  # load order, oldest first
        self.active = self.base_version
        self._counter = 0
        self.vocab_size: int | None = None
        self.shared = SharedBatch(self) if shared_batch else None  # concurrent sampling calls decode together

    # -- lifecycle --
    def load_model(self) -> None:
        t0 = time.perf_counter()
        try:
            backend = self.backend_factory()
            vocab = int(backend.vocab_size)
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            raise
        with self.meta_lock:
            self.backend = backend
            self.vocab_size = vocab
        log.info("model %s loaded (%s engine, vocabulary %d) in %.1fs", self.model_path, self.engine_kind, vocab, time.perf_counter() - t0)

    @property
    def ready(self) -> bool:
        return self.backend is not None and self.device_error is None

    def close(self) -> None:
        with self.meta_lock:
            for a in self.adapters.values():
                if a.temporary:
                    shutil.rmtree(a.path, ignore_errors=True)
        shutil.rmtree(self.cache_dir, ignore_errors=True)

    def _require_ready(self):
        if self.device_error is not None:
            raise HTTPError(503, f"the server is out of service after a device error ({self.device_error}); restart it")
        if self.backend is None:
            raise HTTPError(503, f"model {self.model_path} is not loaded yet" + (f" (load failed: {self.load_error})" if self.load_error else ""))
        return self.backend

    @contextlib.contextmanager
    def _device_guard(self, what: str):
        """Model work: a device error marks the server failed (/ready 503 from then on)."""
        try:
            yield
        except Exception as exc:
            if is_device_error(exc):
                with self.meta_lock:
                    self.device_error = f"{type(exc).__name__} during {what}: {str(exc)[:300]}"
                log.critical("device error during %s: the server stops serving and reports not ready:\n%s", what, traceback.format_exc())
                raise HTTPError(503, f"device error during {what}; the server is out of service and must be restarted") from None
            raise

    # -- state --
    def versions(self) -> list[str]:
        with self.meta_lock:
            return [self.base_version, *self.adapters]

    def status(self) -> dict:
        with self.meta_lock:
            info = {
                "ready": self.ready, "model": self.model_path, "engine": self.engine_kind, "active": self.active,
                "base": self.base_version, "versions": [self.base_version, *self.adapters],
                "uptime_s": round(time.time() - self.started, 1), "vocab_size": self.vocab_size,
            }  # fmt: skip
            if self.backend is not None:
                info.update(self.backend.describe())
            if self.load_error:
                info["error"] = self.load_error
            if self.device_error:
                info["error"] = f"device error: {self.device_error}"
            return info

    def adapter_listing(self) -> dict:
        with self.meta_lock:
            return {"active": self.active, "base": self.base_version, "adapters": [a.public() for a in self.adapters.values()]}

    # -- adapters --
    def load_adapter(self, uri: str, version: str, sha256: str | None = None) -> dict:
        """Fetch (a verified private copy), check the content hash against `sha256` when given,
        then load. Nothing is loaded or registered unless every check passed."""
        backend = self._require_ready()
        version = P.check_version(version, "version")
        if sha256 is not None:
            sha256 = P.check_sha256(sha256, "sha256")
        if not isinstance(uri, str) or not uri:
            raise P.ProtocolError("uri must be a non-empty string")
        if version == self.base_version:
            raise HTTPError(409, f"version {version!r} names the base model; pick another adapter version")
        t0 = time.perf_counter()
        path = Path(tempfile.mkdtemp(prefix="adapter-", dir=self.cache_dir)) / "adapter"
        registered = False
        try:
            try:
                fetched = self.adapter_source.fetch(uri, path)  # network I/O outside the model lock
                sha = adapter_sha256(path)
            except AdapterRefused as exc:
                raise HTTPError(exc.status, str(exc)) from None
            except FileNotFoundError as exc:
                raise HTTPError(400, f"adapter uri {uri!r}: {exc}") from None
            if sha256 is not None and not hmac.compare_digest(sha, sha256):
                raise HTTPError(409, f"adapter at {uri!r} has sha256 {sha[:12]}, the request expects {sha256[:12]}; refused, nothing loaded")
            with self.model_lock:
                with self.meta_lock:
                    held = self.adapters.get(version)
                if held is not None:
                    if held.sha256 != sha:
                        raise HTTPError(
                            409,
                            f"version {version!r} is already held with other weights (sha256 {held.sha256[:12]} from {held.uri}, now {sha[:12]} from {uri}); "
                            "versions are immutable, load under a new version",
                        )
                    shutil.rmtree(path.parent, ignore_errors=True)
                    with self.meta_lock:
                        self.active = version
                    return {"version": version, "sha256": sha, "uri": held.uri, "evicted": [], "active": version, "already_loaded": True}
                self._counter += 1
                name = f"a{self._counter}"
                with self._device_guard(f"loading adapter {version}"):
                    backend.load_adapter(name, str(path))
                if not backend.keeps_adapter_files:
                    shutil.rmtree(path.parent, ignore_errors=True)
                adapter = Adapter(version, name, uri, sha, str(path.parent), True, time.time())
                with self.meta_lock:
                    self.adapters[version] = adapter
                    self.active = version
                registered = True
                evicted = self._evict(backend)
        except BaseException:
            if not registered:
                shutil.rmtree(path.parent, ignore_errors=True)
            raise
        log.info(
            "adapter %s loaded from %s (sha256 %s%s) in %.2fs; holding %s",
            version,
            uri,
            sha[:12],
            f", verified against {fetched.manifest}" if fetched.manifest else "",
            time.perf_counter() - t0,
            self.versions(),
        )
        return {"version": version, "sha256": sha, "uri": uri, "evicted": evicted, "active": version, "already_loaded": False, "manifest_verified": fetched.manifest is not None}

    def _evict(self, backend: Backend) -> list[str]:
        """Unload the oldest non-active adapters beyond max_adapters (caller holds model_lock)."""
        evicted = []
        while len(self.adapters) > self.max_adapters:
            victim = next(v for v in self.adapters if v != self.active)
            self._unload(backend, victim)
            evicted.append(victim)
        return evicted

    def _unload(self, backend: Backend, version: str) -> None:
        with self.meta_lock:
            adapter = self.adapters.pop(version)
            if self.active == version:
                self.active = next(reversed(self.adapters), self.base_version)
        backend.delete_adapter(adapter.name)
        if adapter.temporary:
            shutil.rmtree(adapter.path, ignore_errors=True)

    def unload_adapter(self, version: str) -> dict:
        backend = self._require_ready()
        version = P.check_version(version, "version")
        with self.model_lock:
            if version not in self.adapters:
                raise HTTPError(404, f"adapter version {version!r} is not held (holding {self.versions()})")
            self._unload(backend, version)
        return {"unloaded": version, "active": self.active}

    # -- model calls --
    def tokenize(self, fn):
        """fn(engine) for tokenizer-only work: not behind the model lock (a tokenizer lock instead)."""
        backend = self._require_ready()
        with self.tok_lock:
            return fn(backend.engine)

    def _resolve(self, version: str | None, sha256: str | None) -> tuple[str, str | None]:
        """(version, backend adapter name or None for the base model) of a model call asking for
        `version` (None: the active one) pinned to `sha256` (None: any); 409 if not held as asked."""
        with self.meta_lock:
            want = self.active if version is None else version
            if want == self.base_version:
                name, held_sha = None, None
            elif want in self.adapters:
                name, held_sha = self.adapters[want].name, self.adapters[want].sha256
            else:
                raise HTTPError(
                    409, f"adapter version {want!r} is not held by this server (holding {[self.base_version, *self.adapters]}, active {self.active!r}); load it with POST /adapters/load first"
                )
        if sha256 is not None and held_sha != sha256:
            raise HTTPError(409, f"adapter version {want!r} is held with sha256 {str(held_sha)[:12]}, the request is pinned to {sha256[:12]}; refused (reload the adapter under a new version)")
        return want, name

    def _check_call(self, version, sha256):
        backend = self._require_ready()
        if version is not None:
            P.check_version(version)
        if sha256 is not None:
            P.check_sha256(sha256, "adapter_sha256")
        return backend

    def run(self, version, fn, sha256=None):
        """fn(engine) under the model lock with exactly `version` selected (None: the active one),
        refused (409) unless that version's content hash is `sha256` when one is given."""
        backend = self._check_call(version, sha256)
        with self.model_lock:
            self._require_ready()  # a device error in the call before this one
            want, name = self._resolve(version, sha256)
            with self._device_guard(f"a model call under {want}"), backend.select(name, want) as engine:
                return want, fn(engine)

    def run_batched(self, version, fn, submit, sha256=None):
        """A sampling call (`fn(engine)`, or `submit(batch) -> DecodeHandle` on a continuous batch)
        with the rules of `run`; with `shared_batch` and an engine that has a continuous batch,
        concurrent calls under one version decode together (`SharedBatch`) instead of in turn.
        The HF engine only: the vLLM engine's step batch (engine/vllm.py) serves the in-process
        event path and has not yet been measured behind the server on a GPU."""
        backend = self._check_call(version, sha256)
        if self.shared is None or self.engine_kind != "hf" or not callable(getattr(backend.engine, "continuous_batch", None)):
            return self.run(version, fn, sha256)
        with self.meta_lock:
            want = self.active if version is None else version  # the active version when the call came in
        return self.shared.call(want, sha256, submit)


# ---- HTTP -------------------------------------------------------------------------------------------
#
# Three layers, outermost first, and which limit each one holds:
#   _Protocol  uvicorn's h11 protocol: stall timeouts (reading a request, its body, or the client's
#              reading of an answer), the connection cap (503), malformed requests (JSON 400/431).
#   _Gate      ASGI middleware before routing: the bearer token (401 before any body byte is read),
#              the body cap (413, counted while the body streams in), the catch-all error answer.
#   FastAPI    routes, pydantic request bodies (typed and ranged fields, 400), and the request
#              caps that need the parsed body (rows, rows x tokens: 413; token ranges: 400).

SERVER_NAME = "srpo-inference/1"


def error_status(exc: Exception) -> int:
    """HTTP status of an unexpected exception: store errors are the caller's URI or the store."""
    from srpo_core import store

    if isinstance(exc, store.StoreUnreachableError):
        return 502
    if isinstance(exc, (store.KeyNotFoundError, store.InvalidKeyError)):
        return 400
    if isinstance(exc, NotImplementedError):
        return 501
    return 500


def _work(rows: int, tokens: int, limits: ServerLimits, what: str) -> None:
    if rows > limits.max_rows:
        raise HTTPError(413, f"{what}: {rows} rows exceed the server's cap of {limits.max_rows} per request (--max-request-rows); split the request")
    if tokens > limits.max_request_tokens:
        raise HTTPError(413, f"{what}: {tokens} row-tokens exceed the server's cap of {limits.max_request_tokens} per request (--max-request-tokens); split the request")


class JSONAnswer(Response):
    """`json.dumps` as the protocol writes it: -inf log-probs as `-Infinity` (Starlette's
    JSONResponse refuses non-finite floats), floats by repr (bit-exact round trip)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return json.dumps(content).encode()


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONAnswer:
    return JSONAnswer({"error": message}, status_code=status, headers=headers)


async def _send_error(send, status: int, message: str, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    """An error answer straight on the ASGI channel (from the layers before routing); always closes the connection."""
    data = json.dumps({"error": message}).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), (b"connection", b"close"), *headers]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": data, "more_body": False})


# ---- request bodies (pydantic): types and ranges; a failure is a 400 naming the field ----

def _version(value: str) -> str:
    if not P.VERSION_RE.match(value):
        raise ValueError(f"must match {P.VERSION_RE.pattern}, got {value[:80]!r}")
    return value


def _sha256(value: str) -> str:
    if not P.SHA256_RE.match(value):
        raise ValueError(f"must be 64 lowercase hex digits (a sha256), got {value[:80]!r}")
    return value


Version = Annotated[StrictStr, AfterValidator(_version)]
Sha256 = Annotated[StrictStr, AfterValidator(_sha256)]
IdLists = list[list[StrictInt]]
Count = Annotated[StrictInt, Field(ge=1)]
# limits and sampling: the protocol's own checks (every field of the engine dataclass, typed, ranged, no unknown ones)
Limits = Annotated[ThoughtLimits, PlainValidator(P.limits_from_json)]
Sampling = Annotated[SamplingParams, PlainValidator(P.sampling_from_json)]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field (adapter_verison) is an error, never silently the default


class Pinned(Body):
    adapter_version: Version | None = None  # the version the call requires (null: the active one)
    adapter_sha256: Sha256 | None = None  # the content it requires


class TextsBody(Body):
    texts: list[StrictStr]


class DecodeBody(Body):
    ids: IdLists


class LoadBody(Body):
    uri: StrictStr
    version: Version
    sha256: Sha256 | None = None

    @model_validator(mode="after")
    def _hash_required(self):
        if self.sha256 is None:
            raise ValueError("sha256 is required: the adapter_sha256 of the adapter the caller expects (the learner's); the server refuses other content")
        return self


class UnloadBody(Body):
    version: Version


class ThoughtRequestBody(Body):
    prompt_ids: list[StrictInt]
    n: Count = 1
    prefix_ids: list[StrictInt] = []
    prefix_spans: list[tuple[StrictInt, StrictInt]] = []

    @model_validator(mode="after")
    def _spans_in_prefix(self):
        if any(not 0 <= a <= b <= len(self.prefix_ids) for a, b in self.prefix_spans):
            raise ValueError(f"prefix_spans must be [start, end] with 0 <= start <= end <= len(prefix_ids) = {len(self.prefix_ids)}")
        return self

    def request(self) -> ThoughtRequest:
        return ThoughtRequest(prompt_ids=tuple(self.prompt_ids), n=self.n, prefix_ids=tuple(self.prefix_ids), prefix_spans=tuple(self.prefix_spans))


class GenerateBody(Pinned):
    requests: list[ThoughtRequestBody]
    limits: Limits = Field(default_factory=ThoughtLimits)
    sampling: Sampling = Field(default_factory=SamplingParams)


class CompleteBody(Pinned):
    prompts: IdLists
    max_tokens: Count
    sampling: Sampling = Field(default_factory=SamplingParams)


class TeacherForceBody(Pinned):
    prompts: IdLists
    responses: IdLists
    temperature: Annotated[float, Field(strict=True, gt=0, allow_inf_nan=False)] = 1.0

    @model_validator(mode="after")
    def _paired(self):
        if len(self.prompts) != len(self.responses):
            raise ValueError(f"{len(self.prompts)} prompts but {len(self.responses)} responses")
        return self


def validation_message(errors: list[dict], shown: int = 5) -> str:
    """pydantic's errors as one line naming each field the way the protocol writes it (requests[0].prompt_ids)."""
    parts = []
    for e in errors[:shown]:
        loc = list(e.get("loc", ()))
        if loc[:1] == ["body"]:
            loc = loc[1:]
        if e.get("type") == "json_invalid":
            return f"request body is not JSON: {(e.get('ctx') or {}).get('error', e.get('msg'))}"
        where = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in loc).lstrip(".")
        msg = str(e.get("msg", "")).removeprefix("Value error, ")
        if not where:
            parts.append("request body must be a JSON object" if e.get("type") in ("model_type", "model_attributes_type", "dict_type") else msg)
        elif e.get("type") == "missing":
            parts.append(f"{where} is required")
        elif e.get("type") == "extra_forbidden":
            parts.append(f"{where}: unknown field")
        else:
            parts.append(msg if msg.startswith(where) else f"{where}: {msg}")
    return "; ".join(parts) + (f" (and {len(errors) - shown} more)" if len(errors) > shown else "")


# ---- the app ----

def make_app(host: ModelHost, token: str | None, limits: ServerLimits) -> FastAPI:
    """The FastAPI app over `host`, behind `_Gate` (token, body cap). Model calls are plain `def`
    routes (FastAPI runs them in the thread pool); the probes are `async def` (the event loop)."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        # one pool thread per connection at most, as model calls and tokenizer calls wait on their locks there
        limiter = anyio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = max(limiter.total_tokens, limits.max_connections)
        yield

    app = FastAPI(title="srpo inference server", docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False, lifespan=lifespan)
    app.add_middleware(_Gate, token=token, limits=limits)

    @app.exception_handler(HTTPError)
    async def on_http_error(request, exc: HTTPError):
        return _error(exc.status, str(exc))

    @app.exception_handler(P.ProtocolError)
    async def on_protocol_error(request, exc: P.ProtocolError):
        return _error(400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def on_invalid_body(request, exc: RequestValidationError):
        return _error(400, validation_message(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def on_routing(request, exc: StarletteHTTPException):
        if exc.status_code in (404, 405):
            known = sorted({r.path for r in app.routes if hasattr(r, "methods")})
            return _error(exc.status_code, f"no route {request.method} {request.url.path} (routes: {', '.join(known)})", exc.headers)
        return _error(exc.status_code, str(exc.detail), exc.headers)

    def vocab(rows, what):
        host._require_ready()
        P.check_token_range(rows, host.vocab_size, what)

    def answer(request: Request, version: str, results: list) -> JSONAnswer:
        request.state.adapter_version = version  # for the request log line
        return JSONAnswer({"adapter_version": version, "results": results})

    @app.get("/health")
    async def health():
        return JSONAnswer({"status": "alive"})

    @app.get("/ready")
    async def ready(request: Request):
        info = host.status()
        if not info["ready"]:
            info.setdefault("error", f"model {host.model_path} is not loaded yet")
        return JSONAnswer(info if request.state.authorized else {"ready": info["ready"]}, status_code=200 if info["ready"] else 503)

    @app.get("/adapters")
    async def adapters():
        host._require_ready()
        return JSONAnswer(host.adapter_listing())

    @app.post("/adapters/load")
    def load(body: LoadBody):
        return JSONAnswer(host.load_adapter(body.uri, body.version, body.sha256))

    @app.post("/adapters/unload")
    def unload(body: UnloadBody):
        return JSONAnswer(host.unload_adapter(body.version))

    @app.post("/encode")
    def encode(body: TextsBody):
        _work(len(body.texts), sum(map(len, body.texts)), limits, "encode")
        return JSONAnswer({"ids": host.tokenize(lambda e: [e.encode(t) for t in body.texts])})

    @app.post("/encode_chat")
    def encode_chat(body: TextsBody):
        _work(len(body.texts), sum(map(len, body.texts)), limits, "encode_chat")
        return JSONAnswer({"ids": host.tokenize(lambda e: [e.encode_chat(t) for t in body.texts])})

    @app.post("/decode")
    def decode(body: DecodeBody):
        _work(len(body.ids), sum(map(len, body.ids)), limits, "decode")
        vocab(body.ids, "ids")
        return JSONAnswer({"texts": host.tokenize(lambda e: [e.decode(i) for i in body.ids])})

    @app.post("/generate_thoughts")
    def generate_thoughts(body: GenerateBody, request: Request):
        reqs = [r.request() for r in body.requests]
        rows = sum(r.n for r in reqs)
        _work(rows, rows * body.limits.max_model_len, limits, "generate_thoughts")
        vocab([r.prompt_ids for r in reqs], "requests.prompt_ids")
        vocab([r.prefix_ids for r in reqs], "requests.prefix_ids")
        version, groups = host.run_batched(
            body.adapter_version, lambda e: e.generate_thoughts(reqs, body.limits, body.sampling), lambda b: b.submit_thoughts(reqs, body.limits, body.sampling), body.adapter_sha256
        )
        return answer(request, version, [[P.rollout_to_json(r) for r in g] for g in groups])

    @app.post("/complete")
    def complete(body: CompleteBody, request: Request):
        _work(len(body.prompts), sum(len(p) + body.max_tokens for p in body.prompts), limits, "complete")
        vocab(body.prompts, "prompts")
        version, comps = host.run_batched(
            body.adapter_version, lambda e: e.complete(body.prompts, body.max_tokens, body.sampling), lambda b: b.submit_complete(body.prompts, body.max_tokens, body.sampling), body.adapter_sha256
        )
        return answer(request, version, [P.completion_to_json(c) for c in comps])

    @app.post("/teacher_force")
    def teacher_force(body: TeacherForceBody, request: Request):
        _work(len(body.prompts), sum(len(p) + len(r) for p, r in zip(body.prompts, body.responses)), limits, "teacher_force")
        vocab(body.prompts, "prompts")
        vocab(body.responses, "responses")
        version, scores = host.run(body.adapter_version, lambda e: e.teacher_force(body.prompts, body.responses, float(body.temperature)), body.adapter_sha256)
        return answer(request, version, [P.scores_to_json(s) for s in scores])

    return app


class _ClientGone(Exception):
    """The client hung up, or stalled and `_Protocol` closed its connection, before its body was in."""


class _Gate:
    """ASGI middleware in front of routing, for every HTTP request:

    * the bearer token (constant-time compare), checked on the headers alone: a request without it
      gets 401 before a byte of its body is read (`/health` and `/ready` are open; `/ready` then
      answers only ready or not);
    * the body cap: a Content-Length over `max_body_bytes` is a 413 at once, and the body is counted
      chunk by chunk as it streams in (chunked bodies too): 413 at the first chunk past the cap,
      the rest never read. The body is then handed to the app as one message, as JSON whatever the
      Content-Type says (the protocol is JSON only);
    * an answer for every failure: an exception no handler took becomes `{"error"}` with the status
      of `error_status` (500s logged with their traceback), and an error answer to a POST closes the
      connection (an unread body is never parsed as the next request);
    * one log line per request (method, path, status, seconds, the adapter version that served it)."""

    def __init__(self, app, token: str | None, limits: ServerLimits):
        self.app = app
        self.token = token.encode() if token else None
        self.limits = limits

    def authorized(self, headers: Headers) -> bool:
        if self.token is None:
            return True
        scheme, _, presented = (headers.get("authorization") or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(presented.strip().encode(), self.token)

    async def read_body(self, headers: Headers, receive) -> bytes:
        cap = self.limits.max_body_bytes
        announced = headers.get("content-length")  # h11 has refused a malformed one (400) before this
        if announced is not None and int(announced) > cap:
            raise HTTPError(413, f"request body of {int(announced)} bytes exceeds the server's cap of {cap} (--max-body-bytes)")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > cap:
                raise HTTPError(413, f"request body exceeds the server's cap of {cap} bytes (--max-body-bytes); refused after {size} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        method, path = scope["method"], scope["path"].rstrip("/") or "/"
        state = scope.setdefault("state", {})
        status = 0

        async def send_checked(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if status >= 400 and method == "POST" and not any(k.lower() == b"connection" for k, _ in message.get("headers", ())):
                    message = {**message, "headers": [*message.get("headers", ()), (b"connection", b"close")]}
            await send(message)

        headers = Headers(scope=scope)
        try:
            state["authorized"] = self.authorized(headers)
            if not state["authorized"] and path not in OPEN_PATHS:
                message = "missing or wrong bearer token (Authorization: Bearer <token>; the token is the server's --token-file / $SRPO_SERVER_TOKEN)"
                return await _send_error(send_checked, 401, message, ((b"www-authenticate", b'Bearer realm="srpo-inference"'),))
            try:
                body = await self.read_body(headers, receive)
            except HTTPError as exc:
                return await _send_error(send_checked, exc.status, str(exc))
            if not body and method == "POST":
                body = b"{}"
            sent = False

            async def replay():
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()  # after the body: the disconnect, when it comes

            app_headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-type", b"content-length", b"transfer-encoding")]
            app_headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await self.app({**scope, "path": path, "headers": app_headers}, replay, send_checked)
        except _ClientGone:
            return  # nothing to answer (a stall is logged by _Protocol)
        except Exception as exc:  # noqa: BLE001 - a server must answer, not die
            if status:
                raise  # the answer has started: nothing left to say (uvicorn closes the connection)
            status = error_status(exc)
            if status == 500:
                log.error("%s %s failed:\n%s", method, path, traceback.format_exc())
            await _send_error(send_checked, status, f"{type(exc).__name__}: {exc}")
        finally:
            version = state.get("adapter_version")
            level = logging.INFO if path not in OPEN_PATHS else logging.DEBUG
            outcome = status or "no answer (the client hung up or stalled before its body was in)"
            log.log(level, "%s %s -> %s (%.3fs)%s", method, path, outcome, time.perf_counter() - t0, f" [{version}]" if version else "")


# ---- the connection layer: uvicorn's h11 protocol with this server's limits ----

class _H11Connection(h11.Connection):
    """h11's connection state machine, remembering why it refused a request (for the JSON 400)."""

    refused: h11.RemoteProtocolError | None = None

    def next_event(self):
        try:
            return super().next_event()
        except h11.RemoteProtocolError as exc:
            self.refused = exc
            raise


BUSY_MESSAGE = "server busy: too many connections (--max-connections)"


async def _busy(scope, receive, send) -> None:
    """The answer to a request on a connection beyond the cap."""
    await _send_error(send, 503, BUSY_MESSAGE, ((b"retry-after", b"1"),))


class _Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol (h11) with the limits uvicorn leaves out. uvicorn times out only
    the idle gap between two requests of a keep-alive connection (`timeout_keep_alive`); here every
    wait on the client is bounded by it (= --socket-timeout):

    * reading: while a request line, its headers or its body are awaited and no byte arrives for
      that long, the connection is closed without an answer (a slow-loris client holds nothing);
    * writing: while the client does not read an answer (the transport's buffer stays full) for
      that long, the connection is dropped;
    * connections at once: a connection that opens beyond `limit_concurrency` (= --max-connections)
      has its request answered 503 `{"error"}` with Retry-After and is closed. uvicorn's own check
      is switched off: it answers plain text and counts the new connection against the cap;
    * a request h11 refuses (malformed request line, headers or Content-Length; headers over
      `h11_max_incomplete_event_size`) is answered `{"error"}` with h11's reason, not plain text.

    It relies on uvicorn's H11Protocol internals (pinned in pyproject.toml; tests/test_server.py
    exercises each limit)."""

    def __init__(self, config, server_state, app_state, _loop=None):
        super().__init__(config, server_state, app_state, _loop)
        size = config.h11_max_incomplete_event_size
        self.conn = _H11Connection(h11.SERVER) if size is None else _H11Connection(h11.SERVER, size)
        self.max_connections = self.limit_concurrency
        self.limit_concurrency = None  # ours, in connection_made
        self.stall_s = float(config.timeout_keep_alive)
        self._read_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None

    def _peer(self) -> str:
        return "%s:%d" % self.client if self.client else "a client"

    # -- connections at once --
    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if self.max_connections is not None and max(len(self.connections), len(self.tasks) + 1) > self.max_connections:
            log.warning("%s: %d connections open, the cap is %d (--max-connections); its request is answered 503", self._peer(), len(self.connections), self.max_connections)
            self.app = _busy
        self._watch_reads()

    # -- read stalls --
    def _watch_reads(self) -> None:
        """(Re)arm the read timer while the server waits for the client's request or body."""
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None
        if not self.transport.is_closing() and self.conn.their_state in (h11.IDLE, h11.SEND_BODY):
            self._read_timer = self.loop.call_later(self.stall_s, self._read_stalled)

    def _read_stalled(self) -> None:
        self._read_timer = None
        if self.transport.is_closing():
            return
        if self.flow.read_paused:  # the server, not the client, is not reading (a full buffer): wait on
            self._watch_reads()
            return
        midway = self.conn.their_state is h11.SEND_BODY or bool(self.conn.trailing_data[0])
        log.log(logging.INFO if midway else logging.DEBUG, "%s sent nothing for %.1fs %s; connection closed (--socket-timeout)", self._peer(), self.stall_s, "mid-request" if midway else "(idle)")
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_reads()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._watch_reads()  # a pipelined request may now be awaiting its body

    # -- write stalls --
    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.stall_s, self._write_stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _write_stalled(self) -> None:
        self._write_timer = None
        log.info("%s read nothing of its answer for %.1fs; connection dropped (--socket-timeout)", self._peer(), self.stall_s)
        self.transport.abort()  # close() would wait for the buffer to drain

    def connection_lost(self, exc) -> None:
        for timer in (self._read_timer, self._write_timer):
            if timer is not None:
                timer.cancel()
        self._read_timer = self._write_timer = None
        super().connection_lost(exc)

    # -- malformed requests --
    def send_400_response(self, msg: str) -> None:
        refused = self.conn.refused
        status = getattr(refused, "error_status_hint", 400) or 400
        data = json.dumps({"error": f"malformed HTTP request: {refused}" if refused else msg}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), (b"connection", b"close")]
        for event in (h11.Response(status_code=status, headers=headers, reason=http.HTTPStatus(status).phrase.encode()), h11.Data(data=data), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()


class InferenceServer:
    """The HTTP server: the FastAPI app of `host` on uvicorn, on a socket bound here (port 0: the
    kernel picks one; `server_address` and `url` say which).

        server = InferenceServer(host, ("127.0.0.1", 0), token=token).start()   # serving in a thread
        ...
        server.stop()

    `serve_forever()` serves in the calling thread instead (until `shutdown()` from another one).
    uvicorn installs no signal handlers outside the main thread, so the process's own (`main`)
    decide when to stop. `shutdown` waits up to `grace_s` for requests in flight (a model call
    still running after that is abandoned with its pool thread, a daemon)."""

    def __init__(self, host: ModelHost, address: tuple[str, int], *, token: str | None = None, limits: ServerLimits = ServerLimits(), grace_s: float = 5.0):
        if token is not None and len(token) < MIN_TOKEN_CHARS:
            raise ValueError(f"the server token must have at least {MIN_TOKEN_CHARS} characters")
        if token is None and not is_loopback(address[0]):
            raise ValueError(f"refusing to serve on {address[0]} without a token: set --token-file or ${TOKEN_ENV} (a loopback address may run without)")
        self.host = host
        self.limits = limits
        self.grace_s = grace_s
        self.app = make_app(host, token, limits)
        sock = socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self.socket = sock
        self.server_address = sock.getsockname()[:2]
        config = uvicorn.Config(
            self.app, http=_Protocol, ws="none", loop="asyncio", lifespan="on", log_config=None, access_log=False, proxy_headers=False, server_header=False,
            headers=[("server", SERVER_NAME)], backlog=128, limit_concurrency=limits.max_connections, timeout_keep_alive=limits.socket_timeout_s, timeout_graceful_shutdown=grace_s,
        )  # fmt: skip
        self.server = uvicorn.Server(config)
        self._serving = threading.Event()
        self._finished = threading.Event()
        self._thread: threading.Thread | None = None

    def serve_forever(self) -> None:
        self._serving.set()
        try:
            self.server.run(sockets=[self.socket])
        finally:
            self._finished.set()

    def start(self, timeout: float = 30.0) -> InferenceServer:
        """Serve in a daemon thread; returns once uvicorn has started (the lifespan ran, the socket is served)."""
        self._thread = threading.Thread(target=self.serve_forever, name="http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if self._finished.is_set():
                raise RuntimeError(f"the inference server on {self.url} stopped while starting (see the log)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the inference server on {self.url} did not start within {timeout:.0f}s")
            time.sleep(0.005)
        return self

    def shutdown(self) -> None:
        """Stop serving: no new connections, requests in flight get up to `grace_s`."""
        self.server.should_exit = True
        if self._serving.is_set() and not self._finished.wait(self.grace_s + 5.0):
            log.warning("the HTTP server did not stop within %.0fs (a model call still running); leaving it to exit with the process", self.grace_s + 5.0)

    def server_close(self) -> None:
        self.socket.close()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    @property
    def url(self) -> str:
        h, p = self.server_address[:2]
        return f"http://[{h}]:{p}" if ":" in h else f"http://{h}:{p}"


# ---- CLI ----------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m srpo_core.server", description="SRPO inference server: the rollout-engine interface over HTTP with LoRA hot-loading")
    p.add_argument("--model", required=True, help="base model: a path, a Hugging Face id or builtin:NAME")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0: any free port (see --port-file)")
    p.add_argument("--port-file", help="write the bound port here once listening")
    p.add_argument("--engine", choices=("hf", "vllm"), default="hf")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default: float32 on CPU, bfloat16 on GPU")
    p.add_argument("--device", help="hf engine: cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--max-batch-rows", type=int, default=256, help="hf engine: rows decoded together")
    p.add_argument("--serial-calls", action="store_true", help="hf engine: serve sampling calls one at a time (default: concurrent calls decode in one shared batch)")
    p.add_argument("--base-version", default="base", help="the version name of the bare base model")
    p.add_argument("--max-adapters", type=int, default=2, help="adapters held at once (oldest non-active unloaded)")
    p.add_argument("--adapter", action="append", default=[], metavar="VERSION=URI", help="load at start (repeatable; the last is active)")
    p.add_argument("--cache-dir", help="where downloaded adapters go (default: a temp dir)")
    p.add_argument("--artifact-root", action="append", default=[], metavar="PATH|s3://BUCKET/PREFIX", help="adapters load only from under these roots (repeatable; none: adapter loading is disabled)")
    p.add_argument("--max-adapter-bytes", type=int, default=FetchLimits.max_bytes, help="refuse adapters larger than this (listed before download, counted during)")
    p.add_argument("--max-adapter-files", type=int, default=FetchLimits.max_files)
    s = p.add_argument_group("security and limits")
    s.add_argument("--token-file", help=f"file (mode 0600) holding the bearer token; default ${TOKEN_ENV}. Required unless --host is a loopback address")
    s.add_argument("--max-body-bytes", type=int, default=ServerLimits.max_body_bytes, help="request body cap, counted while the body streams in (413)")
    s.add_argument("--socket-timeout", type=float, default=ServerLimits.socket_timeout_s, help="seconds a connection may stall (sending its request or body, reading its answer, idle)")
    s.add_argument("--max-connections", type=int, default=ServerLimits.max_connections, help="connections open at once; the request of one more is answered 503")
    s.add_argument("--max-request-rows", type=int, default=ServerLimits.max_rows)
    s.add_argument("--max-request-tokens", type=int, default=ServerLimits.max_request_tokens, help="rows x tokens per request (generation: rows x max_model_len)")
    p.add_argument("--log-level", default=os.environ.get("SRPO_SERVER_LOG_LEVEL", "INFO"))
    g = p.add_argument_group("vllm engine")
    g.add_argument("--tensor-parallel-size", type=int, default=1)
    g.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    g.add_argument("--max-model-len", type=int)
    g.add_argument("--max-lora-rank", type=int, default=64)
    g.add_argument("--max-loras", type=int, default=1)
    g.add_argument("--enforce-eager", action="store_true")
    g.add_argument("--seed", type=int, default=0)
    return p


def backend_factory(args: argparse.Namespace, model_path: str):
    if args.engine == "vllm":
        from srpo_core.engine.vllm import VLLMOptions

        opts = VLLMOptions(
            dtype=args.dtype or "bfloat16",
            tensor_parallel_size=args.tensor_parallel_size,
            gpu_memory_utilization=args.gpu_memory_utilization,
            max_model_len=args.max_model_len,
            max_lora_rank=args.max_lora_rank,
            max_loras=args.max_loras,
            enforce_eager=args.enforce_eager,
            seed=args.seed,
        )
        return lambda: VLLMBackend(model_path, opts)
    return lambda: HFBackend(model_path, dtype=args.dtype, device=args.device, max_batch_rows=args.max_batch_rows)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:  # uvicorn's start/stop lines repeat ours; its warnings stay
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model_path = args.model
    if model_path.startswith("builtin:"):
        from srpo_core.tiny.build import resolve_model_path

        model_path = resolve_model_path(model_path)
    preload = []
    for spec in args.adapter:
        version, sep, uri = spec.partition("=")
        if not sep:
            raise SystemExit(f"--adapter expects VERSION=URI, got {spec!r}")
        preload.append((P.check_version(version, "--adapter version"), uri))

    token = read_token_file(args.token_file) if args.token_file else os.environ.pop(TOKEN_ENV, "") or None
    try:
        limits = ServerLimits(
            max_body_bytes=args.max_body_bytes, socket_timeout_s=args.socket_timeout, max_connections=args.max_connections, max_rows=args.max_request_rows, max_request_tokens=args.max_request_tokens
        )
        source = AdapterSource(args.artifact_root, FetchLimits(max_bytes=args.max_adapter_bytes, max_files=args.max_adapter_files))
        host = ModelHost(backend_factory(args, model_path), model_path, args.engine, args.base_version, args.max_adapters, args.cache_dir, adapter_source=source, shared_batch=not args.serial_calls)
        server = InferenceServer(host, (args.host, args.port), token=token, limits=limits)
    except ValueError as exc:
        raise SystemExit(f"python -m srpo_core.server: {exc}") from None
    if token is None:
        log.warning("no token: every local user can call this server on %s (fine for a private machine; set --token-file elsewhere)", args.host)
    if args.port_file:
        tmp = Path(args.port_file + ".tmp")
        tmp.write_text(str(server.server_address[1]))
        tmp.replace(args.port_file)
    server.start()
    log.info("listening on %s (model %s, engine %s, artifact roots: %s); /ready once the model is loaded", server.url, model_path, args.engine, source.describe())

    stop = threading.Event()
    exit_code = [0]

    def on_signal(signum, frame):
        log.info("signal %d: shutting down", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def load():
        try:
            host.load_model()
            for version, uri in preload:
                host.load_adapter(uri, version)
        except BaseException as exc:  # noqa: BLE001
            log.error("startup failed: %s\n%s", exc, traceback.format_exc())
            exit_code[0] = 1
            stop.set()

    threading.Thread(target=load, name="load", daemon=True).start()
    while not stop.wait(0.5):
        pass
    server.stop()
    host.close()
    return exit_code[0]

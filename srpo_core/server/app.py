"""The inference server: one long-lived process holds the base model and serves the rollout-engine
interface over HTTP/JSON (wire format: `server.protocol`), with LoRA adapters hot-loaded by version.

    SRPO_SERVER_TOKEN=... python -m srpo_core.server --model PATH --artifact-root s3://bucket/srpo \
        --host 0.0.0.0 --port 8000 [--engine hf|vllm]

Stack: the standard library's `ThreadingHTTPServer` with hand-written limits (README, "The
inference server", says why not FastAPI/uvicorn). Model work (generation, scoring, adapter loads)
is serialised by one lock; `/health`, `/ready` and `/adapters` never take it, so probes answer
while a long generation runs.

Authentication and limits (README, "Security model")
    Every endpoint but `/health` and `/ready` requires `Authorization: Bearer <token>` (the token
    from `--token-file` or `$SRPO_SERVER_TOKEN`, compared in constant time); the unauthenticated
    `/ready` says only whether the server is ready. Without a token the server refuses to bind
    anything but a loopback address. Requests are bounded (`ServerLimits`): body size, socket
    timeout, concurrent connections (excess answered 503 at once), rows and rows x tokens per
    request; token ids are range-checked against the model's vocabulary (400). A device error
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
import contextlib
import hmac
import ipaddress
import json
import logging
import os
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from srpo_core.server import protocol as P
from srpo_core.server.adapters import ADAPTER_FILES, AdapterRefused, AdapterSource, FetchLimits, adapter_sha256  # noqa: F401 (ADAPTER_FILES, adapter_sha256: re-exported)

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

    max_body_bytes: int = 16 << 20
    socket_timeout_s: float = 60.0  # a connection that sends nothing for this long is closed
    max_connections: int = 32  # connections served at once; more are answered 503 immediately
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
        self, backend_factory, model_path: str, engine_kind: str = "hf", base_version: str = "base", max_adapters: int = 2, cache_dir: str | None = None, *, adapter_source: AdapterSource | None = None
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

    def run(self, version, fn, sha256=None):
        """fn(engine) under the model lock with exactly `version` selected (None: the active one),
        refused (409) unless that version's content hash is `sha256` when one is given."""
        backend = self._require_ready()
        if version is not None:
            P.check_version(version)
        if sha256 is not None:
            P.check_sha256(sha256, "adapter_sha256")
        with self.model_lock:
            self._require_ready()  # a device error in the call before this one
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
            with self._device_guard(f"a model call under {want}"), backend.select(name, want) as engine:
                return want, fn(engine)


# ---- HTTP -------------------------------------------------------------------------------------------

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


class _CloseConnection(Exception):
    """The client stalled or hung up: drop the connection without an answer."""


def _work(rows: int, tokens: int, limits: ServerLimits, what: str) -> None:
    if rows > limits.max_rows:
        raise HTTPError(413, f"{what}: {rows} rows exceed the server's cap of {limits.max_rows} per request (--max-request-rows); split the request")
    if tokens > limits.max_request_tokens:
        raise HTTPError(413, f"{what}: {tokens} row-tokens exceed the server's cap of {limits.max_request_tokens} per request (--max-request-tokens); split the request")


def make_handler(host: ModelHost, token: str | None, limits: ServerLimits):
    token_bytes = token.encode() if token else None

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "srpo-inference/1"
        timeout = limits.socket_timeout_s  # socket timeout for every read and write of a connection

        def log_message(self, fmt, *args):  # route http.server's access log through logging (no headers)
            log.debug("%s " + fmt, self.address_string(), *args)

        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status == 401:
                self.send_header("WWW-Authenticate", 'Bearer realm="srpo-inference"')
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)

        def _authorized(self) -> bool:
            if token_bytes is None:
                return True
            scheme, _, presented = (self.headers.get("Authorization") or "").partition(" ")
            return scheme.lower() == "bearer" and hmac.compare_digest(presented.strip().encode(), token_bytes)

        def _body(self) -> dict:
            if self.headers.get("Transfer-Encoding"):
                raise HTTPError(411, "chunked request bodies are not accepted: send Content-Length")
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                raise HTTPError(400, f"Content-Length is not a number: {self.headers.get('Content-Length')!r}") from None
            if length < 0:
                raise HTTPError(400, f"Content-Length is negative: {length}")
            if length > limits.max_body_bytes:
                raise HTTPError(413, f"request body of {length} bytes exceeds the server's cap of {limits.max_body_bytes} (--max-body-bytes)")
            try:
                raw = self.rfile.read(length) if length else b"{}"
            except (TimeoutError, OSError):
                raise _CloseConnection() from None
            if len(raw) < length:
                raise _CloseConnection()  # the client hung up mid-body
            try:
                body = json.loads(raw)
            except ValueError as exc:
                raise HTTPError(400, f"request body is not JSON: {exc}") from None
            if not isinstance(body, dict):
                raise HTTPError(400, "request body must be a JSON object")
            return body

        def _dispatch(self, method: str) -> None:
            t0 = time.perf_counter()
            path = self.path.split("?", 1)[0].rstrip("/") or "/"
            status, body = 200, {}
            authorized = self._authorized()
            try:
                if not authorized and path not in OPEN_PATHS:
                    self.close_connection = True  # the body (if any) is never read
                    raise HTTPError(401, "missing or wrong bearer token (Authorization: Bearer <token>; the token is the server's --token-file / $SRPO_SERVER_TOKEN)")
                if method == "POST":
                    payload = self._body()
                route = ROUTES.get((method, path))
                if route is None:
                    known = sorted({p for _, p in ROUTES})
                    raise HTTPError(404 if path not in known else 405, f"no route {method} {path} (routes: {', '.join(known)})")
                status, body = route(payload) if method == "POST" else route(authorized) if path == "/ready" else route()
            except _CloseConnection:
                self.close_connection = True
                log.info("%s %s: client stalled or hung up; connection closed", method, path)
                return
            except HTTPError as exc:
                status, body = exc.status, {"error": str(exc)}
            except P.ProtocolError as exc:
                status, body = 400, {"error": str(exc)}
            except Exception as exc:  # noqa: BLE001 - a server must answer, not die
                status, body = error_status(exc), {"error": f"{type(exc).__name__}: {exc}"}
                if status == 500:
                    log.error("%s %s failed:\n%s", method, path, traceback.format_exc())
            if status >= 400 and method == "POST":
                self.close_connection = True  # a refused body may be unread: never parse it as a request
            try:
                self._send(status, body)
            except OSError:
                self.close_connection = True
                return
            level = logging.INFO if path not in OPEN_PATHS else logging.DEBUG
            log.log(
                level, "%s %s -> %d (%.3fs)%s", method, path, status, time.perf_counter() - t0, f" [{body.get('adapter_version')}]" if isinstance(body, dict) and body.get("adapter_version") else ""
            )

        def do_GET(self):
            self._dispatch("GET")

        def do_POST(self):
            self._dispatch("POST")

    def vocab(rows, what):
        host._require_ready()
        P.check_token_range(rows, host.vocab_size, what)

    def health():
        return 200, {"status": "alive"}

    def ready(authorized: bool):
        info = host.status()
        if not info["ready"]:
            info.setdefault("error", f"model {host.model_path} is not loaded yet")
        status = 200 if info["ready"] else 503
        return status, info if authorized else {"ready": info["ready"]}

    def adapters():
        host._require_ready()
        return 200, host.adapter_listing()

    def load(b):
        if b.get("sha256") is None:
            raise P.ProtocolError("sha256 is required: the adapter_sha256 of the adapter the caller expects (the learner's); the server refuses other content")
        return 200, host.load_adapter(b.get("uri"), b.get("version"), b.get("sha256"))

    def unload(b):
        return 200, host.unload_adapter(b.get("version"))

    def encode(b):
        texts = P.texts(b.get("texts"))
        _work(len(texts), sum(map(len, texts)), limits, "encode")
        return 200, {"ids": host.tokenize(lambda e: [e.encode(t) for t in texts])}

    def encode_chat(b):
        texts = P.texts(b.get("texts"))
        _work(len(texts), sum(map(len, texts)), limits, "encode_chat")
        return 200, {"ids": host.tokenize(lambda e: [e.encode_chat(t) for t in texts])}

    def decode(b):
        ids = P.id_lists(b.get("ids"), "ids")
        _work(len(ids), sum(map(len, ids)), limits, "decode")
        vocab(ids, "ids")
        return 200, {"texts": host.tokenize(lambda e: [e.decode(i) for i in ids])}

    def generate_thoughts(b):
        reqs = b.get("requests")
        if not isinstance(reqs, list):
            raise P.ProtocolError("requests must be a list")
        reqs = [P.request_from_json(r, i) for i, r in enumerate(reqs)]
        limits_, sampling = P.limits_from_json(b.get("limits", {})), P.sampling_from_json(b.get("sampling", {}))
        rows = sum(r.n for r in reqs)
        _work(rows, rows * limits_.max_model_len, limits, "generate_thoughts")
        vocab([r.prompt_ids for r in reqs], "requests.prompt_ids")
        vocab([r.prefix_ids for r in reqs], "requests.prefix_ids")
        version, groups = host.run(b.get("adapter_version"), lambda e: e.generate_thoughts(reqs, limits_, sampling), b.get("adapter_sha256"))
        return 200, {"adapter_version": version, "results": [[P.rollout_to_json(r) for r in g] for g in groups]}

    def complete(b):
        prompts = P.id_lists(b.get("prompts"), "prompts")
        max_tokens = b.get("max_tokens")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise P.ProtocolError("max_tokens must be an integer >= 1")
        sampling = P.sampling_from_json(b.get("sampling", {}))
        _work(len(prompts), sum(len(p) + max_tokens for p in prompts), limits, "complete")
        vocab(prompts, "prompts")
        version, comps = host.run(b.get("adapter_version"), lambda e: e.complete(prompts, max_tokens, sampling), b.get("adapter_sha256"))
        return 200, {"adapter_version": version, "results": [P.completion_to_json(c) for c in comps]}

    def teacher_force(b):
        prompts, responses = P.id_lists(b.get("prompts"), "prompts"), P.id_lists(b.get("responses"), "responses")
        if len(prompts) != len(responses):
            raise P.ProtocolError(f"{len(prompts)} prompts but {len(responses)} responses")
        temperature = b.get("temperature", 1.0)
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0 or temperature == float("inf"):
            raise P.ProtocolError("temperature must be a finite number > 0")
        _work(len(prompts), sum(len(p) + len(r) for p, r in zip(prompts, responses)), limits, "teacher_force")
        vocab(prompts, "prompts")
        vocab(responses, "responses")
        version, scores = host.run(b.get("adapter_version"), lambda e: e.teacher_force(prompts, responses, float(temperature)), b.get("adapter_sha256"))
        return 200, {"adapter_version": version, "results": [P.scores_to_json(s) for s in scores]}

    ROUTES = {
        ("GET", "/health"): health, ("GET", "/ready"): ready, ("GET", "/adapters"): adapters,
        ("POST", "/adapters/load"): load, ("POST", "/adapters/unload"): unload,
        ("POST", "/encode"): encode, ("POST", "/encode_chat"): encode_chat, ("POST", "/decode"): decode,
        ("POST", "/generate_thoughts"): generate_thoughts, ("POST", "/complete"): complete, ("POST", "/teacher_force"): teacher_force,
    }  # fmt: skip
    return Handler


BUSY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
    b"Retry-After: 1\r\nContent-Length: 68\r\n\r\n"
    b'{"error": "server busy: too many connections (--max-connections)"}\r\n'
)


class InferenceServer(ThreadingHTTPServer):
    """One thread per connection, at most `limits.max_connections` at once: a connection beyond
    that is answered 503 at once and closed, so stalled clients cannot pile up threads."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, host: ModelHost, address: tuple[str, int], *, token: str | None = None, limits: ServerLimits = ServerLimits()):
        if token is not None and len(token) < MIN_TOKEN_CHARS:
            raise ValueError(f"the server token must have at least {MIN_TOKEN_CHARS} characters")
        if token is None and not is_loopback(address[0]):
            raise ValueError(f"refusing to serve on {address[0]} without a token: set --token-file or ${TOKEN_ENV} (a loopback address may run without)")
        self.limits = limits
        self.slots = threading.BoundedSemaphore(limits.max_connections)
        super().__init__(address, make_handler(host, token, limits))
        self.host = host

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            try:
                request.settimeout(1.0)
                request.sendall(BUSY_RESPONSE)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    @property
    def url(self) -> str:
        h, p = self.server_address[:2]
        return f"http://{h}:{p}"


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
    p.add_argument("--base-version", default="base", help="the version name of the bare base model")
    p.add_argument("--max-adapters", type=int, default=2, help="adapters held at once (oldest non-active unloaded)")
    p.add_argument("--adapter", action="append", default=[], metavar="VERSION=URI", help="load at start (repeatable; the last is active)")
    p.add_argument("--cache-dir", help="where downloaded adapters go (default: a temp dir)")
    p.add_argument("--artifact-root", action="append", default=[], metavar="PATH|s3://BUCKET/PREFIX", help="adapters load only from under these roots (repeatable; none: adapter loading is disabled)")
    p.add_argument("--max-adapter-bytes", type=int, default=FetchLimits.max_bytes, help="refuse adapters larger than this (listed before download, counted during)")
    p.add_argument("--max-adapter-files", type=int, default=FetchLimits.max_files)
    s = p.add_argument_group("security and limits")
    s.add_argument("--token-file", help=f"file (mode 0600) holding the bearer token; default ${TOKEN_ENV}. Required unless --host is a loopback address")
    s.add_argument("--max-body-bytes", type=int, default=ServerLimits.max_body_bytes)
    s.add_argument("--socket-timeout", type=float, default=ServerLimits.socket_timeout_s, help="seconds a connection may stall on a read or write")
    s.add_argument("--max-connections", type=int, default=ServerLimits.max_connections, help="connections served at once; more get 503 at once")
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
        host = ModelHost(backend_factory(args, model_path), model_path, args.engine, args.base_version, args.max_adapters, args.cache_dir, adapter_source=source)
        server = InferenceServer(host, (args.host, args.port), token=token, limits=limits)
    except ValueError as exc:
        raise SystemExit(f"python -m srpo_core.server: {exc}") from None
    if token is None:
        log.warning("no token: every local user can call this server on %s (fine for a private machine; set --token-file elsewhere)", args.host)
    if args.port_file:
        tmp = Path(args.port_file + ".tmp")
        tmp.write_text(str(server.server_address[1]))
        tmp.replace(args.port_file)
    log.info("listening on %s (model %s, engine %s, artifact roots: %s); /ready once the model is loaded", server.url, model_path, args.engine, source.describe())
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()

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
    server.shutdown()
    server.server_close()
    host.close()
    return exit_code[0]

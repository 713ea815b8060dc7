"""`OpenAIEngine`: the rollout-engine interface against a stock `vllm serve --enable-lora`, through
vLLM's OpenAI-compatible HTTP API (`rollout.engine: openai` with `rollout.server_url`).

    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True VLLM_API_KEY="$(cat ~/.srpo-token)" \\
        vllm serve /models/Qwen2.5-14B-Instruct --enable-lora --max-lora-rank 64 --logprobs-mode processed_logprobs
    engine = OpenAIEngine("http://vllm:8000", tokenizer)        # token: $SRPO_SERVER_TOKEN(_FILE)
    engine.check_ready()                                        # the URL, the token, the tokenizer
    engine.load_adapter("/shared/adapters/step-3", "step-3", sha256=adapter_sha)
    engine.generate_thoughts(requests, limits, sampling)       # every Rollout carries adapter_version

What it sends (vLLM's documented OpenAI-compatible server; the request model is vLLM's
`CompletionRequest`, the response `CompletionResponse` / `CompletionResponseChoice`):

  - `POST /v1/completions` with `prompt` a list of token ids (no re-tokenisation), `n`, `seed`,
    `temperature`, `top_p`, `max_tokens`, `stop`, `logprobs: 0` (the sampled token's log-prob
    only), and vLLM's extra fields `top_k`, `include_stop_str_in_output`, `skip_special_tokens`,
    `return_tokens_as_token_ids` (`logprobs.tokens` become "token_id:123": the generated ids
    without decoding text), `return_token_ids` (newer vLLM: `choices[].token_ids`; cross-checked
    against the former where both come back), `prompt_logprobs` (teacher forcing), and the
    penalties at their neutral values (`repetition_penalty` 1, `presence_penalty` /
    `frequency_penalty` / `min_p` 0): vLLM applies a model's `generation_config.json` defaults
    to every field a request leaves out;
  - `choices[].finish_reason` / `stop_reason`: "stop" with a string stop_reason is the stop
    string (`</thought>`), "stop" with none (or a token id) is an end-of-sequence token, which ends
    the chain ("eos") and is dropped from the response, as in the other engines; "length" is the
    token cap;
  - `POST /v1/load_lora_adapter {lora_name, lora_path}` and `POST /v1/unload_lora_adapter
    {lora_name}` (registered only with `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True` on the server: a
    404 here says so), `GET /v1/models` (the base model with its `max_model_len`; each adapter
    as a card whose `parent` is the base and `root` its path), `POST /tokenize` (in
    `check_ready` only: the server's tokenizer must agree with the local one);
  - `Authorization: Bearer <token>` on every request: the server's `--api-key` / `$VLLM_API_KEY`.
    Here the token is the `token` argument, else $SRPO_SERVER_TOKEN, else the file named by
    $SRPO_SERVER_TOKEN_FILE (as for our server); it never appears in repr() or error messages.

Thought-level generation: one completion call per thought with the stop string, as the paper ran
vLLM ("each thought is generated as a separate vLLM call with stop token </thought>") and as
`engine.vllm.VLLMEngine` does in process: the first thought of a request is one call with `n=G`
(the prompt + reset prefix is prefilled once; vLLM gives child i the seed `seed + i`), then every
live chain is its own `n=1` call re-sending prompt + response (vLLM's prefix cache makes the
re-send cheap), with the same per-call seeds as `VLLMEngine` (`engine.vllm.derive_seed`). The
chain-end rules are `engine.base.ThoughtChains`, applied on this thread as calls come back; calls
run `max_concurrency` at a time (the server batches them), and a chain's next call is sent as soon
as its previous one is back, so no chain waits for the slowest chain of a round. Results do not
depend on the order in which calls finish.

Text: encode, decode and the chat template run on a local Hugging Face tokenizer (the
`tokenizer` argument, `runtime.load_tokenizer` of `model.name_or_path`): decoding must skip
special tokens exactly as the other engines do, which vLLM's `/detokenize` cannot be asked to do.
`check_ready` compares the server's `/tokenize` of a probe text with the local tokenizer's and
refuses a mismatch (another model behind the URL).

Log-probs: vLLM reports the sampled token's log-prob of the raw logits unless the server runs with
`--logprobs-mode processed_logprobs` (vLLM >= 0.10.2), which makes them the distribution sampled
from (after temperature and top-k/top-p), as `Rollout.logprobs` means; the API does not tell which
mode a server runs, so start it with that flag (the paper's "pg" loss does not read them).
`teacher_force` reads `prompt_logprobs: 1`: per prompt position a map from token id (a JSON
string key) to {logprob, rank, decoded_token}, holding the given token and the rank-1 (argmax)
token; vLLM computes prompt log-probs from raw logits, so only temperature 1.0 is supported (the
localizer and the weight-sync canary use 1.0). vLLM floors log-probs at -9999.0 in its JSON.

What the OpenAI API cannot give, and what this client does instead
------------------------------------------------------------------
  - **No content pinning.** Our server checks an adapter's sha256 on load and refuses a model
    call whose pinned hash it does not hold (409). vLLM names adapters only by `lora_name`, reads
    `lora_path` itself and reports no hash. So the name IS the content: `adapter_name(version,
    sha256)` puts the sha256 into the name, `load_adapter` hashes the directory (which must be
    readable here, at the same path the server reads) and refuses other content, an adapter of
    that name already on the server is taken as that content (never reloaded: vLLM refuses a
    second load of a name unless `load_inplace`), and every model call names the adapter, so a
    server that lost it (unloaded, restarted) answers 404, raised as `AdapterVersionError`,
    never samples from another policy. What stays open: a holder of the server's API key can
    unload a name and load other weights under it, or rewrite the files before vLLM reads them
    (vLLM also re-reads `lora_path` after evicting an adapter from its CPU cache): the API key and
    write access to the adapter directory are trusted. The weight-sync canary (teacher-forced
    log-probs vs the learner's, after each step's load) catches a name serving other weights.
  - **Adapter sources.** `lora_path` is a path on the vLLM server's filesystem; vLLM does not read
    `s3://`. The flow stages each step's adapter (verified against its manifest) into
    `rollout.lora_dir`, a directory both the phase steps and the server mount at the same path
    (flow_phases.staged_adapter); a local artifact store is read in place.
  - **No batch-level request limits, no step-manifest check, no `/ready` after a device error**
    beyond what vLLM itself does; its `--api-key` guards only the `/v1` routes (see vLLM's
    security notes): keep the server behind a NetworkPolicy or on loopback, as ours.

Light on purpose (stdlib urllib + json, no torch): a workflow step that only orchestrates can use it.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from srpo_core.engine.base import Completion, Rollout, RolloutEngine, SamplingParams, ThoughtChains, ThoughtLimits, ThoughtRequest, TokenizerText, TokenScores
from srpo_core.engine.remote import AdapterVersionError, RemoteEngineError, ServerAuthError, ServerNotReadyError, ServerUnreachableError, token_from_env
from srpo_core.engine.vllm import derive_seed

TOKEN_ID_PREFIX = "token_id:"  # vLLM's `return_tokens_as_token_ids` form of a token
ADAPTER_HASH_CHARS = 32  # hex digits of the adapter's sha256 in its served name (128 bits)
TOKENIZER_PROBE = "SRPO tokenizer check: 1+2=3 </thought> \\boxed{42}"
RUNTIME_LORA_HINT = "the vLLM server registers the adapter routes only when started with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True (and --enable-lora)"
_NAME_OK = re.compile(r"^[A-Za-z0-9._-]+$")


def adapter_name(version: str, sha256: str) -> str:
    """The name an adapter is served under: its version and its content hash, so one name always
    means one content (`step-3-sha256-<32 hex>`)."""
    if not _NAME_OK.match(version):
        raise ValueError(f"adapter version {version!r}: letters, digits, '.', '_' and '-' only (it becomes part of a vLLM model name)")
    if not re.fullmatch(r"[0-9a-f]{64}", sha256 or ""):
        raise ValueError(f"adapter sha256 must be 64 lowercase hex digits, got {str(sha256)[:80]!r}")
    return f"{version}-sha256-{sha256[:ADAPTER_HASH_CHARS]}"


def _token_id(token: str) -> int:
    """123 from vLLM's "token_id:123" (`return_tokens_as_token_ids`); ValueError for anything else."""
    if not isinstance(token, str) or not token.startswith(TOKEN_ID_PREFIX):
        raise ValueError(token)
    return int(token[len(TOKEN_ID_PREFIX) :])


def _error_message(raw: bytes, fallback: str) -> str:
    """The message of a vLLM / FastAPI error body: {"error": {"message"}} (newer vLLM),
    {"object": "error", "message"} (older), {"detail"} (FastAPI: an unknown route), {"error": str}
    (the --api-key middleware)."""
    try:
        body = json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")[:500] or fallback
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        for key in ("message", "detail"):
            if body.get(key):
                return str(body[key])
        if isinstance(err, str):
            return err
    return raw.decode(errors="replace")[:500] or fallback


class OpenAIEngine(TokenizerText, RolloutEngine):
    """A stock vLLM server through its OpenAI-compatible API (see the module doc for the fields
    used and for what this API cannot pin). `adapter_version` is the version rollouts carry,
    `adapter_sha256` the content the served name stands for; `model` names the base model (default:
    the one base model `/v1/models` lists)."""

    def __init__(
        self, url: str, tokenizer, *, model: str | None = None, token: str | None = None, adapter_version: str | None = None,
        timeout: float = 3600.0, connect_timeout: float = 10.0, max_concurrency: int = 64,
    ):  # fmt: skip
        if not str(url).startswith(("http://", "https://")):
            raise ValueError(f"OpenAIEngine: the server URL must be http(s)://..., got {url!r}")
        if max_concurrency < 1:
            raise ValueError(f"OpenAIEngine: max_concurrency must be >= 1, got {max_concurrency}")
        self.url = str(url).rstrip("/")
        self.tokenizer = tokenizer
        self.eos_id = getattr(tokenizer, "eos_token_id", None)
        self.base_model = model
        self.adapter_version = adapter_version
        self.adapter_sha256: str | None = None
        self.served_model: str | None = None  # the `model` of every call: an adapter's name, else the base model
        self.timeout, self.connect_timeout = timeout, connect_timeout
        self.max_concurrency = max_concurrency
        self.server_max_model_len: int | None = None
        self._token = token or token_from_env()

    def __repr__(self) -> str:  # never the token
        return f"OpenAIEngine({self.url!r}, model={self.served_model or self.base_model!r}, adapter_version={self.adapter_version!r})"

    # ---- HTTP ------------------------------------------------------------------------------
    def _call(self, method: str, path: str, body: dict | None = None, timeout: float | None = None, *, json_reply: bool = True) -> Any:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout if timeout is None else timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            msg = _error_message(exc.read(), str(exc.reason))
            where = f"vLLM server at {self.url}: {method} {path} -> HTTP {exc.code}"
            if exc.code == 401:
                hint = "no token given (set $SRPO_SERVER_TOKEN or $SRPO_SERVER_TOKEN_FILE to the server's --api-key)" if not self._token else "the token is not the server's --api-key"
                raise ServerAuthError(f"{where}: {msg}; {hint}", status=401, url=self.url) from None
            if exc.code == 404 and path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter") and "lora" not in msg.lower():
                raise RemoteEngineError(f"{where}: {msg}; {RUNTIME_LORA_HINT}", status=404, url=self.url) from None
            if exc.code == 404 and path in ("/v1/completions",) and body and body.get("model") == self.served_model != self.base_model:
                raise AdapterVersionError(
                    f"{where}: {msg}; the server no longer serves adapter {self.served_model!r} (unloaded, or the server restarted): load it again with load_adapter",
                    status=404, url=self.url,
                ) from None  # fmt: skip
            cls = ServerNotReadyError if exc.code == 503 else RemoteEngineError
            raise cls(f"{where}: {msg}", status=exc.code, url=self.url) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ServerUnreachableError(f"vLLM server at {self.url} is unreachable ({method} {path}): {reason}", url=self.url) from None
        if not json_reply:
            return raw.decode(errors="replace")
        try:
            return json.loads(raw or b"{}")
        except ValueError:
            raise RemoteEngineError(f"vLLM server at {self.url}: {method} {path} answered non-JSON: {raw[:200]!r}", url=self.url) from None

    # ---- server state ------------------------------------------------------------------------
    def models(self) -> list[dict]:
        """`GET /v1/models`: the model cards (base models, then one per loaded adapter)."""
        return list(self._call("GET", "/v1/models", timeout=self.connect_timeout).get("data") or [])

    def adapters(self) -> dict[str, str]:
        """Loaded adapters: served name -> the path vLLM loaded it from."""
        return {c["id"]: c.get("root") or "" for c in self.models() if c.get("parent")}

    def _base_card(self, cards: list[dict]) -> dict:
        bases = [c for c in cards if not c.get("parent")]
        if self.base_model is not None:
            found = [c for c in bases if c.get("id") == self.base_model]
            if not found:
                raise RemoteEngineError(f"vLLM server at {self.url} serves {[c.get('id') for c in bases]}, not model {self.base_model!r}", url=self.url)
            return found[0]
        if len(bases) != 1:
            raise RemoteEngineError(f"vLLM server at {self.url} serves {len(bases)} base models {[c.get('id') for c in bases]}: name one (OpenAIEngine(model=...))", url=self.url)
        return bases[0]

    def check_ready(self, wait_s: float = 0.0) -> dict:
        """Raise (naming the URL) unless the server answers `/v1/models` with this token, serves one
        base model (or `model`), tokenizes as the local tokenizer does and, when this client serves
        an adapter, still holds it. `wait_s` > 0 polls that long for a starting server."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                cards = self.models()
                break
            except (ServerUnreachableError, ServerNotReadyError):
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.5)
        base = self._base_card(cards)
        self.base_model = base["id"]
        self.server_max_model_len = int(base["max_model_len"]) if base.get("max_model_len") else None
        if self.served_model is None:
            self.served_model = self.base_model
        served = {c.get("id") for c in cards}
        if self.served_model not in served:
            msg = f"vLLM server at {self.url} does not serve {self.served_model!r} (it serves {sorted(served)}); load it with load_adapter(path, version, sha256)"
            raise AdapterVersionError(msg, status=404, url=self.url)
        theirs = self._call("POST", "/tokenize", {"model": self.base_model, "prompt": TOKENIZER_PROBE, "add_special_tokens": True}, timeout=self.connect_timeout).get("tokens")
        ours = self.encode(TOKENIZER_PROBE)
        if theirs != ours:
            raise RemoteEngineError(
                f"vLLM server at {self.url} (model {self.base_model!r}) tokenizes differently from the local tokenizer ({theirs} vs {ours}): "
                "model.name_or_path must name the model the server serves",
                url=self.url,
            )
        return {"model": self.base_model, "served": self.served_model, "max_model_len": self.server_max_model_len, "adapters": sorted(c["id"] for c in cards if c.get("parent"))}

    def load_adapter(self, path: str | os.PathLike, version: str, sha256: str, use: bool = True) -> dict:
        """Serve the PEFT adapter directory `path` (read by the vLLM server at the same path) as
        `adapter_name(version, sha256)`, refused unless its content hash here is `sha256`; with
        `use`, every later call of this client names it. An adapter of that name already on the
        server is the same content by construction and is not reloaded."""
        from srpo_core.server.adapters import adapter_sha256

        name = adapter_name(version, sha256)
        path = str(Path(path).resolve())
        try:
            held = adapter_sha256(path)
        except FileNotFoundError as exc:
            raise RemoteEngineError(f"adapter {version!r}: {exc} (the directory must be readable here at the path the vLLM server reads)") from None
        if held != sha256:
            raise AdapterVersionError(f"adapter {version!r} at {path} has sha256 {held[:12]}, expected {sha256[:12]}: refusing to load other content under this version", status=409, url=self.url)
        loaded = self.adapters()
        if name not in loaded:
            try:
                self._call("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path}, timeout=self.timeout, json_reply=False)
            except RemoteEngineError as exc:  # another phase loaded it between our listing and our load
                if exc.status != 400 or name not in self.adapters():
                    raise
        if use:
            self.adapter_version, self.adapter_sha256, self.served_model = version, sha256, name
        return {"name": name, "version": version, "sha256": sha256, "path": path, "loaded": name not in loaded}

    def unload_adapter(self, version: str, sha256: str) -> dict:
        """Unload `adapter_name(version, sha256)`; this client falls back to the base model if it used it."""
        name = adapter_name(version, sha256)
        self._call("POST", "/v1/unload_lora_adapter", {"lora_name": name}, json_reply=False)
        if self.served_model == name:
            self.served_model, self.adapter_version, self.adapter_sha256 = self.base_model, None, None
        return {"name": name}

    def use_base(self) -> None:
        """Serve the base model (version `base`)."""
        self._ensure_model()
        self.served_model, self.adapter_sha256 = self.base_model, None

    def _ensure_model(self) -> str:
        if self.base_model is None or self.served_model is None:
            self.check_ready()
        return self.served_model

    # ---- completions -------------------------------------------------------------------------
    def _body(self, prompt: list[int], n: int, max_tokens: int, sampling: SamplingParams | None, seed: int | None, stop: str | None) -> dict:
        body: dict[str, Any] = {
            "model": self.served_model, "prompt": list(prompt), "n": n, "max_tokens": int(max_tokens), "stream": False,
            "logprobs": 0, "return_tokens_as_token_ids": True, "return_token_ids": True, "skip_special_tokens": True,
            "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "min_p": 0.0,
        }  # fmt: skip
        if sampling is not None:
            body.update(temperature=max(0.0, sampling.temperature), top_p=sampling.top_p, top_k=sampling.top_k if sampling.top_k > 0 else -1)
            if sampling.temperature > 0:
                body["seed"] = int(seed)
        if stop:
            body.update(stop=[stop], include_stop_str_in_output=True)
        return body

    def _choices(self, body: dict) -> list[dict]:
        out = self._call("POST", "/v1/completions", body)
        choices = sorted(out.get("choices") or [], key=lambda c: c.get("index", 0))
        if len(choices) != body["n"]:
            raise RemoteEngineError(f"vLLM server at {self.url} returned {len(choices)} completions for n={body['n']}", url=self.url)
        return choices

    def _tokens(self, choice: dict) -> tuple[list[int], list[float], bool]:
        """(token ids, sampled-token log-probs, ended by an end-of-sequence token) of one choice;
        the EOS token dropped."""
        lp = choice.get("logprobs") or {}
        tokens, lps = lp.get("tokens"), lp.get("token_logprobs")
        if tokens is None or lps is None or len(tokens) != len(lps) or any(v is None for v in lps):
            raise RemoteEngineError(f"vLLM server at {self.url} returned no per-token log-probs (logprobs=0): is it vLLM's OpenAI-compatible server?", url=self.url)
        try:
            ids = [_token_id(t) for t in tokens]
        except ValueError:
            raise RemoteEngineError(f"vLLM server at {self.url} did not return tokens as 'token_id:N' (return_tokens_as_token_ids): got {tokens[:3]}", url=self.url) from None
        if choice.get("token_ids") is not None and list(choice["token_ids"]) != ids:
            raise RemoteEngineError(f"vLLM server at {self.url}: token_ids {choice['token_ids'][:8]} disagree with logprobs.tokens {ids[:8]}", url=self.url)
        lps = [float(v) for v in lps]
        finish, reason = choice.get("finish_reason"), choice.get("stop_reason")
        if finish not in ("stop", "length"):
            raise RemoteEngineError(f"vLLM server at {self.url}: completion ended with finish_reason {finish!r}", url=self.url)
        eos = finish == "stop" and not isinstance(reason, str)
        if eos and ids and ids[-1] in ({self.eos_id} | ({reason} if isinstance(reason, int) else set())):
            ids.pop(), lps.pop()
        return ids, lps, eos

    def _check_limits(self, limits: ThoughtLimits) -> None:
        if self.server_max_model_len is not None and limits.max_model_len > self.server_max_model_len:
            raise ValueError(
                f"model.max_model_len={limits.max_model_len} exceeds the vLLM server's max_model_len={self.server_max_model_len} ({self.url}): "
                "lower model.max_model_len or start vllm serve with a larger --max-model-len"
            )

    def generate_thoughts(self, requests: list[ThoughtRequest], limits: ThoughtLimits, sampling: SamplingParams) -> list[list[Rollout]]:
        self._ensure_model()
        self._check_limits(limits)
        rows_req = [i for i, r in enumerate(requests) for _ in range(r.n)]
        rows_chain = [j for r in requests for j in range(r.n)]
        chains = ThoughtChains(
            self, limits,
            [len(requests[i].prompt_ids) + len(requests[i].prefix_ids) for i in rows_req],
            [list(requests[i].prefix_ids) for i in rows_req],
            [list(requests[i].prefix_spans) for i in rows_req],
        )  # fmt: skip
        generated: list[list[int]] = [[] for _ in rows_req]
        logprobs: list[list[float]] = [[] for _ in rows_req]
        thoughts_done = [0] * len(rows_req)

        def call(rows: list[int], context: list[int], seed: int) -> tuple[list[int], list[dict]]:
            return rows, self._choices(self._body(context, len(rows), limits.max_thought_tokens, sampling, seed, limits.stop))

        def land(rows: list[int], choices: list[dict]) -> list[int]:
            """Apply one call's thoughts (on this thread); the rows still live."""
            live = []
            for choice, row in zip(choices, rows):
                toks, lps, eos = self._tokens(choice)
                generated[row] += toks
                logprobs[row] += lps
                thoughts_done[row] += 1
                chains.land(row, generated[row], eos)
                if chains.finish[row] is None:
                    live.append(row)
            return live

        first: dict[int, list[int]] = {}
        for row, i in enumerate(rows_req):
            if chains.finish[row] is None:
                first.setdefault(i, []).append(row)
        with ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="srpo-openai") as pool:
            pending: set[Future] = {
                pool.submit(call, rows, list(requests[i].prompt_ids) + list(requests[i].prefix_ids), derive_seed(sampling.seed, i, 0, 0)) for i, rows in first.items()
            }
            try:
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        for row in land(*fut.result()):
                            context = list(requests[rows_req[row]].prompt_ids) + chains.prefixes[row] + generated[row]
                            pending.add(pool.submit(call, [row], context, derive_seed(sampling.seed, rows_req[row], rows_chain[row] + 1, thoughts_done[row])))
            except BaseException:
                for fut in pending:
                    fut.cancel()
                raise

        return chains.rollouts(requests, rows_req, generated, logprobs, self.adapter_version)

    def _map(self, fn, items: list) -> list:
        if not items:
            return []
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(items)), thread_name_prefix="srpo-openai") as pool:
            return list(pool.map(fn, items))

    def complete(self, prompts: list[list[int]], max_tokens: int, sampling: SamplingParams) -> list[Completion]:
        self._ensure_model()

        def one(i: int) -> Completion:
            (choice,) = self._choices(self._body(prompts[i], 1, max_tokens, sampling, derive_seed(sampling.seed, i, 0, 0), None))
            ids, lps, eos = self._tokens(choice)
            return Completion(ids=ids, text=self.decode(ids), logprobs=lps, finish_reason="eos" if eos else "length", adapter_version=self.adapter_version)

        return self._map(one, list(range(len(prompts))))

    def teacher_force(self, prompts: list[list[int]], responses: list[list[int]], temperature: float = 1.0) -> list[TokenScores]:
        if abs(temperature - 1.0) > 1e-9:
            raise NotImplementedError(f"OpenAIEngine.teacher_force supports temperature 1.0 only (vLLM's prompt log-probs are computed from raw logits); got {temperature}")
        self._ensure_model()

        def one(pair: tuple[list[int], list[int]]) -> TokenScores:
            p, r = list(pair[0]), list(pair[1])
            body = {"model": self.served_model, "prompt": p + r, "n": 1, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 1, "stream": False}
            (choice,) = self._choices(body)
            plp = choice.get("prompt_logprobs")
            if not isinstance(plp, list) or len(plp) != len(p) + len(r):
                raise RemoteEngineError(f"vLLM server at {self.url} returned {len(plp) if isinstance(plp, list) else 'no'} prompt log-probs for {len(p) + len(r)} prompt tokens", url=self.url)
            lps, greedy = [], []
            for pos, tok in zip(range(len(p), len(p) + len(r)), r):
                entry = plp[pos] or {}
                if str(tok) not in entry:
                    raise RemoteEngineError(f"vLLM server at {self.url}: prompt_logprobs at position {pos} lack the given token {tok}", url=self.url)
                lps.append(float(entry[str(tok)]["logprob"]))
                top = [int(t) for t, v in entry.items() if v.get("rank") == 1]
                if not top:
                    raise RemoteEngineError(f"vLLM server at {self.url}: prompt_logprobs at position {pos} have no rank-1 token", url=self.url)
                greedy.append(top[0])
            return TokenScores(logprobs=lps, greedy_ids=greedy)

        return self._map(one, list(zip(prompts, responses)))

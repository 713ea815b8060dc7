"""`OpenAIEngine` against a stand-in for a stock `vllm serve --enable-lora` (vLLM cannot be
installed here): `StandInVLLM` is a stdlib HTTP server answering the documented subset of vLLM's
OpenAI-compatible API the engine uses (`/v1/completions` with token-id prompts and vLLM's extra
fields, `/v1/models`, `/tokenize`, `/v1/load_lora_adapter`, `/v1/unload_lora_adapter`, the
`--api-key` bearer check on `/v1` routes, vLLM's error bodies), computed by `FakeLLM`
(tests/test_vllm.py: vLLM's offline semantics over the HF tiny model). It refuses request fields
that vLLM's `CompletionRequest` does not have and neutral-penalty fields at other values, so the
engine is held to what the real server accepts.

Properties: greedy chains equal the HF engine's and sampled chains equal the in-process vLLM
engine's with the same seeds (token ids round-trip through "token_id:N", one call per thought with
the stop string, the seeds of every call), teacher forcing from `prompt_logprobs` equals the HF
engine's, adapters are loaded under a name holding their sha256 and never reloaded, the flow stages
and pins them, the weight-sync canary passes against it, and 401/404/5xx/unreachable/mismatched
servers fail with errors that say what to do."""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from srpo_core import store as S
from srpo_core.config import ConfigError, load_config
from srpo_core.engine.base import SamplingParams, ThoughtLimits, ThoughtRequest
from srpo_core.engine.openai_api import OpenAIEngine, adapter_name
from srpo_core.engine.remote import AdapterVersionError, RemoteEngineError, ServerAuthError, ServerNotReadyError, ServerUnreachableError
from srpo_core.engine.vllm import VLLMEngine, derive_seed
from srpo_core.server.adapters import adapter_sha256
from tests.test_vllm import FAKE_API, GREEDY, LIMITS, TIGHT, FakeLLM, FakeSamplingParams, assert_same, assert_scripted_chain, prompts

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOKEN = "test-api-key-0123456789"
# vLLM's CompletionRequest fields (vllm/entrypoints/openai/completion/protocol.py); anything else is refused here
COMPLETION_FIELDS = {
    "model", "prompt", "echo", "frequency_penalty", "logit_bias", "logprobs", "max_tokens", "n", "presence_penalty", "seed", "stop", "stream",
    "suffix", "temperature", "top_p", "user", "use_beam_search", "top_k", "min_p", "repetition_penalty", "length_penalty", "stop_token_ids",
    "include_stop_str_in_output", "ignore_eos", "min_tokens", "skip_special_tokens", "spaces_between_special_tokens", "truncate_prompt_tokens",
    "allowed_token_ids", "prompt_logprobs", "add_special_tokens", "response_format", "priority", "request_id", "return_tokens_as_token_ids",
    "return_token_ids", "cache_salt",
}  # fmt: skip
NEUTRAL = {"repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "min_p": 0.0}  # what FakeLLM computes


def vllm_error(status: int, message: str, kind: str) -> tuple[int, dict]:
    return status, {"error": {"message": message, "type": kind, "param": None, "code": status}}


class StandInVLLM:
    """The subset of vLLM's OpenAI-compatible server that OpenAIEngine uses, over FakeLLM."""

    def __init__(self, llm: FakeLLM, tokenizer, *, api_key: str | None = TOKEN, model: str = "tiny-arith", max_model_len: int = 512, runtime_lora: bool = True):
        self.llm, self.tokenizer, self.api_key, self.model, self.max_model_len, self.runtime_lora = llm, tokenizer, api_key, model, max_model_len, runtime_lora
        self.loras: dict[str, str] = {}
        self.requests: list[dict] = []
        self.fail: dict[str, tuple[int, dict]] = {}  # path -> one canned error reply
        self.script: list[tuple[list[int], str, object]] = []  # canned (token_ids, finish_reason, stop_reason) for completions
        self.lock = threading.Lock()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _reply(self, status: int, payload) -> None:
                data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain" if isinstance(payload, str) else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method: str) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"null")
                stand_in.requests.append({"method": method, "path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                self._reply(*stand_in.route(method, self.path, self.headers.get("Authorization"), body))

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def calls(self, path: str) -> list[dict]:
        return [r for r in self.requests if r["path"] == path]

    # ---- routes ----------------------------------------------------------------------------
    def route(self, method: str, path: str, auth: str | None, body) -> tuple[int, object]:
        if self.api_key and path.startswith("/v1") and auth != f"Bearer {self.api_key}":
            return 401, {"error": "Unauthorized"}  # vLLM's --api-key middleware
        if path in self.fail:
            return self.fail.pop(path)
        lora_routes = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")
        if (method, path) == ("GET", "/v1/models"):
            cards = [{"id": self.model, "object": "model", "root": "/models/tiny", "parent": None, "max_model_len": self.max_model_len}]
            return 200, {"object": "list", "data": cards + [{"id": n, "object": "model", "root": p, "parent": self.model} for n, p in self.loras.items()]}
        if (method, path) == ("POST", "/tokenize"):
            return 200, {"tokens": self.tokenizer.encode(body["prompt"], add_special_tokens=body.get("add_special_tokens", True)), "max_model_len": self.max_model_len}
        if path in lora_routes and not self.runtime_lora:
            return 404, {"detail": "Not Found"}  # the routes are not registered
        if (method, path) == ("POST", "/v1/load_lora_adapter"):
            name, lpath = body["lora_name"], body["lora_path"]
            if name in self.loras:
                return vllm_error(400, f"The lora adapter '{name}' has already been loaded. If you want to load the adapter in place, set 'load_inplace' to True.", "InvalidUserInput")
            if not (Path(lpath) / "adapter_config.json").is_file():
                return vllm_error(404, f"Loading lora {name} failed: No adapter found for {lpath}", "NotFoundError")
            self.loras[name] = lpath
            return 200, f"Success: LoRA adapter '{name}' added successfully."
        if (method, path) == ("POST", "/v1/unload_lora_adapter"):
            if body["lora_name"] not in self.loras:
                return vllm_error(404, f"The lora adapter '{body['lora_name']}' cannot be found.", "NotFoundError")
            del self.loras[body["lora_name"]]
            return 200, f"Success: LoRA adapter '{body['lora_name']}' removed successfully."
        if (method, path) == ("POST", "/v1/completions"):
            return self.completions(body)
        return 404, {"detail": "Not Found"}

    def completions(self, body: dict) -> tuple[int, object]:
        unknown = set(body) - COMPLETION_FIELDS
        if unknown:
            return vllm_error(400, f"not CompletionRequest fields: {sorted(unknown)}", "BadRequestError")
        if any(body.get(k, v) != v for k, v in NEUTRAL.items()):
            return vllm_error(400, "the stand-in computes neutral penalties only", "BadRequestError")
        if body.get("model") not in (self.model, *self.loras):
            return vllm_error(404, f"The model `{body.get('model')}` does not exist.", "NotFoundError")
        prompt = body["prompt"]
        if not (isinstance(prompt, list) and prompt and all(isinstance(t, int) and t >= 0 for t in prompt)):
            return vllm_error(400, "prompt must be a list of token ids here", "BadRequestError")
        if len(prompt) + body.get("max_tokens", 16) > self.max_model_len:
            return vllm_error(400, f"This model's maximum context length is {self.max_model_len} tokens.", "BadRequestError")
        keys = set(FakeSamplingParams.DEFAULTS) - {"stop"}
        sp = FakeSamplingParams(**{k: body[k] for k in keys if k in body}, stop=body.get("stop") or None)
        with self.lock:
            out = self.llm.generate([{"prompt_token_ids": prompt}], [sp], use_tqdm=False)[0]
        choices = []
        for comp in sorted(out.outputs, key=lambda c: c.index):
            if self.script:
                ids, finish, reason = self.script.pop(0)
                lps = [-0.5] * len(ids)
            else:
                ids, finish, reason = comp.token_ids, comp.finish_reason, comp.stop_reason
                lps = [e[t].logprob for t, e in zip(ids, comp.logprobs)]
            choice = {"index": comp.index, "text": self.tokenizer.decode(ids, skip_special_tokens=True), "finish_reason": finish, "stop_reason": reason}
            if body.get("logprobs") is not None:
                as_ids = body.get("return_tokens_as_token_ids")
                choice["logprobs"] = {
                    "text_offset": list(range(len(ids))), "token_logprobs": lps, "top_logprobs": [{f"token_id:{t}" if as_ids else str(t): lp} for t, lp in zip(ids, lps)],
                    "tokens": [f"token_id:{t}" if as_ids else self.tokenizer.decode([t]) for t in ids],
                }  # fmt: skip
            if body.get("return_token_ids"):
                choice["token_ids"], choice["prompt_token_ids"] = list(ids), list(prompt)
            if out.prompt_logprobs is not None:
                entry = lambda e: {str(t): {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": self.tokenizer.decode([t])} for t, lp in e.items()}  # JSON: int keys -> strings
                choice["prompt_logprobs"] = [None if e is None else entry(e) for e in out.prompt_logprobs]
            choices.append(choice)
        return 200, {"id": "cmpl-1", "object": "text_completion", "created": int(time.time()), "model": body["model"], "choices": choices, "usage": {}}


@pytest.fixture
def server(tiny_model):
    model, tok = tiny_model
    s = StandInVLLM(FakeLLM(model, tok), tok)
    yield s
    s.close()


@pytest.fixture
def engine(server, tiny_model):
    eng = OpenAIEngine(server.url, tiny_model[1], token=TOKEN, max_concurrency=4)
    eng.check_ready()
    return eng


def write_adapter(path: Path, payload: bytes = b"weights-v1") -> str:
    """A directory with the PEFT adapter file names (the stand-in, like vLLM, only needs the path)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text('{"r": 4}')
    (path / "adapter_model.safetensors").write_bytes(payload)
    return adapter_sha256(path)


# ---- generation: the same chains as the other engines ----------------------------------------------


def test_greedy_chains_equal_the_hf_engine(engine, hf, server):
    reqs = [ThoughtRequest(tuple(p), n=1) for p in prompts(hf, 6)]
    for limits in (LIMITS, TIGHT):
        assert_same(engine.generate_thoughts(reqs, limits, GREEDY), hf.generate_thoughts(reqs, limits, GREEDY))
    bodies = [r["body"] for r in server.calls("/v1/completions")]
    assert bodies and all(r["auth"] == f"Bearer {TOKEN}" for r in server.requests if r["path"].startswith("/v1"))
    for b in bodies:  # token ids in, one thought per call, ids back as "token_id:N"
        assert isinstance(b["prompt"], list) and all(isinstance(t, int) for t in b["prompt"])
        assert b["stop"] == ["</thought>"] and b["include_stop_str_in_output"] is True and b["skip_special_tokens"] is True
        assert b["logprobs"] == 0 and b["return_tokens_as_token_ids"] is True and b["temperature"] == 0.0 and "seed" not in b


def test_sampled_chains_and_seeds_equal_the_in_process_vllm_engine(engine, hf, server, tiny_model):
    """Same seeds per call as VLLMEngine: n=G for a shared prefix (children seed + i), then each
    chain alone with derive_seed(seed, request, chain + 1, thought)."""
    ps = prompts(hf, 3)
    seeds = [g[0] for g in hf.generate_thoughts([ThoughtRequest(tuple(p)) for p in ps], LIMITS, GREEDY)]
    reqs = [ThoughtRequest(tuple(p), n=4, prefix_ids=tuple(s.response_ids[: s.spans[1][1]]), prefix_spans=tuple(s.spans[:2])) for p, s in zip(ps, seeds)]
    sampling = SamplingParams(temperature=1.5, top_p=0.9, top_k=20, seed=7)
    limits = ThoughtLimits(max_thoughts=6, max_thought_tokens=8, max_response_tokens=60, max_model_len=512)
    server.requests.clear()
    got = engine.generate_thoughts(reqs, limits, sampling)
    model, tok = tiny_model
    assert_same(got, VLLMEngine(llm=FakeLLM(model, tok), api=FAKE_API).generate_thoughts(reqs, limits, sampling), lp_tol=1e-5)
    assert len({tuple(r.response_ids) for r in got[0]}) > 1, "the n children of a request must differ"
    bodies = [r["body"] for r in server.calls("/v1/completions")]
    first = [b for b in bodies if b["n"] == 4]
    assert sorted(b["seed"] for b in first) == sorted(derive_seed(7, i, 0, 0) for i in range(len(reqs)))
    assert sorted(len(b["prompt"]) for b in first) == sorted(len(r.prompt_ids) + len(r.prefix_ids) for r in reqs)
    assert all((b["temperature"], b["top_p"], b["top_k"], b["max_tokens"]) == (1.5, 0.9, 20, 8) for b in bodies)
    later = [b["seed"] for b in bodies if b["n"] == 1]
    candidates = {derive_seed(7, i, j + 1, t) for i in range(len(reqs)) for j in range(4) for t in range(1, limits.max_thoughts + 1)}
    assert later and set(later) <= candidates and len(set(later)) == len(later), "each chain's later thoughts: derive_seed(seed, request, chain + 1, thought)"
    in_process = VLLMEngine(llm=FakeLLM(model, tok), api=FAKE_API)
    in_process.generate_thoughts(reqs, limits, sampling)
    assert sorted(b["seed"] for b in bodies) == sorted(sp.seed for call in in_process.llm.calls for _, sp in call)
    again = engine.generate_thoughts(reqs, limits, sampling)
    assert [r.response_ids for g in again for r in g] == [r.response_ids for g in got for r in g]


def test_complete_and_teacher_force_from_prompt_logprobs_equal_the_hf_engine(engine, hf, server):
    ps = prompts(hf, 3)
    for a, b in zip(engine.complete(ps, 8, GREEDY), hf.complete(ps, 8, GREEDY), strict=True):
        assert (a.ids, a.text, a.finish_reason) == (b.ids, b.text, b.finish_reason)
    flat = [g[0] for g in hf.generate_thoughts([ThoughtRequest(tuple(p)) for p in ps], LIMITS, GREEDY)]
    server.requests.clear()
    got = engine.teacher_force([r.prompt_ids for r in flat], [r.response_ids for r in flat])
    for a, b in zip(got, hf.teacher_force([r.prompt_ids for r in flat], [r.response_ids for r in flat]), strict=True):
        assert a.greedy_ids == b.greedy_ids and a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    assert all(r["body"]["prompt_logprobs"] == 1 and r["body"]["max_tokens"] == 1 for r in server.calls("/v1/completions"))
    with pytest.raises(NotImplementedError, match="temperature 1.0"):
        engine.teacher_force([flat[0].prompt_ids], [flat[0].response_ids], 0.7)


def test_stop_string_thoughts_and_eos_are_read_from_finish_and_stop_reason(engine, server, tiny_model):
    """vLLM: finish "stop" + stop_reason "</thought>" ends a thought; finish "stop" + stop_reason
    null is an EOS token, which ends the chain and is dropped; "length" cuts a thought."""
    tok = tiny_model[1]
    thought = tok.encode("1+2=3</thought>", add_special_tokens=False)
    cut = tok.encode("3*3=9", add_special_tokens=False)[:3]
    tail = tok.encode("9-1", add_special_tokens=False) + [tok.eos_token_id]
    server.script = [(thought, "stop", "</thought>"), (cut, "length", None), (tail, "stop", None)]
    limits = ThoughtLimits(max_thoughts=10, max_thought_tokens=max(len(thought), len(tail)), max_response_tokens=64, max_model_len=512)
    engine.adapter_version = "base"
    ((r,),) = engine.generate_thoughts([ThoughtRequest((5, 6))], limits, GREEDY)
    assert_scripted_chain(r, [thought, cut, tail], tok, "base")
    assert r.thoughts[0] == "1+2=3</thought>"


# ---- adapters: a name holds its content ------------------------------------------------------------------


def test_adapters_load_under_a_name_holding_their_hash_and_are_never_reloaded(engine, server, tmp_path, tiny_model, hf):
    sha = write_adapter(tmp_path / "a1")
    name = adapter_name("step-1", sha)
    assert re.fullmatch(r"step-1-sha256-[0-9a-f]{32}", name) and name.endswith(sha[:32])
    out = engine.load_adapter(tmp_path / "a1", "step-1", sha)
    assert out["loaded"] and server.calls("/v1/load_lora_adapter")[-1]["body"] == {"lora_name": name, "lora_path": str((tmp_path / "a1").resolve())}
    assert engine.adapters() == {name: str((tmp_path / "a1").resolve())}
    engine.generate_thoughts([ThoughtRequest(tuple(prompts(hf, 1)[0]))], TIGHT, GREEDY)
    assert {r["body"]["model"] for r in server.calls("/v1/completions")} == {name}, "every call names the adapter"
    # another client (another phase) with the same adapter: no second load
    other = OpenAIEngine(server.url, tiny_model[1], token=TOKEN)
    assert other.load_adapter(tmp_path / "a1", "step-1", sha)["loaded"] is False and len(server.calls("/v1/load_lora_adapter")) == 1
    # other content under the same version is refused before anything is sent
    with pytest.raises(AdapterVersionError, match="refusing to load other content"):
        other.load_adapter(tmp_path / "a1", "step-1", "0" * 64)
    sha2 = write_adapter(tmp_path / "a1", b"weights-v2")  # rewritten in place: a new content, a new name
    assert other.load_adapter(tmp_path / "a1", "step-1", sha2)["name"] == adapter_name("step-1", sha2) != name
    # the weight-sync canary runs against it: the teacher-forced log-probs are the learner's
    from srpo_core.server.canary import StaleAdapterError, canary_check

    assert canary_check(engine, hf, "step-1", expected_sha256=sha).max_abs_diff < 1e-4
    with pytest.raises(StaleAdapterError, match="does not serve"):
        canary_check(engine, hf, "step-9", expected_sha256=sha)
    # unloaded behind this client's back (or a restarted server): a 404 names the fix, never the base model's samples
    engine.unload_adapter("step-1", sha)
    engine.served_model = name
    with pytest.raises(AdapterVersionError, match="no longer serves adapter .*load it again"):
        engine.complete([[5, 6]], 2, GREEDY)
    with pytest.raises(AdapterVersionError, match="does not serve"):
        engine.check_ready()


def test_adapter_routes_need_runtime_lora_updating(tiny_model, tmp_path):
    model, tok = tiny_model
    server = StandInVLLM(FakeLLM(model, tok), tok, runtime_lora=False)
    try:
        eng = OpenAIEngine(server.url, tok, token=TOKEN)
        with pytest.raises(RemoteEngineError, match="VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"):
            eng.load_adapter(tmp_path / "a", "step-1", write_adapter(tmp_path / "a"))
    finally:
        server.close()


# ---- errors a user can act on --------------------------------------------------------------------------


def test_auth_errors_name_the_fix_and_never_the_token(server, tiny_model, monkeypatch):
    monkeypatch.delenv("SRPO_SERVER_TOKEN", raising=False)
    monkeypatch.delenv("SRPO_SERVER_TOKEN_FILE", raising=False)
    tok = tiny_model[1]
    with pytest.raises(ServerAuthError, match=r"HTTP 401.*no token given.*SRPO_SERVER_TOKEN"):
        OpenAIEngine(server.url, tok).check_ready()
    wrong = OpenAIEngine(server.url, tok, token="not-the-key-but-long-enough")
    with pytest.raises(ServerAuthError, match="not the server's --api-key") as info:
        wrong.check_ready()
    assert "not-the-key" not in str(info.value) and "not-the-key" not in repr(wrong)
    monkeypatch.setenv("SRPO_SERVER_TOKEN", TOKEN)  # the phases' way: the environment
    assert OpenAIEngine(server.url, tok).check_ready()["model"] == "tiny-arith"
    assert server.requests[-2]["auth"] == f"Bearer {TOKEN}"  # GET /v1/models (then POST /tokenize)


def test_server_errors_unreachable_and_mismatched_servers(engine, server, tiny_model):
    server.fail["/v1/completions"] = vllm_error(500, "CUDA error: an illegal memory access was encountered", "InternalServerError")
    with pytest.raises(RemoteEngineError, match=r"POST /v1/completions -> HTTP 500: CUDA error") as info:
        engine.complete([[5, 6]], 2, GREEDY)
    assert info.value.status == 500
    server.fail["/v1/completions"] = (503, {"object": "error", "message": "engine is starting", "type": "ServiceUnavailable", "code": 503})  # older vLLM's body
    with pytest.raises(ServerNotReadyError, match="engine is starting"):
        engine.complete([[5, 6]], 2, GREEDY)
    with pytest.raises(ValueError, match=r"model.max_model_len=4096 exceeds the vLLM server's max_model_len=512"):
        engine.generate_thoughts([ThoughtRequest((5, 6))], ThoughtLimits(max_model_len=4096), GREEDY)
    url = server.url
    server.close()
    with pytest.raises(ServerUnreachableError, match=f"vLLM server at {url} is unreachable"):
        OpenAIEngine(url, tiny_model[1], token=TOKEN, connect_timeout=2).check_ready()


def test_another_model_behind_the_url_is_refused(tiny_model):
    model, tok = tiny_model

    class OtherTokenizer:
        def encode(self, text, add_special_tokens=True):
            return [1, 2, 3]

    server = StandInVLLM(FakeLLM(model, tok), OtherTokenizer())
    try:
        with pytest.raises(RemoteEngineError, match="tokenizes differently.*model.name_or_path must name the model the server serves"):
            OpenAIEngine(server.url, tok, token=TOKEN).check_ready()
    finally:
        server.close()


# ---- the config choice and the flow's wiring ----------------------------------------------------------


def test_config_choice_and_its_errors():
    cfg = load_config("tiny").override(**{"rollout.engine": "openai", "rollout.server_url": "http://vllm:8000", "rollout.lora_dir": "/shared/adapters"})
    assert cfg.rollout.engine == "openai"
    for url in ("", "auto"):
        with pytest.raises(ConfigError, match=r"rollout.server_url: rollout.engine openai talks to a running `vllm serve --enable-lora`.*http\(s\)://"):
            load_config("tiny").override(**{"rollout.engine": "openai", "rollout.server_url": url})
    with pytest.raises(ConfigError, match="rollout.lora_dir: must be an absolute path"):
        cfg.override(**{"rollout.lora_dir": "relative/dir"})
    with pytest.raises(ConfigError, match="rollout.lora_dir: is used only with rollout.engine openai"):
        load_config("tiny").override(**{"rollout.lora_dir": "/shared/adapters"})
    with pytest.raises(ConfigError, match="rollout.engine: hf|vllm|openai"):
        load_config("tiny").override(**{"rollout.engine": "openai-compatible"})


def test_flow_phases_stage_verify_and_pin_the_step_adapter(server, tiny_model, tmp_path, monkeypatch):
    """load_engine with rollout.engine openai: the checkpoint's adapter is fetched from the store,
    checked against its manifest, staged into rollout.lora_dir under its name, and loaded there."""
    from srpo_core.flow_phases import StepContext, load_engine, staged_adapter

    monkeypatch.setenv("SRPO_SERVER_TOKEN", TOKEN)
    store = S.LocalStore((tmp_path / "store").resolve())
    out = tmp_path / "ckpt"
    sha = write_adapter(out / "adapter")
    (out / "adapter.sha256").write_text(sha + "\n")
    (out / "optimizer.pt").write_bytes(b"large state the server never needs")
    S.save_step(store, "t-openai", 0, out, config={"a": 1})
    lora_dir = tmp_path / "lora"
    cfg = load_config("tiny").override(**{"rollout.engine": "openai", "rollout.server_url": server.url, "rollout.lora_dir": str(lora_dir)})
    ctx = StepContext(cfg.to_dict(), "t-openai", 1, "run-1", str(store.root), 0, server_url=server.url)
    engine = load_engine(ctx)
    name = adapter_name("step-1", sha)
    assert engine.served_model == name and engine.adapter_version == "step-1"
    staged = lora_dir / name
    assert server.loras == {name: str(staged)} and sorted(p.name for p in staged.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert adapter_sha256(staged) == sha and staged.stat().st_mode & 0o777 == 0o755
    load_engine(ctx)  # a second phase: staged once, loaded once
    assert len(server.calls("/v1/load_lora_adapter")) == 1
    (staged / "adapter_model.safetensors").write_bytes(b"tampered")
    with pytest.raises(S.CheckpointIntegrityError, match="names in rollout.lora_dir stand for one content"):
        staged_adapter(ctx, 0)
    # without rollout.lora_dir a local store's adapter directory is read in place
    plain = StepContext(cfg.override(**{"rollout.lora_dir": ""}).to_dict(), "t-openai", 1, "run-1", str(store.root), 0, server_url=server.url)
    assert staged_adapter(plain, 0) == store.root / S.adapter_key("t-openai", 0)
    first = StepContext(plain.config, "t-openai", 0, "run-0", str(store.root), None, server_url=server.url)  # epoch step 0: the base model
    base = load_engine(first)
    assert base.served_model == "tiny-arith" and base.adapter_version == "base"


def test_the_plain_loop_samples_through_the_vllm_server_and_loads_each_update(server, tiny_model_path, tmp_path, monkeypatch):
    """`srpo train` (loop.py) with rollout.engine openai: the session's engine is the server, and
    after an update the learner's adapter is saved under rollout.lora_dir and loaded there."""
    from srpo_core.loop import open_session

    monkeypatch.setenv("SRPO_SERVER_TOKEN", TOKEN)
    cfg = load_config("tiny").override(
        **{"model.name_or_path": tiny_model_path, "rollout.engine": "openai", "rollout.server_url": server.url, "rollout.lora_dir": str(tmp_path / "lora"), "rollout.scheduler": "batched"}
    )
    session = open_session(cfg)
    assert isinstance(session.engine, OpenAIEngine) and session.engine.served_model == "tiny-arith"
    session.sync_policy("step-1")
    ((name, path),) = server.loras.items()
    assert session.engine.served_model == name and name.startswith("step-1-sha256-") and Path(path).parent == tmp_path / "lora"
    assert adapter_sha256(path) == session.engine.adapter_sha256 and session.engine.adapter_version == "step-1"

"""The inference server end to end on the tiny model (CPU): a real `python -m srpo_core.server`
subprocess, adapters hot-loaded from a local dir and from S3 (moto), greedy rollouts equal to the
in-process HF engine with the same adapter, version pinning (409 for versions not held), the
weight-sync canary catching a stale adapter, health/ready, and an unreachable server failing fast.

Hardening (issue 16, findings 2, 6, 8): the bearer token, adapters only from under the artifact
root (with size caps, the expected sha256 and the step manifest), calls pinned by hash, request
limits, token-range checks and /ready after a device error. The fast ones run an in-process server
over a stub backend; `AdapterSource` is tested directly against a local root and moto."""

from __future__ import annotations

import contextlib
import json
import shutil
import threading
import time
import urllib.error
import urllib.request
import uuid
from http.client import HTTPConnection
from pathlib import Path

import pytest
import torch

from srpo_core import step, templates
from srpo_core.config import load_config
from srpo_core.engine.base import SamplingParams, ThoughtLimits, ThoughtRequest
from srpo_core.engine.remote import AdapterVersionError, RemoteEngine, RemoteEngineError, ServerNotReadyError, ServerUnreachableError
from srpo_core.learner import TrainSequence
from srpo_core.loop import open_session
from srpo_core.server import StaleAdapterError, adapter_sha256, canary_check, start_server
from srpo_core.server.launch import ServerStartError
from srpo_core.tasks import get_task, synthetic
from tests.conftest_servers import free_port

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

GREEDY = SamplingParams(temperature=0.0)
LIMITS = ThoughtLimits(max_thoughts=20, max_thought_tokens=16, max_response_tokens=256, max_model_len=512)
TIGHT = ThoughtLimits(max_thoughts=5, max_thought_tokens=5, max_response_tokens=40, max_model_len=512)


def prompts(engine, n, seed=3):
    return [engine.encode(templates.rollout_prompt("tiny_rollout_v1", p.question)) for p in synthetic.make_split("test", n, seed)]


def http(method: str, url: str, body: dict | None = None, token: str | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(), method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def learner_step(session, seed: int) -> None:
    """One optimizer step on sampled chains with alternating advantages (moves every LoRA matrix)."""
    ps = prompts(session.engine, 4, seed)
    out = session.engine.generate_thoughts([ThoughtRequest(tuple(p), n=2) for p in ps], LIMITS, SamplingParams(temperature=1.0, seed=seed))
    seqs = [TrainSequence(r.prompt_ids, r.response_ids, 0, 1.0 if k % 2 else -1.0, r.logprobs, i) for i, g in enumerate(out) for k, r in enumerate(g)]
    assert session.learner.update(seqs, 8, 16)["learner/optimizer_steps"] == 1


def reference_engine(model_path: str, adapter_dir, version: str):
    """The in-process HF engine over base + the same adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from srpo_core.engine.hf import HFEngine
    from srpo_core.runtime import load_tokenizer

    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval() if adapter_dir else base.eval()
    return HFEngine(model, load_tokenizer(model_path), adapter_version=version)


@pytest.fixture(scope="module")
def session(tiny_model_path):
    cfg = load_config("tiny", {"model.name_or_path": tiny_model_path, "method.localizer": "oracle"})
    return open_session(cfg)


@pytest.fixture(scope="module")
def adapters(session, tmp_path_factory):
    """Two adapter versions one learner step apart, saved in PEFT format."""
    d = tmp_path_factory.mktemp("adapters")
    learner_step(session, 1)
    v1 = session.learner.save_adapter(d / "v1")
    learner_step(session, 2)
    v2 = session.learner.save_adapter(d / "v2")
    return {"v1": v1, "v2": v2}


@pytest.fixture(scope="module")
def module_bucket(s3_server):
    import boto3

    name = f"srpo-server-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def server(tiny_model_path, s3_server, module_bucket, tmp_path_factory):
    # s3_server first: the subprocess inherits its endpoint and dummy credentials. Artifact roots:
    # this session's temp directory (every adapter the tests save) and one S3 prefix.
    roots = [str(tmp_path_factory.getbasetemp()), f"s3://{module_bucket}/srpo"]
    handle = start_server(tiny_model_path, threads=1, max_adapters=2, workdir=tmp_path_factory.mktemp("server"), ready_timeout=300, env={"SRPO_S3_ENDPOINT_URL": s3_server}, artifact_roots=roots)
    yield handle
    code = handle.stop()
    assert code == 0, f"server exited with {code}:\n{handle.log_tail()}"


# ---- health, readiness, reachability ---------------------------------------------------------------

def test_health_and_ready(server):
    assert http("GET", server.url + "/health") == (200, {"status": "alive"})
    status, info = http("GET", server.url + "/ready", token=server.token)
    assert status == 200 and info["ready"] is True
    assert info["engine"] == "hf" and info["dtype"] == "float32" and "base" in info["versions"]
    assert server.engine().check_ready()["ready"] is True
    status, body = http("POST", server.url + "/nope", {}, token=server.token)
    assert status == 404 and "/generate_thoughts" in body["error"]
    status, body = http("POST", server.url + "/generate_thoughts", {"requests": [{"prompt_ids": "x"}]}, token=server.token)
    assert status == 400 and "prompt_ids" in body["error"]
    for length in ("ten", "-1"):  # a malformed length is the client's error, and never blocks a read
        conn = HTTPConnection(server.url.split("//")[1], timeout=30)
        conn.putrequest("POST", "/encode")
        conn.putheader("Authorization", f"Bearer {server.token}")
        conn.putheader("Content-Length", length)
        conn.endheaders()
        resp = conn.getresponse()
        assert resp.status == 400 and "Content-Length" in json.loads(resp.read())["error"]
        conn.close()


def test_ready_is_503_until_the_model_is_loaded():
    """In-process server whose model load is held back: alive but not ready, model calls refused."""
    from srpo_core.server.app import Backend, InferenceServer, ModelHost
    from tests.scripted_engine import ScriptedEngine

    release = threading.Event()

    class Stub(Backend):
        vocab_size = 100

        def __init__(self):
            self.engine = ScriptedEngine({}, {})

        def load_adapter(self, name, path): ...
        def delete_adapter(self, name): ...

        def select(self, name, version):
            import contextlib

            return contextlib.nullcontext(self.engine)

    def factory():
        release.wait(30)
        return Stub()

    host = ModelHost(factory, "stub-model")
    srv = InferenceServer(host, ("127.0.0.1", 0)).start()
    try:
        eng = RemoteEngine(srv.url)
        loader = threading.Thread(target=host.load_model)
        loader.start()
        assert eng.health() == {"status": "alive"}
        status, info = http("GET", srv.url + "/ready")
        assert status == 503 and info["ready"] is False
        with pytest.raises(ServerNotReadyError, match="not loaded"):
            eng.check_ready()
        with pytest.raises(ServerNotReadyError):
            eng.encode("Q:1+2|")
        release.set()
        loader.join(30)
        assert eng.check_ready()["ready"] is True
        assert eng.encode("Q:1+2|") == ScriptedEngine({}, {}).encode("Q:1+2|")
    finally:
        release.set()
        srv.stop()
        host.close()


def test_unreachable_server_fails_fast_with_the_url():
    url = f"http://127.0.0.1:{free_port()}"
    eng = RemoteEngine(url, adapter_version="v1")
    t0 = time.monotonic()
    with pytest.raises(ServerUnreachableError) as err:
        eng.check_ready()
    assert time.monotonic() - t0 < 5.0
    assert url in str(err.value) and isinstance(err.value, ConnectionError)
    with pytest.raises(ServerUnreachableError, match=url.replace(".", r"\.")):
        eng.generate_thoughts([ThoughtRequest((1, 2, 3))], LIMITS, GREEDY)


def test_start_server_reports_a_failed_start(tmp_path):
    with pytest.raises(ServerStartError, match="exited with code 1") as err:
        start_server(str(tmp_path / "no-such-model"), workdir=tmp_path / "srv", ready_timeout=120)
    assert "startup failed" in str(err.value)  # the log tail is in the message


# ---- the protocol end to end ----------------------------------------------------------------------------

def assert_same_rollouts(got, want, version):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert len(g) == len(w)
        for a, b in zip(g, w):
            assert a.response_ids == b.response_ids and a.prompt_ids == b.prompt_ids
            assert a.spans == b.spans and a.thoughts == b.thoughts and a.text == b.text
            assert a.finish_reason == b.finish_reason and a.prefix_len == b.prefix_len
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
            assert a.adapter_version == version


def test_greedy_rollouts_equal_in_process_engine_with_the_same_adapter(server, adapters, tiny_model_path):
    remote = server.engine()
    loaded = remote.load_adapter(str(adapters["v1"]), "eq-v1", adapter_sha256(adapters["v1"]))
    assert loaded["sha256"] == adapter_sha256(adapters["v1"]) and remote.adapter_version == "eq-v1"
    ref = reference_engine(tiny_model_path, adapters["v1"], "eq-v1")
    ps = prompts(ref, 8)
    assert [remote.encode(t) for t in ("Q:7*3-2|", "</thought>")] == [ref.encode(t) for t in ("Q:7*3-2|", "</thought>")]
    assert remote.decode(ps[0]) == ref.decode(ps[0])

    reqs = [ThoughtRequest(tuple(p), n=1) for p in ps]
    for limits in (LIMITS, TIGHT):
        assert_same_rollouts(remote.generate_thoughts(reqs, limits, GREEDY), ref.generate_thoughts(reqs, limits, GREEDY), "eq-v1")
    # shared-prefix suffixes (reset states) and sampled chains: same seed, same model -> same chains
    seeds = [g[0] for g in ref.generate_thoughts(reqs[:4], LIMITS, GREEDY)]
    resets = [ThoughtRequest(tuple(s.prompt_ids), n=3, prefix_ids=tuple(s.response_ids[: s.spans[0][1]]), prefix_spans=tuple(s.spans[:1])) for s in seeds]
    assert_same_rollouts(remote.generate_thoughts(resets, LIMITS, GREEDY), ref.generate_thoughts(resets, LIMITS, GREEDY), "eq-v1")
    sampled = SamplingParams(temperature=1.0, seed=7)
    assert_same_rollouts(remote.generate_thoughts(resets, LIMITS, sampled), ref.generate_thoughts(resets, LIMITS, sampled), "eq-v1")

    comp_r, comp_l = remote.complete(ps[:3], 8, GREEDY), ref.complete(ps[:3], 8, GREEDY)
    assert [(c.ids, c.text, c.finish_reason, c.adapter_version) for c in comp_r] == [(c.ids, c.text, c.finish_reason, "eq-v1") for c in comp_l]
    flat = [r for g in ref.generate_thoughts(reqs[:3], LIMITS, GREEDY) for r in g]
    sc_r = remote.teacher_force([r.prompt_ids for r in flat], [r.response_ids for r in flat], 0.7)
    sc_l = ref.teacher_force([r.prompt_ids for r in flat], [r.response_ids for r in flat], 0.7)
    for a, b in zip(sc_r, sc_l):
        assert a.greedy_ids == b.greedy_ids and a.logprobs == pytest.approx(b.logprobs, abs=1e-5)

    # the adapter is really applied: the base version scores the same chains differently
    base = server.engine("base").teacher_force([r.prompt_ids for r in flat], [r.response_ids for r in flat], 0.7)
    assert max(abs(x - y) for a, b in zip(base, sc_l) for x, y in zip(a.logprobs, b.logprobs)) > 1e-3


def test_rollout_phases_through_the_server_equal_in_process(server, adapters, tiny_model_path):
    """The pipeline's phases (seed search, localization, suffixes) run unchanged on a RemoteEngine."""
    cfg = load_config("tiny", {"model.name_or_path": tiny_model_path, "method.localizer": "oracle"})
    task = get_task("synthetic")
    items = task.items("train", 4, 0)
    remote = server.engine()
    remote.load_adapter(str(adapters["v2"]), "ph-v2", adapter_sha256(adapters["v2"]))
    ref = reference_engine(tiny_model_path, adapters["v2"], "ph-v2")
    got = step.run_rollout_phases(remote, task, cfg, items, step=0)
    want = step.run_rollout_phases(ref, task, cfg, items, step=0)
    key = lambda res: [(r.group_id, r.rollout.response_ids, r.rollout.spans, r.reward, r.rollout.adapter_version) for r in res.records]
    assert key(got) == key(want) and got.records
    assert {r.rollout.adapter_version for r in got.records} == {"ph-v2"}


# ---- versions --------------------------------------------------------------------------------------------

def test_a_version_the_server_does_not_hold_is_refused(server, adapters):
    server.engine().load_adapter(str(adapters["v1"]), "held-v1", adapter_sha256(adapters["v1"]))
    stranger = server.engine(adapter_version="never-loaded")
    with pytest.raises(AdapterVersionError) as err:
        stranger.generate_thoughts([ThoughtRequest((5, 6, 7))], LIMITS, GREEDY)
    assert err.value.status == 409 and "never-loaded" in str(err.value) and server.url in str(err.value)
    for path, body in (("/teacher_force", {"prompts": [[5]], "responses": [[6]]}), ("/complete", {"prompts": [[5]], "max_tokens": 2, "sampling": {}})):
        status, out = http("POST", server.url + path, {**body, "adapter_version": "never-loaded"}, token=server.token)
        assert status == 409 and "never-loaded" in out["error"] and "results" not in out
    with pytest.raises(AdapterVersionError):
        stranger.check_ready()


def test_versions_are_pinned_immutable_and_bounded(server, adapters, tiny_model_path):
    eng = server.engine()
    eng.load_adapter(str(adapters["v1"]), "pin-1", adapter_sha256(adapters["v1"]))
    eng.load_adapter(str(adapters["v2"]), "pin-2", adapter_sha256(adapters["v2"]))
    seq_p, seq_r = [5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15]
    want = {v: reference_engine(tiny_model_path, adapters[d], v).teacher_force([seq_p], [seq_r])[0].logprobs for v, d in (("pin-1", "v1"), ("pin-2", "v2"))}
    for version in ("pin-1", "pin-2"):  # both held: each request gets exactly the version it names
        status, out = http("POST", server.url + "/teacher_force", {"prompts": [seq_p], "responses": [seq_r], "adapter_version": version}, token=server.token)
        assert status == 200 and out["adapter_version"] == version
        assert out["results"][0]["logprobs"] == pytest.approx(want[version], abs=1e-5)
        assert server.engine(version).generate_thoughts([ThoughtRequest(tuple(seq_p))], TIGHT, GREEDY)[0][0].adapter_version == version
    status, out = http("POST", server.url + "/teacher_force", {"prompts": [seq_p], "responses": [seq_r]}, token=server.token)
    assert out["adapter_version"] == "pin-2"  # null -> the active (last loaded) version, and it says so

    with pytest.raises(AdapterVersionError, match="immutable"):
        eng.load_adapter(str(adapters["v2"]), "pin-1", adapter_sha256(adapters["v2"]))
    assert eng.load_adapter(str(adapters["v1"]), "pin-1", adapter_sha256(adapters["v1"]))["already_loaded"] is True
    out = eng.load_adapter(str(adapters["v1"]), "pin-3", adapter_sha256(adapters["v1"]))  # max_adapters=2: the oldest non-active goes
    assert out["evicted"] == ["pin-1"]
    assert [a["version"] for a in eng.adapters()["adapters"]] == ["pin-2", "pin-3"]
    with pytest.raises(AdapterVersionError):
        server.engine("pin-1").teacher_force([seq_p], [seq_r])
    assert eng.unload_adapter("pin-3")["active"] == "pin-2"


def test_adapter_loads_from_s3(server, adapters, s3_server, module_bucket):
    from srpo_core.store import S3Store

    S3Store(module_bucket, endpoint_url=s3_server).put_dir("srpo/runs/t1/steps/000001/adapter", adapters["v1"])
    eng = server.engine()
    out = eng.load_adapter(f"s3://{module_bucket}/srpo/runs/t1/steps/000001/adapter", "s3-v1", adapter_sha256(adapters["v1"]))
    assert out["sha256"] == adapter_sha256(adapters["v1"])
    eng.load_adapter(str(adapters["v1"]), "local-v1", adapter_sha256(adapters["v1"]))
    seq = ([5, 6, 7, 8], [9, 10, 11, 12, 13])
    assert server.engine("s3-v1").teacher_force(*map(lambda x: [x], seq))[0].logprobs == server.engine("local-v1").teacher_force(*map(lambda x: [x], seq))[0].logprobs
    with pytest.raises(RemoteEngineError, match="nothing stored") as err:
        eng.load_adapter(f"s3://{module_bucket}/srpo/runs/t1/steps/000009/adapter", "s3-missing", adapter_sha256(adapters["v1"]))
    assert err.value.status == 400


# ---- the weight-sync canary -------------------------------------------------------------------------------

def test_canary_passes_in_sync_and_catches_a_stale_adapter(server, session, adapters, tmp_path):
    eng = server.engine()
    live_a = session.learner.save_adapter(tmp_path / "a")
    eng.load_adapter(str(live_a), "live-a", adapter_sha256(live_a))
    ok = canary_check(eng, session.learner, "live-a")
    assert ok.max_abs_diff <= 1e-4 and ok.tol == 1e-4 and ok.n_tokens > 0

    learner_step(session, 3)  # the learner moves on; the server is not reloaded
    with pytest.raises(StaleAdapterError, match="STALE ADAPTER") as err:
        canary_check(eng, session.learner, "live-a")
    assert err.value.max_abs_diff > 1e-3 and err.value.version == "live-a"

    saved = session.learner.save_adapter(tmp_path / "b")
    eng.load_adapter(str(saved), "live-b", adapter_sha256(saved))
    assert canary_check(eng, session.learner, "live-b", expected_sha256=adapter_sha256(saved)).max_abs_diff <= 1e-4

    # a broken sync: old weights uploaded under the new version name
    eng.load_adapter(str(adapters["v1"]), "mislabelled", adapter_sha256(adapters["v1"]))
    with pytest.raises(StaleAdapterError, match="STALE ADAPTER"):
        canary_check(eng, session.learner, "mislabelled")
    with pytest.raises(StaleAdapterError, match="sha256"):
        canary_check(eng, session.learner, "mislabelled", expected_sha256=adapter_sha256(saved))
    # a version the server never loaded
    with pytest.raises(StaleAdapterError, match="not held"):
        canary_check(eng, session.learner, "live-c")


# ---- hardening (issue 16): the token ------------------------------------------------------------------------

TOKEN = "t0ken-" + "x" * 40
MODEL_ROUTES = [("GET", "/adapters", None), ("POST", "/adapters/load", {"uri": "/x", "version": "v", "sha256": "0" * 64}),
                ("POST", "/adapters/unload", {"version": "v"}), ("POST", "/encode", {"texts": ["a"]}), ("POST", "/encode_chat", {"texts": ["a"]}),
                ("POST", "/decode", {"ids": [[1]]}), ("POST", "/generate_thoughts", {"requests": []}),
                ("POST", "/complete", {"prompts": [[1]], "max_tokens": 1}), ("POST", "/teacher_force", {"prompts": [[1]], "responses": [[2]]})]


class StubEngine:
    """What the stub backend serves: fixed scores, or the exception `fail` when set."""

    def __init__(self):
        from tests.scripted_engine import ScriptedEngine

        self.scripted = ScriptedEngine({}, {})
        self.fail: Exception | None = None
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self.scripted, name)

    def teacher_force(self, prompts, responses, temperature=1.0):
        from srpo_core.engine.base import TokenScores

        self.calls += 1
        if self.fail is not None:
            raise self.fail
        return [TokenScores([-0.5] * len(r), list(r)) for r in responses]


def stub_backend_class():
    import contextlib

    from srpo_core.server.app import Backend

    class StubBackend(Backend):
        vocab_size = 100

        def __init__(self):
            self.engine = StubEngine()
            self.loaded: dict[str, str] = {}

        def load_adapter(self, name, path):
            self.loaded[name] = path

        def delete_adapter(self, name):
            self.loaded.pop(name, None)

        def select(self, name, version):
            return contextlib.nullcontext(self.engine)

    return StubBackend


@pytest.fixture
def stub_server(tmp_path):
    """An in-process server over the stub backend: make(token=, limits=, roots=) -> (server, host)."""
    from srpo_core.server.adapters import AdapterSource
    from srpo_core.server.app import InferenceServer, ModelHost

    made = []

    def make(token=TOKEN, limits=None, roots=(), address="127.0.0.1"):
        from srpo_core.server.app import ServerLimits

        host = ModelHost(stub_backend_class(), "stub-model", cache_dir=str(tmp_path / f"cache{len(made)}"), adapter_source=AdapterSource(roots))
        host.load_model()
        srv = InferenceServer(host, (address, 0), token=token, limits=limits or ServerLimits()).start()
        made.append(srv)
        return srv, host

    yield make
    for srv in made:
        srv.stop()
        srv.host.close()


def test_every_endpoint_but_health_and_ready_needs_the_token(stub_server):
    srv, host = stub_server()
    wrong = "t0ken-" + "y" * 40  # same length: refused on content, not length
    for method, path, body in MODEL_ROUTES:
        for token in (None, wrong, TOKEN[:-1]):
            status, out = http(method, srv.url + path, body, token=token)
            assert status == 401 and "bearer token" in out["error"], (path, token)
    assert host.backend.engine.calls == 0 and host.backend.loaded == {}
    assert http("GET", srv.url + "/health") == (200, {"status": "alive"})
    assert http("GET", srv.url + "/ready") == (200, {"ready": True})  # probes: ready or not, nothing else
    status, info = http("GET", srv.url + "/ready", token=TOKEN)
    assert status == 200 and info["model"] == "stub-model" and "versions" in info
    status, out = http("POST", srv.url + "/teacher_force", {"prompts": [[1]], "responses": [[2, 3]]}, token=TOKEN)
    assert status == 200 and out["results"][0]["greedy_ids"] == [2, 3]

    from srpo_core.engine.remote import ServerAuthError

    with pytest.raises(ServerAuthError, match="401"):
        RemoteEngine(srv.url, token=wrong).teacher_force([[1]], [[2]])
    assert RemoteEngine(srv.url, token=TOKEN).teacher_force([[1]], [[2]])[0].greedy_ids == [2]
    assert TOKEN not in repr(RemoteEngine(srv.url, token=TOKEN))


def test_remote_engine_reads_the_token_from_the_environment(stub_server, tmp_path, monkeypatch):
    srv, _ = stub_server()
    monkeypatch.delenv("SRPO_SERVER_TOKEN", raising=False)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    monkeypatch.setenv("SRPO_SERVER_TOKEN_FILE", str(token_file))
    assert RemoteEngine(srv.url).encode_many(["Q:1|"])  # from the file
    monkeypatch.setenv("SRPO_SERVER_TOKEN", TOKEN)
    monkeypatch.setenv("SRPO_SERVER_TOKEN_FILE", str(tmp_path / "absent"))
    assert RemoteEngine(srv.url).encode_many(["Q:1|"])  # the variable wins


def test_server_refuses_an_open_bind_without_a_token_and_a_readable_token_file(tmp_path, monkeypatch):
    from srpo_core.server.app import main

    monkeypatch.delenv("SRPO_SERVER_TOKEN", raising=False)
    with pytest.raises(SystemExit, match="without a token"):
        main(["--model", str(tmp_path / "never-loaded"), "--host", "0.0.0.0", "--port", "0"])
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o644)
    with pytest.raises(SystemExit, match="chmod 600"):
        main(["--model", str(tmp_path / "never-loaded"), "--host", "0.0.0.0", "--port", "0", "--token-file", str(token_file)])
    token_file.chmod(0o600)
    token_file.write_text("short")
    with pytest.raises(SystemExit, match="at least 16"):
        main(["--model", str(tmp_path / "never-loaded"), "--host", "0.0.0.0", "--port", "0", "--token-file", str(token_file)])


def test_start_server_token_is_fresh_and_stays_out_of_argv_and_log(server):
    assert len(server.token) >= 40
    cmdline = Path(f"/proc/{server.process.pid}/cmdline").read_bytes().decode(errors="replace")
    assert server.token not in cmdline
    assert server.token not in server.log_path.read_text()
    environ = Path(f"/proc/{server.process.pid}/environ").read_bytes().decode(errors="replace")
    assert "SRPO_SERVER_TOKEN=" in environ  # the launch environment (/proc keeps it); the server popped it from os.environ
    with pytest.raises(RemoteEngineError) as err:
        RemoteEngine(server.url, token="not-the-token-of-this-start").adapters()
    assert err.value.status == 401 and server.token not in str(err.value)


# ---- hardening: adapters only from under the artifact root, with their hash -----------------------------------

def test_adapter_uris_outside_the_root_are_refused_alike(server, adapters, tmp_path_factory):
    eng = server.engine()
    outside = ["/etc", "/nonexistent/adapter", "/tmp/../etc", f"{adapters['v1']}/../../../../../etc", "file:///etc/ssl", "s3://other-bucket/x/adapter", "http://evil/adapter"]
    sha = adapter_sha256(adapters["v1"])
    messages = []
    for uri in outside:
        status, out = http("POST", server.url + "/adapters/load", {"uri": uri, "version": "evil", "sha256": sha}, token=server.token)
        assert status in (400, 403), (uri, status, out)
        messages.append(out["error"].replace(repr(uri), "URI"))
    assert len(set(messages[:-1])) == 1, "an existing and a missing path must be refused with the same message"
    # a symlink inside the root to an adapter outside it: the real path decides
    root = tmp_path_factory.getbasetemp()
    link = root / "escape-link"
    if not link.exists():
        link.symlink_to("/usr")
    status, out = http("POST", server.url + "/adapters/load", {"uri": str(link), "version": "evil", "sha256": sha}, token=server.token)
    assert status == 403 and out["error"].replace(repr(str(link)), "URI") == messages[0]
    assert "evil" not in eng.check_ready()["versions"]


def test_an_adapter_whose_hash_differs_from_the_request_is_not_loaded(server, adapters):
    eng = server.engine()
    before = eng.adapters()["adapters"]
    with pytest.raises(AdapterVersionError, match="expects"):
        eng.load_adapter(str(adapters["v1"]), "wrong-hash", adapter_sha256(adapters["v2"]))
    status, out = http("POST", server.url + "/adapters/load", {"uri": str(adapters["v1"]), "version": "no-hash"}, token=server.token)
    assert status == 400 and "sha256 is required" in out["error"]
    assert eng.adapters()["adapters"] == before


def test_model_calls_are_pinned_by_hash(server, adapters):
    eng = server.engine()
    eng.load_adapter(str(adapters["v1"]), "hash-pin", adapter_sha256(adapters["v1"]))
    assert eng.adapter_sha256 == adapter_sha256(adapters["v1"])
    assert eng.teacher_force([[5, 6]], [[7, 8]])[0].logprobs
    body = {"prompts": [[5, 6]], "responses": [[7, 8]], "adapter_version": "hash-pin"}
    status, out = http("POST", server.url + "/teacher_force", {**body, "adapter_sha256": adapter_sha256(adapters["v2"])}, token=server.token)
    assert status == 409 and "pinned" in out["error"] and "results" not in out
    status, out = http("POST", server.url + "/teacher_force", {**body, "adapter_sha256": adapter_sha256(adapters["v1"])}, token=server.token)
    assert status == 200


def test_adapter_from_a_step_checkpoint_is_verified_against_its_manifest(server, adapters, tmp_path):
    """A checkpoint saved by the store loads (manifest_verified); a corrupted or extra file is refused."""
    from srpo_core import store as S

    root = S.open_store(tmp_path / "art")
    step_dir = tmp_path / "step"
    shutil.copytree(adapters["v1"], step_dir / "adapter")
    S.save_step(root, "mtest", 0, step_dir, config={"a": 1})
    uri = f"{root.uri}/{S.step_prefix('mtest', 0)}/adapter"
    out = server.engine().load_adapter(uri, "manifest-ok", adapter_sha256(adapters["v1"]))
    assert out["manifest_verified"] is True
    weights = next(p for p in Path(uri).iterdir() if p.name.startswith("adapter_model"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(RemoteEngineError, match=f"corrupt: {weights.name}") as err:
        server.engine().load_adapter(uri, "manifest-bad", adapter_sha256(uri))  # even the matching request hash does not help
    assert err.value.status == 422
    weights.write_bytes(bytes(data[:-1]) + bytes([data[-1] ^ 1]))  # restored
    (Path(uri) / "extra.bin").write_bytes(b"x")
    with pytest.raises(RemoteEngineError, match="not in the manifest: extra.bin"):
        server.engine().load_adapter(uri, "manifest-extra", adapter_sha256(adapters["v1"]))


def test_s3_adapters_are_size_capped_before_and_while_downloading(s3_server, s3_bucket, adapters, tmp_path, monkeypatch):
    from srpo_core.server.adapters import AdapterRefused, AdapterSource, FetchLimits
    from srpo_core.store import S3Store

    monkeypatch.setenv("SRPO_S3_ENDPOINT_URL", s3_server)
    S3Store(s3_bucket, endpoint_url=s3_server).put_dir("srpo/a/adapter", adapters["v1"])
    size = sum(p.stat().st_size for p in Path(adapters["v1"]).iterdir())
    uri = f"s3://{s3_bucket}/srpo/a/adapter"
    ok = AdapterSource([f"s3://{s3_bucket}/srpo"]).fetch(uri, tmp_path / "ok")
    assert adapter_sha256(ok.path) == adapter_sha256(adapters["v1"]) and ok.manifest is None
    with pytest.raises(AdapterRefused, match="before download") as err:
        AdapterSource([f"s3://{s3_bucket}/srpo"], FetchLimits(max_bytes=size - 1)).fetch(uri, tmp_path / "capped")
    assert err.value.status == 413 and not (tmp_path / "capped").exists()
    # an object larger than it was listed (replaced between the listing and the download)
    source = AdapterSource([f"s3://{s3_bucket}/srpo"])
    real_list = source._list_s3
    monkeypatch.setattr(source, "_list_s3", lambda store, key, u: [(k, 10) for k, _ in real_list(store, key, u)])
    with pytest.raises(AdapterRefused, match="grew past its listed size"):
        source.fetch(uri, tmp_path / "grown")
    # other buckets, the root itself and '..' keys are outside
    for bad in (f"s3://{s3_bucket}-other/srpo/a/adapter", f"s3://{s3_bucket}/srpo", f"s3://{s3_bucket}/srpo/../x/adapter", f"s3://{s3_bucket}/srpox/a"):
        with pytest.raises(AdapterRefused) as err:
            AdapterSource([f"s3://{s3_bucket}/srpo"]).fetch(bad, tmp_path / "bad")
        assert err.value.status == 403, bad


def test_local_adapter_with_a_symlinked_file_out_of_the_root_is_refused(adapters, tmp_path):
    from srpo_core.server.adapters import AdapterRefused, AdapterSource

    root = tmp_path / "root"
    shutil.copytree(adapters["v1"], root / "ad")
    (root / "ad" / "adapter_config.json").unlink()
    (root / "ad" / "adapter_config.json").symlink_to(Path(adapters["v1"]) / "adapter_config.json")
    with pytest.raises(AdapterRefused, match="resolves outside the artifact root") as err:
        AdapterSource([str(root)]).fetch(str(root / "ad"), tmp_path / "dest")
    assert err.value.status == 403
    with pytest.raises(AdapterRefused) as err:
        AdapterSource([]).fetch(str(root / "ad"), tmp_path / "dest2")
    assert err.value.status == 403 and "disabled" in str(err.value)


# ---- hardening: request limits, token ranges, device errors ---------------------------------------------------

def raw_request(url: str, data: bytes, timeout: float = 30) -> bytes:
    import socket

    host, port = url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def test_body_size_is_capped_before_reading(stub_server):
    from srpo_core.server.app import ServerLimits

    srv, host = stub_server(limits=ServerLimits(max_body_bytes=1000))
    head = f"POST /encode HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: {1 << 30}\r\n\r\n".encode()
    answer = raw_request(srv.url, head)  # 1 GiB announced, nothing sent: answered and closed at once
    assert answer.startswith(b"HTTP/1.1 413") and b"1000" in answer
    assert http("POST", srv.url + "/encode", {"texts": ["a" * 2000]}, token=TOKEN)[0] == 413
    assert http("POST", srv.url + "/encode", {"texts": ["Q:1|"]}, token=TOKEN)[0] == 200
    # a chunked body (no length announced) is counted as it streams in: refused at the first chunk past the cap,
    # while the client has not finished it (no terminating chunk is ever sent, so waiting for the end would hang)
    chunked = f"POST /teacher_force HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
    chunk = b"%x\r\n%s\r\n" % (600, b" " * 600)
    answer = raw_request(srv.url, chunked + chunk + chunk, timeout=30)
    assert answer.startswith(b"HTTP/1.1 413") and b"refused after 1200 bytes" in answer
    assert host.backend.engine.calls == 0
    # unauthenticated: 401 before any of the body is read, whatever size it announces
    answer = raw_request(srv.url, head.replace(f"Bearer {TOKEN}".encode(), b"Bearer wrong"))
    assert answer.startswith(b"HTTP/1.1 401")


def test_a_stalled_connection_is_closed_by_the_socket_timeout(stub_server):
    import socket

    from srpo_core.server.app import ServerLimits

    timeout = 0.5
    srv, _ = stub_server(limits=ServerLimits(socket_timeout_s=timeout))
    partial = f"POST /encode HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 100\r\n\r\n{{\"te".encode()
    # a stalled body, a stalled request line, a connection that never sends: each closed without an
    # answer once the timeout has passed (margin: a loaded CI machine's scheduling)
    for data in (partial, b"GET /hea", b""):
        t0 = time.monotonic()
        assert raw_request(srv.url, data, timeout=60) == b"", data
        assert timeout * 0.9 <= time.monotonic() - t0 < timeout + 10, data
    # a keep-alive connection idle after an answer: closed too
    host, port = srv.url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while b'"alive"' not in answer:
            answer += sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200")
        t0 = time.monotonic()
        assert sock.recv(65536) == b""
        assert time.monotonic() - t0 < timeout + 10


def test_a_client_that_does_not_read_its_answer_is_dropped(stub_server):
    """A large answer the client never reads fills the socket buffers; after the socket timeout
    without progress the server drops the connection (it holds no slot and no buffer after that)."""
    import socket

    from srpo_core.server.app import ServerLimits

    srv, _ = stub_server(limits=ServerLimits(socket_timeout_s=0.5))
    srv.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # accepted connections inherit it: the kernel holds little of the answer
    n = 50_000  # the answer is ~9 bytes per token (-0.5 and the greedy id): ~450 kB, beyond both sockets' buffers
    body = json.dumps({"prompts": [[1]], "responses": [[2] * n]}).encode()
    host, port = srv.url.split("//")[1].split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(60)
    sock.connect((host, int(port)))
    try:
        sock.sendall(f"POST /teacher_force HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 30
        while not srv.server.server_state.connections:  # the kernel may hold the whole request before the server accepts it
            assert time.monotonic() < deadline, "the server did not accept the connection"
            time.sleep(0.01)
        while srv.server.server_state.connections:  # the server's view: the connection is gone
            assert time.monotonic() < deadline, "a connection whose client reads nothing was not dropped"
            time.sleep(0.05)
        received = 0
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(1 << 20):
                received += len(chunk)
        assert received < 9 * n  # the answer was cut off, not delivered
    finally:
        sock.close()
    assert http("GET", srv.url + "/health")[0] == 200


def test_connections_beyond_the_cap_get_503_at_once(stub_server):
    import socket

    from srpo_core.server.app import ServerLimits

    srv, _ = stub_server(limits=ServerLimits(max_connections=2))
    host, port = srv.url.split("//")[1].split(":")
    idle = [socket.create_connection((host, int(port)), timeout=30) for _ in range(2)]
    try:
        t0 = time.monotonic()
        status, out = http("GET", srv.url + "/health")
        assert status == 503 and "busy" in out["error"] and "--max-connections" in out["error"]
        assert time.monotonic() - t0 < 10  # answered, not queued behind the idle connections
        with pytest.raises(ServerNotReadyError, match="busy"):  # what a client sees
            RemoteEngine(srv.url, token=TOKEN).encode("Q:1|")
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 30  # the server sees the closed sockets and frees their slots
    while http("GET", srv.url + "/health")[0] != 200:
        assert time.monotonic() < deadline, "slots not released after the idle connections closed"
        time.sleep(0.05)
    # exactly max_connections at once are served: one idle connection and this request
    with socket.create_connection((host, int(port)), timeout=30):
        time.sleep(0.2)  # accepted by the server before the request below
        assert http("GET", srv.url + "/health")[0] == 200


def test_probes_and_the_tokenizer_answer_while_a_model_call_runs(stub_server):
    """Model calls run in the thread pool behind the model lock: /health, /ready, /adapters (the
    event loop) and tokenizer calls (their own lock) answer while one is stuck."""
    srv, host = stub_server()
    started, release = threading.Event(), threading.Event()
    real = host.backend.engine.teacher_force

    def slow(prompts, responses, temperature=1.0):
        started.set()
        assert release.wait(60)
        return real(prompts, responses, temperature)

    host.backend.engine.teacher_force = slow
    eng = RemoteEngine(srv.url, token=TOKEN)
    result = []
    caller = threading.Thread(target=lambda: result.append(eng.teacher_force([[1]], [[2, 3]])))
    caller.start()
    try:
        assert started.wait(30)
        t0 = time.monotonic()
        assert eng.health() == {"status": "alive"}
        assert eng.ready()["ready"] is True
        assert eng.adapters()["active"] == "base"
        assert eng.encode("Q:1|")
        assert time.monotonic() - t0 < 5 and caller.is_alive()
    finally:
        release.set()
        caller.join(30)
    assert result[0][0].greedy_ids == [2, 3]


def test_rows_and_row_tokens_are_capped(stub_server):
    from srpo_core.server.app import ServerLimits

    srv, host = stub_server(limits=ServerLimits(max_rows=4, max_request_tokens=1000))
    status, out = http("POST", srv.url + "/teacher_force", {"prompts": [[1]] * 5, "responses": [[2]] * 5}, token=TOKEN)
    assert status == 413 and "5 rows" in out["error"]
    status, out = http("POST", srv.url + "/teacher_force", {"prompts": [[1] * 600], "responses": [[2] * 600]}, token=TOKEN)
    assert status == 413 and "1200 row-tokens" in out["error"]
    gen = {"requests": [{"prompt_ids": [1, 2], "n": 2}], "limits": {"max_model_len": 600}, "sampling": {}}
    status, out = http("POST", srv.url + "/generate_thoughts", gen, token=TOKEN)
    assert status == 413 and "1200 row-tokens" in out["error"]  # rows x max_model_len
    assert host.backend.engine.calls == 0


@pytest.mark.parametrize("bad", [-1, 100, 2**63])
def test_token_ids_outside_the_vocabulary_are_a_400(stub_server, bad):
    srv, host = stub_server()
    bodies = {
        "/teacher_force": {"prompts": [[1, bad]], "responses": [[2]]},
        "/teacher_force#r": {"prompts": [[1]], "responses": [[bad]]},
        "/complete": {"prompts": [[bad]], "max_tokens": 1},
        "/decode": {"ids": [[bad]]},
        "/generate_thoughts": {"requests": [{"prompt_ids": [1, bad]}]},
        "/generate_thoughts#p": {"requests": [{"prompt_ids": [1], "prefix_ids": [bad]}]},
    }
    for path, body in bodies.items():
        status, out = http("POST", srv.url + path.split("#")[0], body, token=TOKEN)
        assert status == 400 and "outside the vocabulary [0, 100)" in out["error"], (path, out)
    assert host.backend.engine.calls == 0
    assert http("GET", srv.url + "/ready")[0] == 200


def test_token_range_on_the_real_model(server):
    """[[-1]] was a 500 (an IndexError in the embedding) on CPU; on a GPU a device-side assert."""
    vocab = server.engine().check_ready()["vocab_size"]
    for ids in ([-1], [vocab]):
        status, out = http("POST", server.url + "/teacher_force", {"prompts": [ids], "responses": [[1]]}, token=server.token)
        assert status == 400 and "outside the vocabulary" in out["error"]


def test_bad_sampling_and_spans_are_a_400(stub_server):
    srv, _ = stub_server()
    for body in ({"requests": [{"prompt_ids": [1], "prefix_ids": [2], "prefix_spans": [[0, 5]]}]},
                 {"requests": [{"prompt_ids": [1]}], "sampling": {"temperature": "hot"}},
                 {"requests": [{"prompt_ids": [1]}], "sampling": {"top_p": 0}},
                 {"requests": [{"prompt_ids": [1]}], "limits": {"max_model_len": 0}}):
        status, out = http("POST", srv.url + "/generate_thoughts", body, token=TOKEN)
        assert status == 400, (body, out)


def test_a_device_error_makes_the_server_unready(stub_server):
    srv, host = stub_server()
    body = {"prompts": [[1]], "responses": [[2]]}
    host.backend.engine.fail = __import__("torch").OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert http("POST", srv.url + "/teacher_force", body, token=TOKEN)[0] == 500
    assert http("GET", srv.url + "/ready")[0] == 200  # an OOM is survivable: the next, smaller call may fit
    host.backend.engine.fail = RuntimeError("CUDA error: device-side assert triggered\nCUDA kernel errors might be asynchronously reported")
    status, out = http("POST", srv.url + "/teacher_force", body, token=TOKEN)
    assert status == 503 and "device error" in out["error"]
    host.backend.engine.fail = None
    assert http("GET", srv.url + "/ready") == (503, {"ready": False})
    status, info = http("GET", srv.url + "/ready", token=TOKEN)
    assert status == 503 and "device-side assert" in info["error"]
    status, out = http("POST", srv.url + "/teacher_force", body, token=TOKEN)
    assert status == 503 and "restart" in out["error"]  # never served from a broken device again
    assert http("GET", srv.url + "/health")[0] == 200  # alive (the process answers), not ready

"""The inference server end to end on the tiny model (CPU): a real `python -m srpo_core.server`
subprocess, adapters hot-loaded from a local dir and from S3 (moto), greedy rollouts equal to the
in-process HF engine with the same adapter, version pinning (409 for versions not held), the
weight-sync canary catching a stale adapter, health/ready, and an unreachable server failing fast."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from http.client import HTTPConnection

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


def http(method: str, url: str, body: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(), method=method, headers={"Content-Type": "application/json"})
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
def server(tiny_model_path, s3_server, tmp_path_factory):
    # s3_server first: the subprocess inherits its endpoint and dummy credentials
    handle = start_server(tiny_model_path, threads=1, max_adapters=2, workdir=tmp_path_factory.mktemp("server"), ready_timeout=300, env={"SRPO_S3_ENDPOINT_URL": s3_server})
    yield handle
    code = handle.stop()
    assert code == 0, f"server exited with {code}:\n{handle.log_tail()}"


# ---- health, readiness, reachability ---------------------------------------------------------------

def test_health_and_ready(server):
    assert http("GET", server.url + "/health") == (200, {"status": "alive"})
    status, info = http("GET", server.url + "/ready")
    assert status == 200 and info["ready"] is True
    assert info["engine"] == "hf" and info["dtype"] == "float32" and "base" in info["versions"]
    assert server.engine().check_ready()["ready"] is True
    status, body = http("POST", server.url + "/nope", {})
    assert status == 404 and "/generate_thoughts" in body["error"]
    status, body = http("POST", server.url + "/generate_thoughts", {"requests": [{"prompt_ids": "x"}]})
    assert status == 400 and "prompt_ids" in body["error"]
    for length in ("ten", "-1"):  # a malformed length is the client's error, and never blocks a read
        conn = HTTPConnection(server.url.split("//")[1], timeout=30)
        conn.putrequest("POST", "/encode")
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
    srv = InferenceServer(host, ("127.0.0.1", 0))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
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
        srv.shutdown()
        srv.server_close()
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
    loaded = remote.load_adapter(str(adapters["v1"]), "eq-v1")
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
    remote.load_adapter(str(adapters["v2"]), "ph-v2")
    ref = reference_engine(tiny_model_path, adapters["v2"], "ph-v2")
    got = step.run_rollout_phases(remote, task, cfg, items, step=0)
    want = step.run_rollout_phases(ref, task, cfg, items, step=0)
    key = lambda res: [(r.group_id, r.rollout.response_ids, r.rollout.spans, r.reward, r.rollout.adapter_version) for r in res.records]
    assert key(got) == key(want) and got.records
    assert {r.rollout.adapter_version for r in got.records} == {"ph-v2"}


# ---- versions --------------------------------------------------------------------------------------------

def test_a_version_the_server_does_not_hold_is_refused(server, adapters):
    server.engine().load_adapter(str(adapters["v1"]), "held-v1")
    stranger = server.engine(adapter_version="never-loaded")
    with pytest.raises(AdapterVersionError) as err:
        stranger.generate_thoughts([ThoughtRequest((5, 6, 7))], LIMITS, GREEDY)
    assert err.value.status == 409 and "never-loaded" in str(err.value) and server.url in str(err.value)
    for path, body in (("/teacher_force", {"prompts": [[5]], "responses": [[6]]}), ("/complete", {"prompts": [[5]], "max_tokens": 2, "sampling": {}})):
        status, out = http("POST", server.url + path, {**body, "adapter_version": "never-loaded"})
        assert status == 409 and "never-loaded" in out["error"] and "results" not in out
    with pytest.raises(AdapterVersionError):
        stranger.check_ready()


def test_versions_are_pinned_immutable_and_bounded(server, adapters, tiny_model_path):
    eng = server.engine()
    eng.load_adapter(str(adapters["v1"]), "pin-1")
    eng.load_adapter(str(adapters["v2"]), "pin-2")
    seq_p, seq_r = [5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15]
    want = {v: reference_engine(tiny_model_path, adapters[d], v).teacher_force([seq_p], [seq_r])[0].logprobs for v, d in (("pin-1", "v1"), ("pin-2", "v2"))}
    for version in ("pin-1", "pin-2"):  # both held: each request gets exactly the version it names
        status, out = http("POST", server.url + "/teacher_force", {"prompts": [seq_p], "responses": [seq_r], "adapter_version": version})
        assert status == 200 and out["adapter_version"] == version
        assert out["results"][0]["logprobs"] == pytest.approx(want[version], abs=1e-5)
        assert server.engine(version).generate_thoughts([ThoughtRequest(tuple(seq_p))], TIGHT, GREEDY)[0][0].adapter_version == version
    status, out = http("POST", server.url + "/teacher_force", {"prompts": [seq_p], "responses": [seq_r]})
    assert out["adapter_version"] == "pin-2"  # null -> the active (last loaded) version, and it says so

    with pytest.raises(AdapterVersionError, match="immutable"):
        eng.load_adapter(str(adapters["v2"]), "pin-1")
    assert eng.load_adapter(str(adapters["v1"]), "pin-1")["already_loaded"] is True
    out = eng.load_adapter(str(adapters["v1"]), "pin-3")  # max_adapters=2: the oldest non-active goes
    assert out["evicted"] == ["pin-1"]
    assert [a["version"] for a in eng.adapters()["adapters"]] == ["pin-2", "pin-3"]
    with pytest.raises(AdapterVersionError):
        server.engine("pin-1").teacher_force([seq_p], [seq_r])
    assert eng.unload_adapter("pin-3")["active"] == "pin-2"


def test_adapter_loads_from_s3(server, adapters, s3_server, s3_bucket):
    from srpo_core.store import S3Store

    S3Store(s3_bucket, endpoint_url=s3_server).put_dir("runs/t1/steps/000001/adapter", adapters["v1"])
    eng = server.engine()
    out = eng.load_adapter(f"s3://{s3_bucket}/runs/t1/steps/000001/adapter", "s3-v1")
    assert out["sha256"] == adapter_sha256(adapters["v1"])
    eng.load_adapter(str(adapters["v1"]), "local-v1")
    seq = ([5, 6, 7, 8], [9, 10, 11, 12, 13])
    assert server.engine("s3-v1").teacher_force(*map(lambda x: [x], seq))[0].logprobs == server.engine("local-v1").teacher_force(*map(lambda x: [x], seq))[0].logprobs
    with pytest.raises(RemoteEngineError, match="nothing stored") as err:
        eng.load_adapter(f"s3://{s3_bucket}/runs/t1/steps/000009/adapter", "s3-missing")
    assert err.value.status == 400


# ---- the weight-sync canary -------------------------------------------------------------------------------

def test_canary_passes_in_sync_and_catches_a_stale_adapter(server, session, adapters, tmp_path):
    eng = server.engine()
    eng.load_adapter(str(session.learner.save_adapter(tmp_path / "a")), "live-a")
    ok = canary_check(eng, session.learner, "live-a")
    assert ok.max_abs_diff <= 1e-4 and ok.tol == 1e-4 and ok.n_tokens > 0

    learner_step(session, 3)  # the learner moves on; the server is not reloaded
    with pytest.raises(StaleAdapterError, match="STALE ADAPTER") as err:
        canary_check(eng, session.learner, "live-a")
    assert err.value.max_abs_diff > 1e-3 and err.value.version == "live-a"

    saved = session.learner.save_adapter(tmp_path / "b")
    eng.load_adapter(str(saved), "live-b")
    assert canary_check(eng, session.learner, "live-b", expected_sha256=adapter_sha256(saved)).max_abs_diff <= 1e-4

    # a broken sync: old weights uploaded under the new version name
    eng.load_adapter(str(adapters["v1"]), "mislabelled")
    with pytest.raises(StaleAdapterError, match="STALE ADAPTER"):
        canary_check(eng, session.learner, "mislabelled")
    with pytest.raises(StaleAdapterError, match="sha256"):
        canary_check(eng, session.learner, "mislabelled", expected_sha256=adapter_sha256(saved))
    # a version the server never loaded
    with pytest.raises(StaleAdapterError, match="not held"):
        canary_check(eng, session.learner, "live-c")

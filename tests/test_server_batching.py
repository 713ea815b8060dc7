"""The server's shared continuous batch (srpo_core/server/batching.py): concurrent sampling calls
decode together and each gets the result it would get alone.

The model runs in float64 for the same reason as in tests/test_scheduler.py: a row's logits
depend in their last bits on the rows it shares a forward with, which in float32 flips a sampled
token now and then; in float64 a flip has probability ~1e-11 per call, so tokens must be equal and
log-probs equal to 1e-9.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import time

import pytest

from srpo_core.engine import hf
from srpo_core.engine.base import SamplingParams, ThoughtLimits, ThoughtRequest
from srpo_core.server.app import Adapter, Backend, HTTPError, ModelHost

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LIMITS = ThoughtLimits(max_thoughts=20, max_thought_tokens=16, max_response_tokens=256, max_model_len=512)
QUESTIONS = ["Q:3+4*2-1|", "Q:7*3-2|", "Q:9-4+8*3|", "Q:5*5+1|", "Q:2+2*7-3|", "Q:8*1-6|"]


class EngineBackend(Backend):
    """The tiny model behind a plain engine; `select` records the versions it ran."""

    def __init__(self, engine):
        self.engine = engine
        self.selected: list[str] = []

    def load_adapter(self, name, path): ...
    def delete_adapter(self, name): ...

    def select(self, name, version):
        self.selected.append(version)
        return contextlib.nullcontext(self.engine)

    @property
    def vocab_size(self) -> int:
        return 100


@pytest.fixture(scope="module")
def engine64(tiny_model):
    model, tok = tiny_model
    return hf.HFEngine(copy.deepcopy(model).double(), tok)


@pytest.fixture
def host(engine64):
    h = ModelHost(lambda: EngineBackend(engine64), "tiny")
    h.load_model()
    yield h
    h.close()


def calls(engine):
    """Three sampling calls: (fn(engine), submit(batch)) pairs of two thought requests and a completion."""
    ids = [tuple(engine.encode(q)) for q in QUESTIONS]
    a = ([ThoughtRequest(p, n=3) for p in ids[:3]], SamplingParams(temperature=1.0, seed=11))
    b = ([ThoughtRequest(p, n=2) for p in ids[3:]], SamplingParams(temperature=1.0, top_p=0.9, seed=5))
    c = ([list(p) for p in ids[:2]], SamplingParams(temperature=0.7, seed=3))
    return [
        (lambda e: e.generate_thoughts(a[0], LIMITS, a[1]), lambda bt: bt.submit_thoughts(a[0], LIMITS, a[1])),
        (lambda e: e.generate_thoughts(b[0], LIMITS, b[1]), lambda bt: bt.submit_thoughts(b[0], LIMITS, b[1])),
        (lambda e: e.complete(c[0], 8, c[1]), lambda bt: bt.submit_complete(c[0], 8, c[1])),
    ]


def flat(result):
    """Token ids and log-probs of a call's result (thought groups or completions)."""
    if result and isinstance(result[0], list):
        return [(r.response_ids, r.spans, r.finish_reason, r.logprobs) for g in result for r in g]
    return [(c.ids, c.finish_reason, c.logprobs) for c in result]


def assert_same(got, want):
    assert len(got) == len(want)
    for x, y in zip(flat(got), flat(want)):
        assert x[:-1] == y[:-1]
        assert x[-1] == pytest.approx(y[-1], abs=1e-9)


def run_concurrently(host, jobs: list[tuple], expect_queued: int):
    """Call `host.run_batched(*job)` from one thread each while the model lock is held, so all of
    them are queued before the worker starts its batch; (results, errors) in job order."""
    results, errors = [None] * len(jobs), [None] * len(jobs)

    def call(i, job):
        try:
            results[i] = host.run_batched(*job)
        except Exception as exc:  # noqa: BLE001
            errors[i] = exc

    threads = [threading.Thread(target=call, args=(i, job)) for i, job in enumerate(jobs)]
    with host.model_lock:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while len(host.shared.queue) < expect_queued:
            assert time.monotonic() < deadline, "the calls never reached the queue"
            time.sleep(0.01)
    for t in threads:
        t.join(120)
    return results, errors


def test_concurrent_calls_decode_in_one_batch_with_the_results_they_get_alone(host, engine64):
    alone = [fn(engine64) for fn, _ in calls(engine64)]
    results, errors = run_concurrently(host, [(None, fn, submit) for fn, submit in calls(engine64)], 3)
    assert errors == [None] * 3
    assert host.shared.stats["batches"] == 1 and host.shared.stats["most_tickets_in_a_batch"] == 3
    for (version, got), want in zip(results, alone):
        assert version == "base"
        assert_same(got, want)
    # decoded together: fewer decode steps than the three calls one after another
    steps = 0
    for _, submit in calls(engine64):
        batch = engine64.continuous_batch()
        handle = submit(batch)
        batch.run([handle])
        steps += batch.stats["decode_steps"]
    assert host.shared.stats["decode_steps"] < steps
    serial = ModelHost(lambda: EngineBackend(engine64), "tiny", shared_batch=False)
    try:
        serial.load_model()
        assert_same(serial.run_batched(None, *calls(engine64)[0])[1], alone[0])  # --serial-calls: the plain path
        assert serial.shared is None
    finally:
        serial.close()


def test_a_call_pinned_to_other_weights_fails_alone(host, engine64):
    (fn, submit), (fn2, submit2) = calls(engine64)[:2]
    results, errors = run_concurrently(host, [(None, fn, submit, "0" * 64), (None, fn2, submit2)], 2)
    assert isinstance(errors[0], HTTPError) and errors[0].status == 409 and "pinned" in str(errors[0])
    assert errors[1] is None
    assert_same(results[1][1], fn2(engine64))


def test_calls_of_two_versions_run_in_two_batches_under_their_own_version(host, engine64):
    host.adapters["v1"] = Adapter("v1", "a1", "file:///v1", "1" * 64, "/nonexistent", False, 0.0)
    jobs = [(v, fn, submit) for v, (fn, submit) in zip(["base", "v1", "base"], calls(engine64))]
    results, errors = run_concurrently(host, jobs, 3)
    assert errors == [None] * 3
    assert [r[0] for r in results] == ["base", "v1", "base"]
    assert host.backend.selected == ["base", "v1"]  # both base calls in the first batch
    assert host.shared.stats["batches"] == 2 and host.shared.stats["most_tickets_in_a_batch"] == 2


def test_a_decode_error_fails_the_batch_and_the_next_call_is_served(host, engine64, monkeypatch):
    real = hf.ContinuousBatch.step
    failed = []

    def step_once(self):
        if not failed:
            failed.append(1)
            raise RuntimeError("decode blew up")
        return real(self)

    monkeypatch.setattr(hf.ContinuousBatch, "step", step_once)
    jobs = [(None, fn, submit) for fn, submit in calls(engine64)[:2]]
    _, errors = run_concurrently(host, jobs, 2)
    assert all(isinstance(e, RuntimeError) and "decode blew up" in str(e) for e in errors)
    fn, submit = calls(engine64)[2]
    version, got = host.run_batched(None, fn, submit)
    assert_same(got, fn(engine64))
    assert host.ready  # not a device error: the server stays in service

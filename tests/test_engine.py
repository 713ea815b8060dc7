"""The Hugging Face engine on the tiny model: continuous generation equals one call per thought,
caps hold, resets are token-exact, a shared prefix encoded once equals re-encoding it, and the
reported log-probs are the model's."""

import pytest

from srpo_core import templates
from srpo_core.engine.base import SamplingParams, ThoughtLimits, ThoughtRequest
from srpo_core.engine.hf import HFEngine, generate_thoughts_per_call
from srpo_core.tasks import synthetic

GREEDY = SamplingParams(temperature=0.0)
LIMITS = ThoughtLimits(max_thoughts=20, max_thought_tokens=16, max_response_tokens=256, max_model_len=512)


@pytest.fixture(scope="module")
def engine(tiny_model):
    model, tok = tiny_model
    return HFEngine(model, tok)


def prompts(engine, n, seed=3):
    return [engine.encode(templates.rollout_prompt("tiny_rollout_v1", p.question)) for p in synthetic.make_split("test", n, seed)]


def test_continuous_equals_one_call_per_thought_greedy(engine, tiny_model):
    model, tok = tiny_model
    reqs = [ThoughtRequest(tuple(p), n=1) for p in prompts(engine, 12)]
    tight = ThoughtLimits(max_thoughts=6, max_thought_tokens=5, max_response_tokens=40, max_model_len=512)
    for limits in (LIMITS, tight):  # the tight caps cut thoughts and stop chains
        fast = engine.generate_thoughts(reqs, limits, GREEDY)
        slow = generate_thoughts_per_call(model, tok, reqs, limits, GREEDY)
        for a, b in zip(fast, slow):
            assert a[0].response_ids == b[0].response_ids
            assert a[0].spans == b[0].spans
            assert a[0].finish_reason == b[0].finish_reason
            assert a[0].logprobs == pytest.approx(b[0].logprobs, abs=1e-4)
    assert {r[0].finish_reason for r in engine.generate_thoughts(reqs, tight, GREEDY)} - {"answer"}


def test_caps_hold_when_sampling(engine):
    limits = ThoughtLimits(max_thoughts=4, max_thought_tokens=6, max_response_tokens=30, max_model_len=60)
    reqs = [ThoughtRequest(tuple(p), n=8) for p in prompts(engine, 8)]
    out = engine.generate_thoughts(reqs, limits, SamplingParams(temperature=1.5, seed=1))
    reasons = set()
    for req, rollouts in zip(reqs, out):
        for r in rollouts:
            reasons.add(r.finish_reason)
            assert len(r.spans) <= limits.max_thoughts
            assert all(0 < b - a <= limits.max_thought_tokens for a, b in r.spans)
            assert len(r.response_ids) <= limits.max_response_tokens
            assert len(req.prompt_ids) + len(r.response_ids) <= limits.max_model_len
            # spans tile the response exactly, and every thought but a cut one ends with the stop
            assert r.spans[0][0] == 0 and all(r.spans[i][1] == r.spans[i + 1][0] for i in range(len(r.spans) - 1))
            assert r.spans[-1][1] == len(r.response_ids)
            for t, (a, b) in zip(r.thoughts, r.spans):
                assert t.endswith("</thought>") or b - a == limits.max_thought_tokens or r.finish_reason == "eos"
            assert len(r.logprobs) == r.generated_tokens
    assert "max_thoughts" in reasons or "max_response" in reasons or "max_model_len" in reasons


def test_answer_ends_chain(engine):
    out = engine.generate_thoughts([ThoughtRequest(tuple(p), n=1) for p in prompts(engine, 20)], LIMITS, GREEDY)
    assert any(r.finish_reason == "answer" for (r,) in out)
    for (r,) in out:
        if r.finish_reason == "answer":
            assert "\\boxed{" in r.thoughts[-1] and all("\\boxed{" not in t for t in r.thoughts[:-1])


def test_prefix_is_token_exact_and_encoded_once_equals_reencoding(engine):
    ps = prompts(engine, 6)
    seeds = [r[0] for r in engine.generate_thoughts([ThoughtRequest(tuple(p), n=1) for p in ps], LIMITS, GREEDY)]
    reqs, flat = [], []
    for p, s in zip(ps, seeds):
        h = min(3, len(s.spans))
        end = s.spans[h - 2][1] if h > 1 else 0
        reqs.append(ThoughtRequest(tuple(p), n=4, prefix_ids=tuple(s.response_ids[:end]), prefix_spans=tuple(s.spans[: h - 1])))
        flat.append(ThoughtRequest(tuple(p + s.response_ids[:end]), n=1))
    shared = engine.generate_thoughts(reqs, LIMITS, GREEDY)
    reencoded = engine.generate_thoughts(flat, LIMITS, GREEDY)
    for req, group, (ref,) in zip(reqs, shared, reencoded):
        k = len(req.prefix_ids)
        for r in group:
            assert r.prefix_len == k and r.response_ids[:k] == list(req.prefix_ids)
            assert r.spans[: len(req.prefix_spans)] == list(req.prefix_spans)
            # greedy suffixes of a shared prefix are identical to decoding prompt+prefix afresh
            assert r.response_ids[k:] == ref.response_ids
            assert len(r.logprobs) == len(r.response_ids) - k


def test_prefix_counts_toward_caps(engine):
    p = prompts(engine, 1)[0]
    seed = engine.generate_thoughts([ThoughtRequest(tuple(p), n=1)], LIMITS, GREEDY)[0][0]
    limits = ThoughtLimits(max_thoughts=len(seed.spans[:2]) + 1, max_thought_tokens=16, max_response_tokens=256, max_model_len=512)
    req = ThoughtRequest(tuple(p), n=3, prefix_ids=tuple(seed.response_ids[: seed.spans[1][1]]), prefix_spans=tuple(seed.spans[:2]))
    for r in engine.generate_thoughts([req], limits, SamplingParams(temperature=1.0, seed=0))[0]:
        assert len(r.spans) <= 3


def test_logprobs_match_teacher_forcing(engine):
    ps = prompts(engine, 6)
    out = engine.generate_thoughts([ThoughtRequest(tuple(p), n=2) for p in ps], LIMITS, SamplingParams(temperature=0.7, top_p=0.95, seed=5))
    flat = [r for group in out for r in group]
    scores = engine.teacher_force([r.prompt_ids for r in flat], [r.response_ids for r in flat], temperature=0.7)
    for r, sc in zip(flat, scores):
        assert r.logprobs == pytest.approx(sc.logprobs, abs=2e-4)


def test_sampling_is_seeded(engine):
    reqs = [ThoughtRequest(tuple(p), n=4) for p in prompts(engine, 4)]
    a = engine.generate_thoughts(reqs, LIMITS, SamplingParams(temperature=1.0, seed=11))
    b = engine.generate_thoughts(reqs, LIMITS, SamplingParams(temperature=1.0, seed=11))
    c = engine.generate_thoughts(reqs, LIMITS, SamplingParams(temperature=1.0, seed=12))
    ids = lambda out: [r.response_ids for g in out for r in g]
    assert ids(a) == ids(b) and ids(a) != ids(c)


def test_complete_stops_at_eos_or_max_tokens(engine):
    texts = [templates.localization_prompt("tiny_localization_v1", p.question, synthetic.corrupt(p, __import__("random").Random(0))[0]) for p in synthetic.make_split("test", 4, 1)]
    out = engine.complete([engine.encode(t) for t in texts], 8, GREEDY)
    for c in out:
        assert len(c.ids) <= 8 and c.finish_reason in ("eos", "length")
        assert engine.tokenizer.eos_token_id not in c.ids

"""The event-driven rollout scheduler (`rollout.scheduler: events`, srpo_core/scheduler.py) gives
the records of the batched phases, and the per-chain seeding that makes that possible draws the
right distribution whatever the batch.

Why the comparison runs the tiny model in float64: a row's logits depend in their last bits on
the rows it shares a forward with (GEMM blocking over the batch size, attention reductions over
the padded width: ~2e-6 absolute on this model in float32, measured while writing this test).
The token a chain draws is the inverse CDF of its own uniform at its own probabilities, so it
changes only when the uniform falls within that perturbation of a CDF boundary: ~1e-5 per token in
float32, which over the ~10^4 tokens of a step would make an exact comparison fail now and then.
In float64 the perturbation is ~1e-15 and a flip has probability ~1e-11 per step, so the records
(token ids, spans, rewards, groups, resets) must be equal, and the log-probs equal to 1e-9 (float64
sums over 128-dim reductions differ by ~1e-14 relative; 1e-9 leaves room and still catches any
other computation).
"""

import copy
import dataclasses
import gc
import json

import pytest
import torch

from srpo_core import data_order, step
from srpo_core.config import ConfigError, load_config
from srpo_core.engine import hf
from srpo_core.engine.base import SamplingParams, ThoughtLimits, ThoughtRequest
from srpo_core.records import records_jsonl
from srpo_core.tasks import get_task
from tests.scripted_engine import ScriptedEngine

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LIMITS = ThoughtLimits(max_thoughts=20, max_thought_tokens=16, max_response_tokens=256, max_model_len=512)


@pytest.fixture(scope="module")
def engine64(tiny_model):
    model, tok = tiny_model
    return hf.HFEngine(copy.deepcopy(model).double(), tok)


def _cfg(path, scheduler, **over):
    return load_config("tiny", {"model.name_or_path": path, "train.prompts_per_step": 8, "rollout.scheduler": scheduler, **over})


def _step(engine, path, scheduler, index, **over):
    cfg = _cfg(path, scheduler, **over)
    result = step.run_rollout_phases(engine, get_task("synthetic"), cfg, data_order.step_items(cfg, index), index)
    return cfg, result


def _assert_same(a, b, cfg, index):
    assert records_jsonl(a.records, index, cfg) == records_jsonl(b.records, index, cfg)
    for x, y in zip(a.records, b.records):
        assert x.rollout.response_ids == y.rollout.response_ids and x.rollout.spans == y.rollout.spans
        assert x.rollout.logprobs == pytest.approx(y.rollout.logprobs, abs=1e-9)


SCENARIOS = {
    "srpo-self-1x4": {"method.method": "srpo", "method.localizer": "self"},
    "srpo-oracle-2x4": {"method.method": "srpo", "method.localizer": "oracle", "method.split": "2x4"},
    "srpo-divergence-1x8": {"method.method": "srpo", "method.localizer": "divergence", "method.split": "1x8"},
    # a more accurate policy (lower temperature): prompts need several seed-search rounds and
    # base fills, which the event path runs per prompt while others still search
    "srpo-self-1x4-rounds": {"method.method": "srpo", "method.localizer": "self", "rollout.temperature": 0.4},
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_events_give_the_records_of_the_batched_phases(engine64, tiny_model_path, name):
    over = SCENARIOS[name]
    cfg, batched = _step(engine64, tiny_model_path, "batched", 1, **over)
    _, events = _step(engine64, tiny_model_path, "events", 1, **over)
    assert step.scheduled_by_events(_cfg(tiny_model_path, "events", **over), engine64)
    assert len(batched.records) >= 8 * 8
    _assert_same(batched, events, cfg, 1)
    if name.endswith("rounds"):  # the scenario does exercise later rounds and fills
        assert batched.metrics["seed_search/attempts_mean"] > 5
        assert any(r.group == "base" for r in batched.records)


def test_the_comparison_fails_when_chains_are_seeded_by_batch_position(engine64, tiny_model_path, monkeypatch):
    """What the per-chain keys fix: seeded by call order (as a batch-wide generator is), the two
    schedules give other records."""
    calls = iter(range(10**9))
    monkeypatch.setattr(hf, "chain_key", lambda seed, context, salt, chain: (next(calls) & hf.M32, seed & hf.M32))
    cfg, batched = _step(engine64, tiny_model_path, "batched", 1, **SCENARIOS["srpo-self-1x4"])
    calls = iter(range(10**9))
    _, events = _step(engine64, tiny_model_path, "events", 1, **SCENARIOS["srpo-self-1x4"])
    assert records_jsonl(batched.records, 1, cfg) != records_jsonl(events.records, 1, cfg)


def test_a_chain_does_not_depend_on_its_batch(engine64):
    """Alone, in a full batch, or queued behind others with rows joining as others finish
    (max_rows 5: cohorts form and merge), a chain samples the same tokens."""
    from srpo_core import templates
    from srpo_core.tasks import synthetic

    prompts = [tuple(engine64.encode(templates.rollout_prompt("tiny_rollout_v1", p.question))) for p in synthetic.make_split("test", 6, 3)]
    sampling = SamplingParams(temperature=1.0, top_p=0.9, seed=7)
    reqs = [ThoughtRequest(p, n=3) for p in prompts]
    together = engine64.generate_thoughts(reqs, LIMITS, sampling)
    alone = [engine64.generate_thoughts([r], LIMITS, sampling)[0] for r in reversed(reqs)][::-1]
    batch = engine64.continuous_batch(max_rows=5)
    handle = batch.submit_thoughts(reqs, LIMITS, sampling)
    batch.run([handle])
    ids = lambda out: [[c.response_ids for c in g] for g in out]  # noqa: E731
    assert ids(together) == ids(alone) == ids(handle.result)
    assert batch.stats["prefills"] > 1  # rows did join a running batch
    assert len({tuple(c.response_ids) for g in together for c in g}) > len(prompts)  # chains of one prompt differ


def test_equal_contexts_get_independent_chains_and_a_shared_counter_continues_them(engine64):
    prompt = tuple(engine64.encode("Q:3+4*2-1|"))
    sampling = SamplingParams(temperature=1.0, seed=3)
    (a, b) = engine64.generate_thoughts([ThoughtRequest(prompt, n=2), ThoughtRequest(prompt, n=2)], LIMITS, sampling)
    (four,) = engine64.generate_thoughts([ThoughtRequest(prompt, n=4)], LIMITS, sampling)
    assert [c.response_ids for c in a + b] == [c.response_ids for c in four]
    batch, seen = engine64.continuous_batch(), {}
    h1 = batch.submit_thoughts([ThoughtRequest(prompt, n=2)], LIMITS, sampling, seen=seen)
    h2 = batch.submit_thoughts([ThoughtRequest(prompt, n=2)], LIMITS, sampling, seen=seen)
    batch.run([h1, h2])
    assert [c.response_ids for c in h1.result[0] + h2.result[0]] == [c.response_ids for c in four]
    salted = engine64.continuous_batch()
    h3 = salted.submit_thoughts([ThoughtRequest(prompt, n=4)], LIMITS, sampling, salt=1)
    salted.run([h3])
    assert [c.response_ids for c in h3.result[0]] != [c.response_ids for c in four]


def test_a_question_twice_in_a_shard_gets_independent_chains(engine64, tiny_model_path):
    cfg = _cfg(tiny_model_path, "events", **SCENARIOS["srpo-self-1x4"])
    items = data_order.step_items(cfg, 0)[:3]
    twin = dataclasses.replace(items[0], id=items[0].id + "-twin")
    result = step.run_rollout_phases(engine64, get_task("synthetic"), cfg, items + [twin], 0)
    chains = lambda pid: sorted(r.rollout.response_ids for r in result.records if r.item.id == pid)  # noqa: E731
    assert chains(items[0].id) and chains(items[0].id) != chains(twin.id)


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_keyed_sampling_draws_the_softmax_distribution(top_p):
    """Chi-square goodness of fit of 40,000 keyed draws (one chain key each, counters 0..3) from
    fixed logits against the (top-p renormalised) softmax. A correct sampler fails with
    probability 1e-4; the test's power against sampling at temperature 1.1 instead of 1.0 is
    computed below from the noncentral chi-square and must be >= 0.99."""
    from scipy import stats

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(12, generator=gen, dtype=torch.float64) * 1.5
    sampling = SamplingParams(temperature=1.0, top_p=top_p)
    keys = [hf.chain_key(5, (1, 2, 3), 0, j) for j in range(10_000)]
    hi = torch.tensor([k[0] for k in keys]).repeat(4)
    lo = torch.tensor([k[1] for k in keys]).repeat(4)
    counter = torch.arange(4).repeat_interleave(10_000)
    u = hf.chain_uniforms(hi, lo, counter)
    tok, lp = hf.sample_tokens(logits.expand(len(u), -1).float(), sampling, u)

    def probs(temperature):
        p = torch.softmax(logits / temperature, -1)
        if top_p < 1.0:
            order = p.argsort(descending=True)
            keep = (p[order].cumsum(0) - p[order]) <= top_p
            q = torch.zeros_like(p)
            q[order[keep]] = p[order[keep]]
            p = q / q.sum()
        return p

    p = probs(1.0)
    support = p > 0
    observed = torch.bincount(tok, minlength=len(p)).double()
    assert observed[~support].sum() == 0  # nothing outside the top-p set
    n, df = len(u), int(support.sum()) - 1
    stat = float((((observed - n * p) ** 2)[support] / (n * p[support])).sum())
    critical = stats.chi2.ppf(1 - 1e-4, df)
    assert stat < critical
    alt = probs(1.1)
    noncentrality = n * float((((alt - p) ** 2)[support] / p[support]).sum())
    assert 1 - stats.ncx2.cdf(critical, df, noncentrality) >= 0.99
    assert lp.double() == pytest.approx(torch.log_softmax(logits, -1)[tok], abs=1e-5)  # log-probs before truncation
    assert stats.kstest(u.numpy(), "uniform").pvalue > 1e-4  # the uniforms themselves


def test_events_need_an_engine_with_a_continuous_batch(tiny_model_path):
    with pytest.raises(ConfigError, match="rollout.scheduler"):
        load_config("tiny", {"rollout.scheduler": "events", "rollout.engine": "openai", "rollout.server_url": "http://vllm:8000"})
    assert load_config("tiny", {"rollout.scheduler": "events", "rollout.engine": "vllm"}).rollout.scheduler == "events"  # vLLM's engine loop (engine/vllm.py StepBatch)
    with pytest.raises(ConfigError, match="rollout.scheduler"):
        load_config("tiny", {"rollout.scheduler": "sometimes"})
    from srpo_core.tasks import TaskItem, synthetic

    problems = {p.id: p for p in synthetic.make_split("train", 2, seed=0)}
    engine = ScriptedEngine(problems, {pid: [] for pid in problems})
    items = [TaskItem(p.id, p.question, p.answer) for p in problems.values()]
    with pytest.raises(ValueError, match="rollout.scheduler: events needs an engine with a continuous batch"):
        step.run_rollout_phases(engine, get_task("synthetic"), _cfg(tiny_model_path, "events"), items, 0)
    # auto: the batched phases where the engine has no continuous batch
    result = step.run_rollout_phases(engine, get_task("synthetic"), _cfg(tiny_model_path, "auto", **{"method.localizer": "oracle"}), items, 0)
    assert json.loads(records_jsonl(result.records, 0, _cfg(tiny_model_path, "auto")).splitlines()[0])["prompt_id"] == items[0].id


def test_cohorts_open_join_and_merge_without_changing_chains(engine64):
    """Rows of contexts ~20 tokens apart, admitted as capacity frees: with a small cohort cost they
    open cohorts of their own and merge once few rows remain; with a huge one they all share one
    left-padded cache. The chains are the same either way."""
    from srpo_core import templates
    from srpo_core.tasks import synthetic

    prompts = [tuple(engine64.encode(templates.rollout_prompt("tiny_rollout_v1", p.question))) for p in synthetic.make_split("test", 4, 5)]
    seeds = [g[0] for g in engine64.generate_thoughts([ThoughtRequest(p, n=1) for p in prompts], LIMITS, SamplingParams(temperature=0.0))]
    reqs = []
    for p, s in zip(prompts, seeds):
        h = min(3, len(s.spans))
        reqs += [ThoughtRequest(p, n=3), ThoughtRequest(p, n=3, prefix_ids=tuple(s.response_ids[: s.spans[h - 1][1]]), prefix_spans=tuple(s.spans[:h]))]
    sampling = SamplingParams(temperature=1.0, seed=2)
    out, stats = {}, {}
    for cost in (10**9, 40):
        engine = hf.HFEngine(engine64.model, engine64.tokenizer, max_batch_rows=9, cohort_cost=cost)
        batch = engine.continuous_batch()
        handle = batch.submit_thoughts(reqs, LIMITS, sampling)
        batch.run([handle])
        out[cost], stats[cost] = [[c.response_ids for c in g] for g in handle.result], batch.stats
    assert out[10**9] == out[40]
    assert stats[10**9]["cohorts_opened"] == 1 and stats[10**9]["merges"] == 0
    assert stats[40]["cohorts_opened"] > 1 and stats[40]["merges"] > 0


def test_a_reset_prefix_started_from_its_seeds_kept_kv_samples_what_a_prefill_does(engine64):
    """Prefix reuse: x* = prompt + the seed's thoughts 1..2 started from the KV the seed computed
    (no prefill of x*) draws the suffixes a prefill of x* draws; kept KV is handed over once and
    freed on request, and KV of another context is not used."""
    from srpo_core import templates
    from srpo_core.tasks import synthetic

    (prompt, other) = [tuple(engine64.encode(templates.rollout_prompt("tiny_rollout_v1", p.question))) for p in synthetic.make_split("test", 2, 11)]
    batch = engine64.continuous_batch()
    seeds = batch.submit_thoughts([ThoughtRequest(prompt, n=2)], LIMITS, SamplingParams(temperature=1.0, seed=5), retain=True)
    batch.run([seeds])
    seed = seeds.result[0][0]
    assert len(seed.spans) >= 3
    kv = seeds.take_kv(0, 0)
    assert seeds.take_kv(0, 0) is None  # handed over once
    assert kv.tokens[: len(prompt)] == prompt and list(kv.tokens[len(prompt):]) == seed.response_ids[: len(kv.tokens) - len(prompt)]
    assert len(kv.tokens) >= len(prompt) + len(seed.response_ids) - 1  # all but (at most) the last token fed
    seeds.drop_kv(0, 1)
    assert not seeds.reqs[0].kv  # nothing kept any more

    ends = [seed.spans[1][1], seed.spans[0][1]]  # x* for h* = 3 and h* = 2: two reused contexts of other lengths
    resets = [ThoughtRequest(prompt, n=4, prefix_ids=tuple(seed.response_ids[:end]), prefix_spans=tuple(seed.spans[: h - 1])) for end, h in zip(ends, (3, 2))]
    fresh_req = ThoughtRequest(other, n=2)
    sampling = SamplingParams(temperature=1.0, seed=9)
    prefilled = engine64.generate_thoughts([*resets, fresh_req], LIMITS, sampling)
    reused = engine64.continuous_batch()
    handle = reused.submit_thoughts([*resets, fresh_req], LIMITS, sampling, reuse=[kv, kv, kv])  # kv does not cover `other`
    reused.run([handle])
    assert reused.stats["reused_prefixes"] == 2 and reused.stats["reuse_forwards"] == 1 and reused.stats["reused_tokens"] == sum(len(prompt) + e - 1 for e in ends)
    assert reused.stats["prefills"] == 1 and reused.stats["prefill_tokens"] == len(other)  # only the other context was prefilled
    assert reused.stats["cohorts_opened"] == 1  # the prefilled and the reused rows were joined into one cohort
    assert not kv.covers(list(prompt) + list(seed.response_ids[: ends[0]]), "other-weights")  # KV of other weights is never reused
    for a, b in zip(prefilled, handle.result):
        assert [c.response_ids for c in a] == [c.response_ids for c in b] and [c.spans for c in a] == [c.spans for c in b]
        for x, y in zip(a, b):  # float64: the two encodings of x* differ by reduction order only (~1e-15)
            assert x.logprobs == pytest.approx(y.logprobs, abs=1e-9)
    assert len({tuple(c.response_ids) for c in handle.result[0]}) > 1


def test_the_event_step_starts_every_suffix_group_from_its_seed_and_keeps_no_kv(engine64, tiny_model_path, monkeypatch):
    """In the event path no x* is prefilled: each suffix group starts from its seed's KV, and the
    KV the seed search kept is all taken or freed by the end of the step."""
    batches, handles = [], []
    real_batch, real_submit = hf.HFEngine.continuous_batch, hf.ContinuousBatch.submit_thoughts
    monkeypatch.setattr(hf.HFEngine, "continuous_batch", lambda self, max_rows=None: batches.append(real_batch(self, max_rows)) or batches[-1])
    monkeypatch.setattr(hf.ContinuousBatch, "submit_thoughts", lambda self, *a, **k: handles.append(real_submit(self, *a, **k)) or handles[-1])
    _, result = _step(engine64, tiny_model_path, "events", 1, **SCENARIOS["srpo-self-1x4"])
    (batch,) = batches
    suffix_groups = {r.group_id for r in result.records if r.group == "shared_prefix"}
    assert len(suffix_groups) > 0 and batch.stats["reused_prefixes"] == len(suffix_groups)
    assert all(not req.kv for h in handles for req in h.reqs)
    del batches[:]
    gc.collect()
    assert not [o for o in gc.get_objects() if type(o) is hf.PrefixKV]  # no copy of a chain's KV outlives the step

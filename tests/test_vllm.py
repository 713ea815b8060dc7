"""The vLLM engine.

Everywhere: its thought bookkeeping (one call per thought, `n=G` for a shared prefix, stop string
kept, EOS dropped, caps, seeds) runs against `FakeLLM`, a stand-in with vLLM's offline-API
semantics (`LLM.generate` over `TokensPrompt`s, `SamplingParams` with `stop` +
`include_stop_str_in_output`, `logprobs=0`, `prompt_logprobs`, per-request seeds with `seed + i`
for the `n` children) computed by the HF tiny model; chains must equal the HF engine's. The event
scheduler's batch on vLLM's engine loop (`StepBatch`) runs against `FakeLLMEngine`, a stand-in for
`LLM.llm_engine` (`add_request` / `step` finishing a few requests per step).

Where vLLM and a GPU are present: the same comparisons against a real `vllm.LLM`, with and without a
LoRA adapter, and the inference server with `--engine vllm` passing the weight-sync canary.
"""

from __future__ import annotations

import itertools
import types
from collections import namedtuple

import pytest
import torch
import torch.nn.functional as F

from srpo_core import templates
from srpo_core.engine.base import SamplingParams, ThoughtLimits, ThoughtRequest
from srpo_core.engine.hf import HFEngine, _cache_of
from srpo_core.engine.vllm import VLLMEngine, VLLMOptions, derive_seed, vllm_import_error
from srpo_core.tasks import synthetic

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GREEDY = SamplingParams(temperature=0.0)
LIMITS = ThoughtLimits(max_thoughts=20, max_thought_tokens=16, max_response_tokens=256, max_model_len=512)
TIGHT = ThoughtLimits(max_thoughts=6, max_thought_tokens=5, max_response_tokens=40, max_model_len=512)


# ---- a stand-in for vLLM's offline API -----------------------------------------------------------------

Logprob = namedtuple("Logprob", "logprob rank decoded_token")
LoRARequest = namedtuple("LoRARequest", "lora_name lora_int_id lora_path")


class FakeSamplingParams:
    DEFAULTS = dict(n=1, temperature=1.0, top_p=1.0, top_k=-1, seed=None, max_tokens=16, stop=None, include_stop_str_in_output=False, logprobs=None, prompt_logprobs=None, skip_special_tokens=True,
                    output_kind="CUMULATIVE")

    def __init__(self, **kw):
        unknown = set(kw) - set(self.DEFAULTS)
        assert not unknown, f"not a vLLM SamplingParams field: {unknown}"
        self.__dict__.update({**self.DEFAULTS, **kw})


def FakeTokensPrompt(prompt_token_ids):  # vllm.inputs.TokensPrompt is a TypedDict
    return {"prompt_token_ids": list(prompt_token_ids)}


class FakeLLMEngine:
    """vLLM's engine loop (`LLM.llm_engine`): `add_request` queues, `step` finishes at most
    `per_step` of the oldest requests (computed by the FakeLLM) and returns their RequestOutputs,
    so requests finish over several steps and new ones are added between them."""

    def __init__(self, llm: "FakeLLM", per_step: int = 3):
        self.llm, self.per_step = llm, per_step
        self.pending: list = []
        self.added: list[tuple[str, int, FakeSamplingParams]] = []  # (request id, prompt length, params)

    def add_request(self, request_id, prompt, params, lora_request=None):
        assert isinstance(request_id, str) and isinstance(prompt, dict) and request_id not in {r for r, _, _ in self.pending}
        self.pending.append((request_id, prompt["prompt_token_ids"], params))
        self.added.append((request_id, len(prompt["prompt_token_ids"]), params))

    def has_unfinished_requests(self) -> bool:
        return bool(self.pending)

    def step(self):
        """As vLLM v1 with FINAL_ONLY outputs: a finished request once, all its n completions (in
        no particular order: callers sort by `index`); anything else is refused (with the default
        cumulative outputs a request of n > 1 comes back one child at a time)."""
        done, self.pending = self.pending[: self.per_step], self.pending[self.per_step:]
        for _, _, sp in done:
            assert sp.output_kind == "FINAL_ONLY", "the step batch must ask for final outputs"
        return [types.SimpleNamespace(request_id=rid, finished=True, prompt_token_ids=ids, outputs=[self.llm._one(ids, sp, i) for i in range(sp.n)][::-1]) for rid, ids, sp in done]

    def abort_request(self, request_ids):
        self.pending = [p for p in self.pending if p[0] not in set(request_ids)]


class FakeLLM:
    """`vllm.LLM.generate` semantics, computed by an HF model without a KV cache."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.cache_kw = HFEngine(model, tokenizer)._cache_kw
        self.calls: list[list[tuple[int, FakeSamplingParams]]] = []
        self.llm_engine = FakeLLMEngine(self)

    def get_tokenizer(self):
        return self.tokenizer

    @torch.no_grad()
    def _logits(self, ids):
        return self.model(input_ids=torch.tensor([ids])).logits[0].float()

    @torch.no_grad()
    def _step(self, ids, state):
        """Next-token logits with a KV cache: prefill once, then one token per call."""
        if state.get("cache") is None:
            out = self.model(input_ids=torch.tensor([ids]), use_cache=True)
        else:
            out = self.model(input_ids=torch.tensor([ids[-1:]]), use_cache=True, **{self.cache_kw: state["cache"]})
        state["cache"] = _cache_of(out)
        return out.logits[0, -1].float()

    def _sample(self, ids, sp, gen, state):
        logits = self._step(ids, state)
        if sp.temperature == 0:
            tok = int(logits.argmax())
            return tok, float(F.log_softmax(logits, -1)[tok])
        scaled = logits / sp.temperature
        if sp.top_k > 0:
            kth = torch.topk(scaled, sp.top_k).values[-1]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        if sp.top_p < 1:
            srt, order = torch.sort(scaled, descending=True)
            probs = srt.softmax(-1)
            drop = probs.cumsum(-1) - probs > sp.top_p
            scaled = torch.full_like(scaled, float("-inf")).scatter(0, order, srt.masked_fill(drop, float("-inf")))
        tok = int(torch.multinomial(scaled.softmax(-1), 1, generator=gen))
        return tok, float(F.log_softmax(scaled, -1)[tok])  # processed_logprobs

    def _one(self, prompt, sp, index):
        gen = torch.Generator()
        if sp.seed is not None:
            gen.manual_seed(sp.seed + index)
        toks, lps, finish, reason, state = [], [], "length", None, {}
        for _ in range(sp.max_tokens):
            tok, lp = self._sample(prompt + toks, sp, gen, state)
            toks.append(tok), lps.append(lp)
            if tok == self.tokenizer.eos_token_id:
                finish = "stop"
                break
            text = self.tokenizer.decode(toks, skip_special_tokens=sp.skip_special_tokens)
            hit = next((s for s in sp.stop or [] if s in text), None)
            if hit is not None:
                finish, reason = "stop", hit
                break
        return types.SimpleNamespace(index=index, token_ids=toks, logprobs=[{t: Logprob(lp, 1, None)} for t, lp in zip(toks, lps)], finish_reason=finish, stop_reason=reason, text=None)

    def _prompt_logprobs(self, ids):
        logp = F.log_softmax(self._logits(ids), -1)
        out = [None]
        for pos in range(1, len(ids)):
            row, tok = logp[pos - 1], ids[pos]
            top = int(row.argmax())
            entry = {tok: Logprob(float(row[tok]), int((row > row[tok]).sum()) + 1, None)}
            entry.setdefault(top, Logprob(float(row[top]), 1, None))
            out.append(entry)
        return out

    def generate(self, prompts, sampling_params, use_tqdm=True, lora_request=None):
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        assert len(params) == len(prompts) and all(isinstance(p, dict) for p in prompts)
        self.calls.append([(len(p["prompt_token_ids"]), sp) for p, sp in zip(prompts, params)])
        outs = []
        for p, sp in zip(prompts, params):
            ids = p["prompt_token_ids"]
            outs.append(types.SimpleNamespace(
                prompt_token_ids=ids, outputs=[self._one(ids, sp, i) for i in range(sp.n)],
                prompt_logprobs=self._prompt_logprobs(ids) if sp.prompt_logprobs is not None else None,
            ))  # fmt: skip
        return outs


FAKE_API = types.SimpleNamespace(LLM=None, SamplingParams=FakeSamplingParams, TokensPrompt=FakeTokensPrompt, LoRARequest=LoRARequest,
                                 RequestOutputKind=types.SimpleNamespace(FINAL_ONLY="FINAL_ONLY"))


@pytest.fixture
def fake(tiny_model):
    model, tok = tiny_model
    return VLLMEngine(llm=FakeLLM(model, tok), api=FAKE_API)


def prompts(engine, n, seed=3):
    return [engine.encode(templates.rollout_prompt("tiny_rollout_v1", p.question)) for p in synthetic.make_split("test", n, seed)]


def assert_scripted_chain(r, pieces: list[list[int]], tok, adapter_version: str) -> None:
    """The chain read from scripted calls, one thought per call (`pieces`: each call's token ids,
    the last ending in EOS): the ids concatenated with the EOS dropped, one span per call, finish
    "eos", one logprob per response token, the engine's adapter version."""
    assert r.finish_reason == "eos" and tok.eos_token_id not in r.response_ids
    assert r.response_ids == [t for p in pieces for t in p][:-1]
    ends = list(itertools.accumulate(len(p) for p in pieces))
    ends[-1] -= 1  # the EOS token
    assert r.spans == list(zip([0] + ends[:-1], ends))
    assert len(r.logprobs) == len(r.response_ids) and r.adapter_version == adapter_version


def assert_same(got, want, lp_tol=1e-4):
    for g, w in zip(got, want, strict=True):
        for a, b in zip(g, w, strict=True):
            assert (a.response_ids, a.spans, a.finish_reason, a.thoughts, a.prefix_len) == (b.response_ids, b.spans, b.finish_reason, b.thoughts, b.prefix_len)
            assert a.logprobs == pytest.approx(b.logprobs, abs=lp_tol)


# ---- the engine's bookkeeping against the stand-in (runs everywhere) -------------------------------------

def test_greedy_chains_equal_the_hf_engine(fake, hf):
    reqs = [ThoughtRequest(tuple(p), n=1) for p in prompts(hf, 8)]
    for limits in (LIMITS, TIGHT):  # the tight caps cut thoughts and stop chains
        assert_same(fake.generate_thoughts(reqs, limits, GREEDY), hf.generate_thoughts(reqs, limits, GREEDY))
    reasons = {g[0].finish_reason for g in fake.generate_thoughts(reqs, TIGHT, GREEDY)}
    assert reasons - {"answer"}, "the tight caps should end some chains early"


def test_one_call_per_thought_with_n_g_for_a_shared_prefix(fake, hf):
    ps = prompts(hf, 3)
    seeds = [g[0] for g in hf.generate_thoughts([ThoughtRequest(tuple(p)) for p in ps], LIMITS, GREEDY)]
    reqs = [ThoughtRequest(tuple(p), n=4, prefix_ids=tuple(s.response_ids[: s.spans[1][1]]), prefix_spans=tuple(s.spans[:2])) for p, s in zip(ps, seeds)]
    fake.llm.calls.clear()
    got = fake.generate_thoughts(reqs, LIMITS, GREEDY)
    assert_same(got, hf.generate_thoughts(reqs, LIMITS, GREEDY))
    first = fake.llm.calls[0]
    # round 0: one vLLM request per ThoughtRequest, n = G, context = prompt + prefix
    assert [(length, sp.n) for length, sp in first] == [(len(r.prompt_ids) + len(r.prefix_ids), 4) for r in reqs]
    for _, sp in first:
        assert sp.stop == ["</thought>"] and sp.include_stop_str_in_output and sp.logprobs == 0 and sp.max_tokens == LIMITS.max_thought_tokens
    # later rounds: every live chain alone (n=1), re-sending its growing context
    assert all(sp.n == 1 for call in fake.llm.calls[1:] for _, sp in call)
    longest = max(len(r.spans) - len(req.prefix_spans) for req, g in zip(reqs, got) for r in g)
    assert len(fake.llm.calls) == longest  # one generate call per thought round
    for req, group in zip(reqs, got):
        for r in group:
            assert r.response_ids[: r.prefix_len] == list(req.prefix_ids) and r.spans[:2] == list(req.prefix_spans)
            assert len(r.logprobs) == r.generated_tokens


def test_caps_hold_and_seeds_reproduce_when_sampling(fake, hf):
    limits = ThoughtLimits(max_thoughts=4, max_thought_tokens=6, max_response_tokens=30, max_model_len=60)
    reqs = [ThoughtRequest(tuple(p), n=4) for p in prompts(hf, 4)]
    out = fake.generate_thoughts(reqs, limits, SamplingParams(temperature=1.5, top_p=0.9, seed=1))
    for req, rollouts in zip(reqs, out):
        for r in rollouts:
            assert len(r.spans) <= limits.max_thoughts and len(r.response_ids) <= limits.max_response_tokens
            assert all(0 < b - a <= limits.max_thought_tokens for a, b in r.spans)
            assert len(req.prompt_ids) + len(r.response_ids) <= limits.max_model_len
            assert r.spans[0][0] == 0 and r.spans[-1][1] == len(r.response_ids)
            assert all(r.spans[i][1] == r.spans[i + 1][0] for i in range(len(r.spans) - 1))
            assert len(r.logprobs) == r.generated_tokens
    ids = lambda o: [r.response_ids for g in o for r in g]
    again = fake.generate_thoughts(reqs, limits, SamplingParams(temperature=1.5, top_p=0.9, seed=1))
    other = fake.generate_thoughts(reqs, limits, SamplingParams(temperature=1.5, top_p=0.9, seed=2))
    assert ids(out) == ids(again) and ids(out) != ids(other)
    assert len({tuple(r.response_ids) for r in out[0]}) > 1, "the n children of a request must get different seeds"
    seeds = [sp.seed for call in fake.llm.calls for _, sp in call]
    assert all(isinstance(s, int) and 0 <= s < 2**31 - 1024 for s in seeds)
    assert derive_seed(1, 2, 3) == derive_seed(1, 2, 3) != derive_seed(1, 2, 4)


def test_complete_and_teacher_force_equal_the_hf_engine(fake, hf):
    texts = [templates.localization_prompt("tiny_localization_v1", p.question, synthetic.corrupt(p, __import__("random").Random(0))[0]) for p in synthetic.make_split("test", 4, 1)]
    ps = [hf.encode(t) for t in texts]
    for a, b in zip(fake.complete(ps, 8, GREEDY), hf.complete(ps, 8, GREEDY), strict=True):
        assert (a.ids, a.text, a.finish_reason) == (b.ids, b.text, b.finish_reason)
        assert hf.tokenizer.eos_token_id not in a.ids
    flat = [g[0] for g in hf.generate_thoughts([ThoughtRequest(tuple(p)) for p in prompts(hf, 4)], LIMITS, GREEDY)]
    for a, b in zip(fake.teacher_force([r.prompt_ids for r in flat], [r.response_ids for r in flat]), hf.teacher_force([r.prompt_ids for r in flat], [r.response_ids for r in flat]), strict=True):
        assert a.greedy_ids == b.greedy_ids and a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    with pytest.raises(NotImplementedError, match="temperature 1.0"):
        fake.teacher_force([flat[0].prompt_ids], [flat[0].response_ids], 0.7)


def test_eos_ends_the_chain_and_is_dropped(tiny_model):
    """vLLM returns the EOS token in token_ids with finish_reason 'stop' and stop_reason None."""
    _, tok = tiny_model
    thought = tok.encode("1+2=3</thought>", add_special_tokens=False)
    tail = tok.encode("3*3", add_special_tokens=False) + [tok.eos_token_id]
    script = [(thought, "stop", "</thought>"), (tail, "stop", None)]

    class Scripted:
        def get_tokenizer(self):
            return tok

        def generate(self, prompts, params, use_tqdm=True, lora_request=None):
            ids, finish, reason = script.pop(0)
            comp = types.SimpleNamespace(index=0, token_ids=ids, logprobs=[{t: Logprob(-0.5, 1, None)} for t in ids], finish_reason=finish, stop_reason=reason)
            return [types.SimpleNamespace(outputs=[comp])]

    eng = VLLMEngine(llm=Scripted(), api=FAKE_API, adapter_version="v7")
    (r,), = eng.generate_thoughts([ThoughtRequest((5, 6))], LIMITS, GREEDY)
    assert_scripted_chain(r, [thought, tail], tok, "v7")
    assert r.thoughts == ["1+2=3</thought>", "3*3"]


def _stepped(engine, reqs, limits, sampling, per_step=3):
    engine.llm.llm_engine.per_step = per_step
    batch = engine.continuous_batch()
    handle = batch.submit_thoughts(reqs, limits, sampling)
    batch.run([handle])
    return handle.result, batch


def test_the_step_batch_runs_thoughts_as_vllm_requests_that_join_between_steps(fake, hf):
    """The event path's batch on vLLM's engine loop: greedy chains equal the HF engine's (and so
    the offline path's), with the thought caps applied per chain as each thought request
    finishes; a shared prefix's first thought is one request with n = G, later thoughts one
    request per chain, queued while other requests are still in the engine."""
    ps = prompts(hf, 4)
    seeds = [g[0] for g in hf.generate_thoughts([ThoughtRequest(tuple(p)) for p in ps[:2]], LIMITS, GREEDY)]
    reqs = [ThoughtRequest(tuple(p)) for p in ps] + [ThoughtRequest(tuple(p), n=3, prefix_ids=tuple(s.response_ids[: s.spans[0][1]]), prefix_spans=tuple(s.spans[:1])) for p, s in zip(ps, seeds)]
    for limits in (LIMITS, TIGHT):
        core = fake.llm.llm_engine
        core.added.clear()
        got, batch = _stepped(fake, reqs, limits, GREEDY)
        assert_same(got, hf.generate_thoughts(reqs, limits, GREEDY))
        first = core.added[: len(reqs)]
        assert [(length, sp.n) for _, length, sp in first] == [(len(r.prompt_ids) + len(r.prefix_ids), r.n) for r in reqs]
        assert all(sp.n == 1 and sp.stop == [limits.stop] and sp.max_tokens == limits.max_thought_tokens for _, _, sp in core.added[len(reqs):])
        assert len(core.added) == len(reqs) + sum(len(r.spans) - len(q.prefix_spans) - 1 for q, g in zip(reqs, got) for r in g)  # one request per later thought of every chain
        assert batch.stats["decode_steps"] > len(core.added) // 3  # finished over many steps (3 per step here)
    done = fake.continuous_batch()
    texts = [templates.localization_prompt("tiny_localization_v1", p.question, synthetic.corrupt(p, __import__("random").Random(0))[0]) for p in synthetic.make_split("test", 3, 1)]
    handle = done.submit_complete([hf.encode(t) for t in texts], 8, GREEDY)
    done.run([handle])
    assert [(c.ids, c.finish_reason) for c in handle.result] == [(c.ids, c.finish_reason) for c in hf.complete([hf.encode(t) for t in texts], 8, GREEDY)]


def test_a_chain_on_the_step_batch_is_seeded_by_its_request_not_its_neighbours(fake, hf):
    reqs = [ThoughtRequest(tuple(p), n=3) for p in prompts(hf, 3)]
    sampling = SamplingParams(temperature=1.0, seed=4)
    ids = lambda out: [[r.response_ids for r in g] for g in out]  # noqa: E731
    together, _ = _stepped(fake, reqs, LIMITS, sampling, per_step=5)
    one_by_one, _ = _stepped(fake, reqs, LIMITS, sampling, per_step=1)
    alone = [_stepped(fake, [r], LIMITS, sampling)[0][0] for r in reqs]
    assert ids(together) == ids(one_by_one) == ids(alone)
    assert len({tuple(r.response_ids) for r in together[0]}) > 1  # the n chains of a request differ
    assert ids(_stepped(fake, reqs, LIMITS, SamplingParams(temperature=1.0, seed=5))[0]) != ids(together)
    # a context asked twice gets independent chains; a shared `seen` numbers them on across submissions
    batch, seen = fake.continuous_batch(), {}
    twice = batch.submit_thoughts([reqs[0], reqs[0]], LIMITS, sampling)
    first = batch.submit_thoughts([reqs[0]], LIMITS, sampling, seen=seen)
    second = batch.submit_thoughts([reqs[0]], LIMITS, sampling, seen=seen)
    batch.run([twice, first, second])
    twice, first, second = ids(twice.result), ids(first.result), ids(second.result)
    assert twice[0] == first[0] == ids(together)[0] and twice[1] == second[0] != twice[0]


def test_a_failed_step_leaves_no_request_in_vllms_engine(fake, hf):
    batch = fake.continuous_batch()
    batch.submit_thoughts([ThoughtRequest(tuple(p), n=2) for p in prompts(hf, 2)], LIMITS, SamplingParams(temperature=1.0, seed=1))
    with pytest.raises(RuntimeError, match="stop here"), batch:
        batch.step()
        raise RuntimeError("stop here")
    assert not batch.live and not fake.llm.llm_engine.has_unfinished_requests()


def test_the_event_driven_reset_step_runs_on_vllms_engine_loop(fake, tiny_model_path):
    """`rollout.scheduler: events` with the vLLM engine: SRPO's step (seed search, base fill,
    self-localization, suffixes) on the step batch, each prompt with its budget of 8 trained
    rollouts, reproducible and independent of how many requests the engine finishes per step."""
    from srpo_core import data_order, step
    from srpo_core.config import ConfigError, load_config
    from srpo_core.records import records_jsonl
    from srpo_core.tasks import get_task

    over = {"train.prompts_per_step": 4, "train.mini_batch_prompts": 4, "rollout.engine": "vllm", "rollout.scheduler": "events", "method.localizer": "self"}
    cfg = load_config("tiny", {"model.name_or_path": tiny_model_path, **over})
    assert step.scheduled_by_events(cfg, fake) and not step.scheduled_by_events(cfg.override(**{"rollout.scheduler": "auto"}), fake)  # auto: batched on vLLM
    with pytest.raises(ConfigError, match="divergence localizer"):
        cfg.override(**{"method.localizer": "divergence"})
    runs = []
    for per_step in (4, 1):
        fake.llm.llm_engine.per_step = per_step
        runs.append(step.run_rollout_phases(fake, get_task("synthetic"), cfg, data_order.step_items(cfg, 1), 1))
    assert records_jsonl(runs[0].records, 1, cfg) == records_jsonl(runs[1].records, 1, cfg)
    trained: dict[str, int] = {}
    for r in runs[0].records:
        if r.group != "seed":
            trained[r.item.id] = trained.get(r.item.id, 0) + 1
    assert len(trained) == 4 and set(trained.values()) == {8}
    resets = [r for r in runs[0].records if r.group == "shared_prefix"]
    assert resets and all(len(r.rollout.logprobs) == r.rollout.generated_tokens for r in resets)


def test_lora_requests_never_reuse_an_id(fake):
    a, b = fake.make_lora_request("v1", "/a"), fake.make_lora_request("v1", "/b")
    assert a.lora_int_id != b.lora_int_id and a.lora_path == "/a"
    fake.use_adapter(b, "v1")
    assert fake.lora_request is b and fake.adapter_version == "v1"


def test_options_map_to_vllm_llm_arguments():
    kw = VLLMOptions(tensor_parallel_size=4, max_model_len=32768, max_lora_rank=64).llm_kwargs()
    assert kw["enable_prefix_caching"] is True and kw["enable_lora"] is True and kw["tensor_parallel_size"] == 4
    assert kw["max_lora_rank"] == 64 and kw["logprobs_mode"] == "processed_logprobs" and kw["max_model_len"] == 32768


# ---- the real vLLM (GPU machines) -------------------------------------------------------------------------

VLLM_MISSING = vllm_import_error()
needs_vllm = pytest.mark.skipif(
    VLLM_MISSING is not None or not torch.cuda.is_available(),
    reason=f"needs vLLM and a CUDA GPU (pip install -e '.[vllm]'): {VLLM_MISSING or 'no CUDA device'}",
)


@pytest.fixture(scope="module")
def real_vllm(tiny_model_path):
    # float32 so greedy chains and log-probs compare with the float32 HF engine
    return VLLMEngine(tiny_model_path, VLLMOptions(dtype="float32", enforce_eager=True, gpu_memory_utilization=0.3, max_model_len=512, max_lora_rank=16))


@pytest.fixture(scope="module")
def lora_dir(tiny_model_path, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_path), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    path = tmp_path_factory.mktemp("lora") / "adapter"
    model.save_pretrained(str(path))
    return path


@needs_vllm
@pytest.mark.slow
def test_real_vllm_greedy_equals_hf(real_vllm, hf):
    reqs = [ThoughtRequest(tuple(p), n=1) for p in prompts(hf, 10)]
    for limits in (LIMITS, TIGHT):
        assert_same(real_vllm.generate_thoughts(reqs, limits, GREEDY), hf.generate_thoughts(reqs, limits, GREEDY), lp_tol=1e-3)
    flat = [g[0] for g in hf.generate_thoughts(reqs[:4], LIMITS, GREEDY)]
    for a, b in zip(real_vllm.teacher_force([r.prompt_ids for r in flat], [r.response_ids for r in flat]), hf.teacher_force([r.prompt_ids for r in flat], [r.response_ids for r in flat])):
        assert a.greedy_ids == b.greedy_ids and a.logprobs == pytest.approx(b.logprobs, abs=1e-3)


@needs_vllm
@pytest.mark.slow
def test_real_vllm_step_batch_equals_hf_and_runs_the_event_step(real_vllm, hf, tiny_model_path):
    """The event path's batch on a real vLLM engine loop (`LLM.llm_engine.add_request` / `step`):
    greedy chains equal the HF engine's, and SRPO's event-driven step gives every prompt its
    budget of 8 trained rollouts."""
    from srpo_core import data_order, step
    from srpo_core.config import load_config
    from srpo_core.tasks import get_task

    ps = prompts(hf, 6)
    seed = hf.generate_thoughts([ThoughtRequest(tuple(ps[0]))], LIMITS, GREEDY)[0][0]
    reqs = [ThoughtRequest(tuple(p), n=1) for p in ps] + [ThoughtRequest(tuple(ps[0]), n=3, prefix_ids=tuple(seed.response_ids[: seed.spans[0][1]]), prefix_spans=tuple(seed.spans[:1]))]
    batch = real_vllm.continuous_batch()
    handle = batch.submit_thoughts(reqs, LIMITS, GREEDY)  # the n=3 request comes back once, with its 3 chains (FINAL_ONLY)
    batch.run([handle])
    assert_same(handle.result, hf.generate_thoughts(reqs, LIMITS, GREEDY), lp_tol=1e-3)
    cfg = load_config("tiny", {"model.name_or_path": tiny_model_path, "train.prompts_per_step": 8, "rollout.engine": "vllm", "rollout.scheduler": "events", "method.localizer": "self"})
    result = step.run_rollout_phases(real_vllm, get_task("synthetic"), cfg, data_order.step_items(cfg, 0), 0)
    trained: dict[str, int] = {}
    for r in result.records:
        if r.group != "seed":
            trained[r.item.id] = trained.get(r.item.id, 0) + 1
    assert len(trained) == 8 and set(trained.values()) == {8}


@needs_vllm
@pytest.mark.slow
def test_real_vllm_lora_equals_peft(real_vllm, hf, lora_dir, tiny_model_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    peft_engine = HFEngine(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_path), str(lora_dir)).eval(), hf.tokenizer)
    try:
        real_vllm.use_adapter(real_vllm.make_lora_request("t1", str(lora_dir)), "t1")
        reqs = [ThoughtRequest(tuple(p), n=1) for p in prompts(hf, 6)]
        assert_same(real_vllm.generate_thoughts(reqs, LIMITS, GREEDY), peft_engine.generate_thoughts(reqs, LIMITS, GREEDY), lp_tol=1e-3)
        assert all(r.adapter_version == "t1" for g in real_vllm.generate_thoughts(reqs[:2], LIMITS, GREEDY) for r in g)
    finally:
        real_vllm.use_adapter(None, None)


@needs_vllm
@pytest.mark.slow
def test_server_with_vllm_engine_passes_the_canary(tiny_model_path, lora_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from srpo_core.runtime import load_tokenizer
    from srpo_core.server import canary_check, start_server

    ref = HFEngine(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_path), str(lora_dir)).eval(), load_tokenizer(tiny_model_path))
    with start_server(
        tiny_model_path, engine="vllm", dtype="float32", workdir=tmp_path, extra_args=["--enforce-eager", "--gpu-memory-utilization", "0.3", "--max-model-len", "512", "--max-lora-rank", "16"]
    ) as srv:
        eng = srv.engine()
        eng.load_adapter(str(lora_dir), "g1")
        result = canary_check(eng, ref, "g1", tol=1e-3, mean_tol=1e-4)
        assert result.max_abs_diff <= 1e-3
        out = eng.generate_thoughts([ThoughtRequest(tuple(p)) for p in prompts(ref, 3)], LIMITS, GREEDY)
        assert all(r.adapter_version == "g1" for g in out for r in g)

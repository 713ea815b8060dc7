"""vLLM rollout engine (GPUs) behind the `engine.base.RolloutEngine` interface; usable in-process
and inside the inference server (`python -m srpo_core.server --engine vllm`).

A thin layer over vLLM's offline API, written against its documented interface:

  - `vllm.LLM(model, enable_prefix_caching=True, enable_lora=True, tensor_parallel_size=...,
    logprobs_mode="processed_logprobs", ...)`, `LLM.generate(prompts, sampling_params,
    use_tqdm=False, lora_request=...)` returning one `RequestOutput` per prompt, in order;
  - prompts as token ids: `vllm.inputs.TokensPrompt(prompt_token_ids=[...])`;
  - `vllm.SamplingParams(n, temperature, top_p, top_k, seed, max_tokens, stop,
    include_stop_str_in_output=True, logprobs=0)`: `logprobs=0` returns the sampled token's
    log-prob at each step; `prompt_logprobs=1` (teacher forcing) returns, per prompt position,
    the given token's log-prob and the rank-1 (argmax) token;
  - `vllm.lora.request.LoRARequest(lora_name, lora_int_id, lora_path)` per adapter version.

Thought caps: one `generate` call per thought
---------------------------------------------
The paper ran vLLM one call per thought: the stop string `</thought>` ends a request, the engine
applies the chain-end rules of `engine.base` (answer / max_thoughts / max_response /
max_model_len; a thought cut at `max_thought_tokens` is kept and the chain goes on), and every live
chain re-sends prompt + response for its next thought. vLLM has no per-request hook to run that
bookkeeping mid-generation, and the rules need the decoded thought (`\\boxed{`), so thought
boundaries are exactly where control must come back to Python. With `enable_prefix_caching=True`
re-sending the growing context is cheap: every full KV block of prompt + earlier thoughts is a
cache hit (generated blocks are cached too), so each call prefills only the last partial block
(< block_size tokens) and decodes the new thought. The first thought of a request samples its `n`
chains as one vLLM request with `n=G` (the prompt + reset prefix is prefilled once for the G
suffixes); afterwards the chains diverge and each is its own `n=1` request, all live chains of a
round batched into one `generate` call. The chain bookkeeping is `engine.base.ThoughtChains`, shared with
the Hugging Face engine, so both engines end chains by the same code.

Stop strings: `include_stop_str_in_output=True` keeps `</thought>` in the thought; the token ids
returned are taken as the response (text is re-decoded from ids, never taken from vLLM's
detokenised text). An end-of-sequence (or generation-config stop token) ends the chain ("eos")
and is dropped from the response, as in the HF engine.

Log-probs: with `logprobs_mode="processed_logprobs"` (vLLM >= 0.10.2) the reported log-prob is of
the distribution actually sampled from: after temperature and after top-k/top-p masking
(renormalised over the kept tokens). With `top_p=1, top_k=0` that equals the HF engine's value
(log-softmax of logits / T); with truncation it is larger by -log(kept mass). The paper's loss
("pg") does not use rollout log-probs; the "clip" ablation should run with `top_p=1` on vLLM or
recompute them. `teacher_force` uses prompt log-probs, which vLLM computes from raw logits, so only
temperature 1.0 is supported there (the divergence localizer and the weight-sync canary use 1.0).

Seeds: every vLLM request gets its own seed derived from (sampling.seed, request, chain, thought);
vLLM gives the `n` children of a request seeds `seed + i`. Runs are reproducible for the same batch
composition; bf16 GPU kernels are not batch-invariant, so a different batch can change samples.

The event scheduler's batch: `continuous_batch()` -> `StepBatch`
-----------------------------------------------------------------
`rollout.scheduler: events` (srpo_core/scheduler.py) needs a batch that requests join while others
decode. vLLM's engine loop is one: `LLM.llm_engine.add_request(request_id, prompt, params,
lora_request=...)` queues a request, `step()` runs one scheduler iteration (continuous batching,
paged KV cache, prefills scheduled into the step) and returns the `RequestOutput`s it updated
(`finished` once done), `has_unfinished_requests()`. `StepBatch` gives the scheduler the HF
engine's `ContinuousBatch` interface on it: every live chain's next thought is its own request
(the first thought of a ThoughtRequest one request with `n` = its chains, as above), chain ends
are applied by `ThoughtChains` as each thought request finishes, and the chain's next thought is
queued in the same step. Prefix reuse is vLLM's automatic prefix caching (a reset prefix x* is a
prefix of its seed chain, whose blocks are cached), so `retain` / `reuse` are accepted and
ignored. Seeds are keyed by the request's content (sampling seed, salt, context, its index among
equal contexts), not by its position, so a chain samples the same tokens whichever requests share
the engine with it (up to the batch dependence of GPU kernels); they differ from the offline
path's position-keyed seeds (same distribution). The inference server keeps serving the vLLM
backend's calls in turn (`LLM.generate`): this batch is the in-process event path's, and has run
only against the stand-in of tests/test_vllm.py here (no GPU), so `rollout.scheduler: auto` keeps
the batched path on vLLM (`events` asks for it). Its requests ask for final outputs only
(`RequestOutputKind.FINAL_ONLY`, as `LLM.generate` does), so a request with `n` chains comes back
once, with all of them; `close()` aborts what is still in flight when a step fails; the divergence
localizer (teacher forcing through `LLM.generate`, which drains the same engine loop) is refused
with it by the config.

LoRA hot-loading: every `make_lora_request` gets a fresh integer id: vLLM caches adapters by id,
so re-using an id for new weights would silently serve the old ones.

`api=` and `llm=` let tests inject a stand-in for vLLM (tests/test_vllm.py runs this engine's
bookkeeping on CPU against a fake `LLM` over the HF tiny model; the real-vLLM tests skip where
vLLM is not importable).
"""

from __future__ import annotations

import hashlib
import itertools
import struct
import types
from dataclasses import dataclass, field
from typing import Any

from srpo_core.engine.base import Completion, Rollout, RolloutEngine, SamplingParams, ThoughtChains, ThoughtLimits, ThoughtRequest, TokenizerText, TokenScores, number_chains

INSTALL_HINT = "the vLLM engine needs the `vllm` package and a CUDA GPU: pip install -e '.[vllm]'"


def vllm_import_error() -> str | None:
    """None if vLLM is importable here, else the reason it is not."""
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # ImportError, or a CUDA/driver error raised at import
        return f"{type(exc).__name__}: {exc}"
    return None


def vllm_api() -> types.SimpleNamespace:
    """The vLLM names this engine uses (import-guarded)."""
    try:
        from vllm import LLM
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest
        from vllm.sampling_params import RequestOutputKind
    except Exception as exc:
        raise ImportError(f"{INSTALL_HINT} ({type(exc).__name__}: {exc})") from exc
    return types.SimpleNamespace(LLM=LLM, SamplingParams=VSamplingParams, TokensPrompt=TokensPrompt, LoRARequest=LoRARequest, RequestOutputKind=RequestOutputKind)


@dataclass(frozen=True)
class VLLMOptions:
    dtype: str = "bfloat16"
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.85
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    enable_lora: bool = True
    max_lora_rank: int = 64
    max_loras: int = 1  # adapters batched together on the GPU (one version at a time here)
    max_cpu_loras: int | None = None
    enforce_eager: bool = False
    seed: int = 0
    logprobs_mode: str | None = "processed_logprobs"  # None: vLLM's default (raw, before temperature)
    extra: dict = field(default_factory=dict)  # any other vllm.LLM / EngineArgs keyword

    def llm_kwargs(self) -> dict:
        kw: dict[str, Any] = {
            "dtype": self.dtype, "tensor_parallel_size": self.tensor_parallel_size,
            "gpu_memory_utilization": self.gpu_memory_utilization, "enable_prefix_caching": self.enable_prefix_caching,
            "enforce_eager": self.enforce_eager, "seed": self.seed,
        }  # fmt: skip
        if self.max_model_len:
            kw["max_model_len"] = self.max_model_len
        if self.enable_lora:
            kw.update(enable_lora=True, max_lora_rank=self.max_lora_rank, max_loras=self.max_loras)
            if self.max_cpu_loras:
                kw["max_cpu_loras"] = self.max_cpu_loras
        if self.logprobs_mode:
            kw["logprobs_mode"] = self.logprobs_mode
        kw.update(self.extra)
        return kw


def derive_seed(*parts: int) -> int:
    """A 31-bit seed from integers (stable across processes, unlike hash())."""
    digest = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**31 - 1024)  # room for vLLM's seed + child index


class VLLMEngine(TokenizerText, RolloutEngine):
    def __init__(self, model_path: str | None = None, options: VLLMOptions | None = None, *, llm=None, api=None, tokenizer=None, adapter_version: str | None = None):
        self.api = api if api is not None else vllm_api()
        self.options = options or VLLMOptions()
        if llm is None:
            if model_path is None:
                raise ValueError("VLLMEngine needs model_path (or an llm=)")
            llm = self.api.LLM(model=model_path, **self.options.llm_kwargs())
        self.llm = llm
        self.tokenizer = tokenizer if tokenizer is not None else llm.get_tokenizer()
        self.adapter_version = adapter_version
        self.lora_request = None  # the LoRARequest every call uses (None: the base model)
        self._next_lora_id = 1
        self.eos_id = self.tokenizer.eos_token_id

    # ---- adapters -----------------------------------------------------------------------------
    def make_lora_request(self, name: str, path: str):
        """A LoRARequest with a never-reused integer id (vLLM caches adapters by id)."""
        req = self.api.LoRARequest(name, self._next_lora_id, str(path))
        self._next_lora_id += 1
        return req

    def use_adapter(self, lora_request, version: str | None) -> None:
        self.lora_request, self.adapter_version = lora_request, version

    def preload_adapter(self, lora_request) -> None:
        """Load an adapter now (fail fast on a bad one) where vLLM exposes `add_lora`."""
        add = getattr(getattr(self.llm, "llm_engine", None), "add_lora", None)
        if add is not None:
            add(lora_request)

    def remove_adapter(self, lora_request) -> None:
        remove = getattr(getattr(self.llm, "llm_engine", None), "remove_lora", None)
        if remove is not None:
            try:
                remove(lora_request.lora_int_id)
            except Exception:  # not loaded (never used): nothing to free
                pass

    # ---- vLLM calls ------------------------------------------------------------------------------
    def _params(self, sampling: SamplingParams, n: int, seed: int, max_tokens: int, stop: str | None, final_only: bool = False):
        kw: dict[str, Any] = {
            "n": n, "temperature": max(0.0, sampling.temperature), "top_p": sampling.top_p,
            "top_k": sampling.top_k if sampling.top_k > 0 else -1, "max_tokens": max_tokens, "logprobs": 0,
            "skip_special_tokens": True,
        }  # fmt: skip
        if sampling.temperature > 0:
            kw["seed"] = seed
        if stop:
            kw.update(stop=[stop], include_stop_str_in_output=True)
        if final_only:  # the engine loop's default is cumulative outputs, one child at a time for n > 1 (LLM.generate sets this itself)
            kw["output_kind"] = self.api.RequestOutputKind.FINAL_ONLY
        return self.api.SamplingParams(**kw)

    def _generate(self, prompts: list[list[int]], params: list) -> list:
        if not prompts:
            return []
        return self.llm.generate([self.api.TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False, lora_request=self.lora_request)

    @staticmethod
    def _tokens(comp) -> tuple[list[int], list[float], bool, object]:
        """(token ids, sampled-token log-probs, ended by EOS/stop token, stop_reason)."""
        toks = list(comp.token_ids)
        lps = [float(entry[t].logprob) for t, entry in zip(toks, comp.logprobs or [])]
        if len(lps) != len(toks):
            raise RuntimeError(f"vLLM returned {len(toks)} tokens but {len(lps)} log-probs (is logprobs=0 honoured?)")
        eos = comp.finish_reason == "stop" and not isinstance(comp.stop_reason, str)
        return toks, lps, eos, comp.stop_reason

    def _drop_eos(self, toks: list[int], lps: list[float], stop_reason) -> None:
        end_ids = {self.eos_id} | ({stop_reason} if isinstance(stop_reason, int) else set())
        if toks and toks[-1] in end_ids:
            toks.pop(), lps.pop()

    # ---- RolloutEngine -----------------------------------------------------------------------------
    def generate_thoughts(self, requests: list[ThoughtRequest], limits: ThoughtLimits, sampling: SamplingParams) -> list[list[Rollout]]:
        rows_req = [i for i, r in enumerate(requests) for _ in range(r.n)]
        rows_chain = [j for r in requests for j in range(r.n)]
        chains = ThoughtChains(
            self,
            limits,
            [len(requests[i].prompt_ids) + len(requests[i].prefix_ids) for i in rows_req],
            [list(requests[i].prefix_ids) for i in rows_req],
            [list(requests[i].prefix_spans) for i in rows_req],
        )
        generated: list[list[int]] = [[] for _ in rows_req]
        logprobs: list[list[float]] = [[] for _ in rows_req]

        # round 0: each request's chains share prompt + prefix -> one vLLM request with n = G
        first: dict[int, list[int]] = {}
        for row, i in enumerate(rows_req):
            if chains.finish[row] is None:
                first.setdefault(i, []).append(row)
        batches = [(list(requests[i].prompt_ids) + list(requests[i].prefix_ids), rows, derive_seed(sampling.seed, i, 0, 0)) for i, rows in first.items()]
        thought = 0
        while batches:
            params = [self._params(sampling, len(rows), seed, limits.max_thought_tokens, limits.stop) for _, rows, seed in batches]
            outs = self._generate([ctx for ctx, _, _ in batches], params)
            for out, (_, rows, _) in zip(outs, batches):
                comps = sorted(out.outputs, key=lambda c: c.index)
                if len(comps) != len(rows):
                    raise RuntimeError(f"vLLM returned {len(comps)} completions for n={len(rows)}")
                for comp, row in zip(comps, rows):
                    toks, lps, eos, stop_reason = self._tokens(comp)
                    if eos:
                        self._drop_eos(toks, lps, stop_reason)
                    generated[row] += toks
                    logprobs[row] += lps
                    chains.land(row, generated[row], eos)
            thought += 1
            batches = [
                (list(requests[rows_req[row]].prompt_ids) + chains.prefixes[row] + generated[row], [row], derive_seed(sampling.seed, rows_req[row], rows_chain[row] + 1, thought))
                for row in range(len(rows_req)) if chains.finish[row] is None
            ]  # fmt: skip

        return chains.rollouts(requests, rows_req, generated, logprobs, self.adapter_version)

    def complete(self, prompts: list[list[int]], max_tokens: int, sampling: SamplingParams) -> list[Completion]:
        params = [self._params(sampling, 1, derive_seed(sampling.seed, i, 0, 0), max_tokens, None) for i in range(len(prompts))]
        out = []
        for res in self._generate([list(p) for p in prompts], params):
            toks, lps, eos, stop_reason = self._tokens(res.outputs[0])
            if eos:
                self._drop_eos(toks, lps, stop_reason)
            out.append(Completion(ids=toks, text=self.decode(toks), logprobs=lps, finish_reason="eos" if eos else "length", adapter_version=self.adapter_version))
        return out

    events_by_default = False  # `rollout.scheduler: auto` keeps the batched path here until the step batch has run on a GPU

    def continuous_batch(self, max_rows: int | None = None) -> "StepBatch":
        """A batch that requests join while others decode, on vLLM's engine loop (the event
        scheduler's; vLLM's own scheduler sizes the batch, so `max_rows` is not used)."""
        return StepBatch(self)

    def teacher_force(self, prompts: list[list[int]], responses: list[list[int]], temperature: float = 1.0) -> list[TokenScores]:
        if abs(temperature - 1.0) > 1e-9:
            raise NotImplementedError(f"VLLMEngine.teacher_force supports temperature 1.0 only (vLLM's prompt log-probs are computed from raw logits); got {temperature}")
        seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
        params = [self.api.SamplingParams(n=1, temperature=0.0, max_tokens=1, prompt_logprobs=1) for _ in seqs]
        out = []
        for res, p, r in zip(self._generate(seqs, params), prompts, responses):
            plp = res.prompt_logprobs  # [None, {tok: Logprob}, ...] one entry per prompt position
            lps, greedy = [], []
            for pos, tok in zip(range(len(p), len(p) + len(r)), r):
                entry = plp[pos]
                lps.append(float(entry[tok].logprob))
                greedy.append(next(t for t, lp in entry.items() if getattr(lp, "rank", None) == 1))
            out.append(TokenScores(logprobs=lps, greedy_ids=greedy))
        return out


# ---- the event scheduler's batch on vLLM's engine loop ---------------------------------------------


def request_key(seed: int, salt: int, context: list[int], index: int) -> int:
    """The seed key of one submitted request: (sampling seed, salt, its context, its index among
    the requests with that context and seed) -> int, stable across processes; independent of the
    other requests in flight."""
    h = hashlib.blake2b(digest_size=8)
    h.update(struct.pack(f"<qqq{len(context)}q", seed, salt, index, *context))
    return int.from_bytes(h.digest(), "little") & (2**62 - 1)


@dataclass(eq=False)
class _StepReq:
    """One request of a StepHandle: `n` chains continuing one context (or one completion)."""

    item: object  # the ThoughtRequest (thoughts) or the prompt ids (complete)
    context: list[int]
    key: int
    chains: ThoughtChains
    generated: list[list[int]]
    logprobs: list[list[float]]
    open_rows: int = 0


@dataclass(eq=False)
class StepHandle:
    """What one submission asked and, once `done`, its `result` in item order: the interface of
    engine.hf.DecodeHandle that srpo_core/scheduler.py uses."""

    kind: str  # "thoughts" | "complete"
    items: list
    reqs: list[_StepReq] = field(default_factory=list)
    open: int = 0
    result: list | None = None
    stream: bool = False
    limits: ThoughtLimits | None = None  # of a thoughts submission: its later thoughts use them
    sampling: SamplingParams | None = None

    @property
    def done(self) -> bool:
        return self.result is not None

    def row_done(self, i: int, j: int) -> bool:
        return self.reqs[i].chains.finish[j] is not None

    def row_rollout(self, engine: "VLLMEngine", i: int, j: int) -> Rollout:
        req = self.reqs[i]
        return req.chains.rollout(req.item, j, req.generated[j], req.logprobs[j], engine.adapter_version)

    def take_kv(self, i: int, j: int) -> None:  # prefix reuse is vLLM's prefix cache
        return None

    def drop_kv(self, i: int, j: int) -> None:
        return None

    def stop_retaining(self) -> None:
        return None


class StepBatch:
    """`ContinuousBatch`'s interface (submit_thoughts / submit_complete / step / finished_rows /
    busy / run) on vLLM's engine loop; see the module docstring."""

    _ids = itertools.count()  # request ids unique in the process (vLLM rejects a live duplicate)

    def __init__(self, engine: VLLMEngine):
        self.engine = engine
        self.core = engine.llm.llm_engine
        self.live: dict[str, tuple[StepHandle, int, list[int], int]] = {}  # vLLM request id -> (handle, request, rows, thought)
        self.finished: list[StepHandle] = []
        self.finished_rows: list[tuple[StepHandle, int, int]] = []
        self.stats = {"decode_steps": 0, "requests": 0}

    @property
    def busy(self) -> bool:
        return bool(self.live)

    def _add(self, handle: StepHandle, i: int, rows: list[int], thought: int, prompt: list[int], params) -> None:
        rid = f"srpo-step-{next(StepBatch._ids)}"
        self.core.add_request(rid, self.engine.api.TokensPrompt(prompt_token_ids=list(prompt)), params, lora_request=self.engine.lora_request)
        self.live[rid] = (handle, i, rows, thought)
        self.stats["requests"] += 1

    def _key(self, seen: dict, sampling: SamplingParams, salt: int, context: list[int], n: int) -> int:
        return request_key(sampling.seed, salt, context, number_chains(seen, sampling.seed, tuple(context), n))

    def submit_thoughts(self, requests: list[ThoughtRequest], limits: ThoughtLimits, sampling: SamplingParams, salt: int = 0, seen: dict | None = None, stream: bool = False,
                        retain: bool = False, reuse: list | None = None) -> StepHandle:
        """Queue requests (the first thought of each as one vLLM request with n = its live chains);
        `seen`, `stream` as ContinuousBatch's; `retain` / `reuse` are vLLM's prefix cache here."""
        handle, seen = StepHandle("thoughts", list(requests), stream=stream, limits=limits, sampling=sampling), {} if seen is None else seen
        for i, r in enumerate(requests):
            context = list(r.prompt_ids) + list(r.prefix_ids)
            chains = ThoughtChains(self.engine, limits, [len(context)] * r.n, [list(r.prefix_ids) for _ in range(r.n)], [list(r.prefix_spans) for _ in range(r.n)])
            req = _StepReq(r, context, self._key(seen, sampling, salt, context, r.n), chains, [[] for _ in range(r.n)], [[] for _ in range(r.n)])
            handle.reqs.append(req)
            rows = [j for j in range(r.n) if chains.finish[j] is None]
            req.open_rows = len(rows)
            if rows:
                handle.open += 1
                params = self.engine._params(sampling, len(rows), derive_seed(req.key, 0, 0), limits.max_thought_tokens, limits.stop, final_only=True)
                self._add(handle, i, rows, 0, context, params)
        self._maybe_close(handle)
        return handle

    def submit_complete(self, prompts: list[list[int]], max_tokens: int, sampling: SamplingParams, salt: int = 0, seen: dict | None = None) -> StepHandle:
        handle, seen = StepHandle("complete", [list(p) for p in prompts]), {} if seen is None else seen
        limits = ThoughtLimits(stop="", max_thoughts=1, max_thought_tokens=max_tokens, max_response_tokens=max_tokens, max_model_len=10**9)
        for i, p in enumerate(prompts):
            req = _StepReq(list(p), list(p), self._key(seen, sampling, salt, list(p), 1), ThoughtChains(self.engine, limits, [len(p)], [[]], [[]]), [[]], [[]], open_rows=1)
            handle.reqs.append(req)
            handle.open += 1
            self._add(handle, i, [0], 0, list(p), self.engine._params(sampling, 1, derive_seed(req.key, 0, 0), max_tokens, None, final_only=True))
        self._maybe_close(handle)
        return handle

    def _maybe_close(self, handle: StepHandle) -> None:
        if handle.open or handle.done:
            return
        if handle.kind == "thoughts":
            handle.result = [req.chains.rollouts([req.item], [0] * len(req.generated), req.generated, req.logprobs, self.engine.adapter_version)[0] for req in handle.reqs]
        else:
            handle.result = [
                Completion(ids=r.generated[0], text=self.engine.decode(r.generated[0]), logprobs=r.logprobs[0], finish_reason=r.chains.finish[0] or "length",
                           adapter_version=self.engine.adapter_version)
                for r in handle.reqs
            ]
        self.finished.append(handle)

    def step(self) -> list[StepHandle]:
        """One iteration of vLLM's engine loop; every thought request it finished is applied (the
        chain's next thought queued, or the chain ended). Returns the handles that finished."""
        if self.live:
            self.stats["decode_steps"] += 1
            for out in self.core.step():
                if not getattr(out, "finished", False) or out.request_id not in self.live:
                    continue
                handle, i, rows, thought = self.live.pop(out.request_id)
                comps = sorted(out.outputs, key=lambda c: c.index)
                if len(comps) != len(rows):
                    raise RuntimeError(f"vLLM returned {len(comps)} completions for n={len(rows)}")
                for comp, row in zip(comps, rows):
                    self._land(handle, i, row, thought, comp)
        out, self.finished = self.finished, []
        return out

    def _land(self, handle: StepHandle, i: int, row: int, thought: int, comp) -> None:
        eng, req = self.engine, handle.reqs[i]
        toks, lps, eos, stop_reason = eng._tokens(comp)
        if eos:
            eng._drop_eos(toks, lps, stop_reason)
        req.generated[row] += toks
        req.logprobs[row] += lps
        if handle.kind == "complete":
            req.chains.finish[row] = "eos" if eos else "length"
        else:
            req.chains.land(row, req.generated[row], eos)
        if req.chains.finish[row] is None:  # the chain goes on: its next thought, seeded per chain and thought
            context = list(req.item.prompt_ids) + req.chains.prefixes[row] + req.generated[row]
            params = eng._params(handle.sampling, 1, derive_seed(req.key, row + 1, thought + 1), handle.limits.max_thought_tokens, handle.limits.stop, final_only=True)
            self._add(handle, i, [row], thought + 1, context, params)
            return
        if handle.stream:
            self.finished_rows.append((handle, i, row))
        req.open_rows -= 1
        if req.open_rows == 0:
            handle.open -= 1
            self._maybe_close(handle)

    def run(self, handles: list[StepHandle]) -> None:
        """Step until every handle is done."""
        with self:
            while not all(h.done for h in handles):
                if not self.busy:
                    raise RuntimeError("vLLM step batch: handles still open with nothing in flight")
                self.step()

    def close(self) -> None:
        """Abort the requests still in vLLM's engine (after an error: the engine is shared with
        `LLM.generate`, whose loop would otherwise finish them)."""
        if self.live:
            self.core.abort_request(list(self.live))
            self.live.clear()

    def __enter__(self) -> "StepBatch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

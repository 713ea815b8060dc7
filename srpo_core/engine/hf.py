"""Hugging Face rollout engine (CPU or GPU): one continuous, batched, KV-cached decode per call.

Thought structure is tracked as the tokens come out instead of one engine call per thought: a
thought ends at the stop string or at `max_thought_tokens`, and the chain-end rules of
`engine.base` are stopping conditions checked at each thought end. The model sees exactly the
context it would see with one call per thought (prompt + every token so far), so the sampled
distribution is the same; `generate_thoughts_per_call` is that per-thought reference, built on
`model.generate` with a stop string, and the tests check both give identical greedy chains.

Each distinct context (prompt + reset prefix) is prefilled once and its KV cache is expanded to
its `n` samples, so a shared prefix is encoded once for its G suffixes; and where the context's
keys and values were already computed by an earlier chain (a reset prefix x* is a prefix of its
seed chain), a request can reuse them instead (`PrefixKV`: a finished row's KV kept on request,
see `ContinuousBatch`), so x* costs one one-token forward instead of a prefill. Every call runs on a
`ContinuousBatch`: requests join while others decode (as capacity frees, or as the event-driven
scheduler of srpo_core/scheduler.py submits them), finished rows leave.

Sampling is keyed per chain, not per batch: a chain's t-th token is drawn by inverse CDF from a
counter-based uniform keyed by (sampling seed, context, salt, chain index) (`chain_key`,
`chain_uniforms`), so a seeded chain samples the same tokens whichever rows share its batch, up to
the last-bit batch dependence of float logits (see tests/test_scheduler.py).
"""

from __future__ import annotations

import hashlib
import inspect
import struct
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from srpo_core import algos
from srpo_core.engine.base import Completion, Rollout, RolloutEngine, SamplingParams, ThoughtLimits, ThoughtRequest, TokenScores, number_chains
from srpo_core.engine.base import ThoughtChains as _Chains


def _cache_of(out):
    return out.cache if getattr(out, "cache", None) is not None else out.past_key_values


M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32) and a 32-bit constant c, without int64 overflow
    (the 16-bit halves of c keep every product below 2^49)."""
    return (x * (c & 0xFFFF) + ((x * (c >> 16)) & 0xFFFF) * 65536) & M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (C. Wellons): a bijective, well-avalanching 32-bit integer hash, on int64 tensors."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def chain_uniforms(key_hi: torch.Tensor, key_lo: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """The uniform in [0, 1) that draws token number `counter` of each chain: a counter-based
    generator keyed by the chain (two 32-bit words), so a chain's draws do not depend on which
    other rows share its batch or in which order they were admitted. [A] int64 x3 -> [A] float64
    with 53 random bits."""
    base = (counter * 2) & M32
    a = _mix32(_mix32(base ^ key_lo) ^ key_hi)
    b = _mix32(_mix32((base + 1) ^ key_lo) ^ _mix32(key_hi ^ 0x9E3779B9))
    return ((a >> 5) * 67108864 + (b >> 6)).double() / 2.0**53


def chain_key(seed: int, context: tuple[int, ...], salt: int, chain: int) -> tuple[int, int]:
    """The RNG key of one chain: (sampling seed, the context it continues, a salt, its index among
    the chains drawn from that context) -> two 32-bit words. Stable across processes (blake2b)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(struct.pack("<qqqq", seed, salt, chain, len(context)))
    h.update(struct.pack(f"<{len(context)}q", *context))
    v = int.from_bytes(h.digest(), "little")
    return v >> 32, v & M32


def _truncate(scaled: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    masked = scaled
    if top_k > 0:
        kth = torch.topk(masked, min(top_k, masked.shape[-1]), dim=-1).values[:, -1:]
        masked = masked.masked_fill(masked < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(masked, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        masked = torch.full_like(masked, float("-inf")).scatter(-1, order, sorted_logits)
    return masked


def sample_tokens(logits: torch.Tensor, sampling: SamplingParams, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens and their log-probs at the sampling temperature (before top-p/top-k truncation,
    which is what the learner recomputes). Inverse-CDF sampling with one given uniform per row, so
    each row's draw is a function of its own logits and uniform only. logits: [A, V], uniforms:
    [A] float64 in [0, 1) -> ([A], [A])."""
    logits = logits.float()
    if sampling.temperature <= 0:
        tok = logits.argmax(-1)
        return tok, F.log_softmax(logits, -1).gather(-1, tok[:, None])[:, 0]
    scaled = logits / sampling.temperature
    logp = F.log_softmax(scaled, -1)  # [A, V]
    probs = _truncate(scaled, sampling.top_k, sampling.top_p).softmax(-1).double()  # [A, V]
    cdf = probs.cumsum(-1)  # [A, V], float64: a cumulative sum over V terms loses ~V * 2^-53
    tok = torch.searchsorted(cdf, (uniforms.to(cdf.device) * cdf[:, -1])[:, None], right=True)[:, 0]
    # u * total can round up to total: fall back to the last token with mass (never a masked one)
    last = torch.where(probs > 0, torch.arange(probs.shape[-1], device=probs.device), 0).amax(-1)
    tok = torch.minimum(tok, last)
    return tok, logp.gather(-1, tok[:, None])[:, 0]


# ---- the continuous batch ----------------------------------------------------------------------


def _cache_layers(cache) -> list:
    """The per-layer key/value holders of a transformers DynamicCache of full-attention layers (the
    only kind rows can join and leave: a sliding-window or static layer has a fixed geometry)."""
    layers = getattr(cache, "layers", None)
    if layers is None or any(type(layer).__name__ != "DynamicLayer" for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in layers or []}) or [type(cache).__name__]
        raise NotImplementedError(f"continuous batching joins rows into a DynamicCache of full-attention layers; this model's cache has {kinds}: use rollout.scheduler: batched")
    return layers


def _cache_pad_left(cache, n: int) -> None:
    """n empty (masked) positions in front of every row's keys and values: [B, H, S, D] -> [B, H, n + S, D]."""
    if n > 0:
        for layer in _cache_layers(cache):
            layer.keys, layer.values = F.pad(layer.keys, (0, 0, n, 0)), F.pad(layer.values, (0, 0, n, 0))


def _cache_trim_left(cache, n: int) -> None:
    """Drop the first n positions (masked for every row)."""
    if n > 0:
        for layer in _cache_layers(cache):
            layer.keys, layer.values = layer.keys[:, :, n:], layer.values[:, :, n:]


def _cache_cat(cache, other) -> None:
    """Append other's rows (same sequence length) to cache's."""
    for layer, more in zip(_cache_layers(cache), _cache_layers(other)):
        layer.keys, layer.values = torch.cat([layer.keys, more.keys]), torch.cat([layer.values, more.values])


@dataclass(eq=False)
class PrefixKV:
    """The keys and values a finished row computed: `layers[l] = (keys, values)`, each
    [H_kv, len(tokens), D], for the positions of `tokens` (its context and the tokens it fed to the
    model). A later request whose context starts with `tokens[:len(context) - 1]` can start from
    them (`submit_thoughts(reuse=...)`)."""

    tokens: tuple[int, ...]
    layers: list[tuple[torch.Tensor, torch.Tensor]]
    adapter_version: str | None = None  # the weights that computed them

    def covers(self, context: list[int], adapter_version: str | None) -> bool:
        """Whether these positions hold all of `context` but its last token (fed as the first
        input), computed by the same weights."""
        n = len(context) - 1
        return adapter_version == self.adapter_version and 1 <= n <= len(self.tokens) and list(self.tokens[:n]) == list(context[:n])


@dataclass(eq=False)
class _Req:
    """One request of a handle: `n` rows continuing one context."""

    handle: "DecodeHandle"
    context: list[int]  # prompt + prefix
    prefix: list[int]
    n: int
    limits: ThoughtLimits
    sampling: SamplingParams
    keys: list[tuple[int, int]]
    chains: "_Chains"
    generated: list[list[int]] = field(default_factory=list)
    logprobs: list[list[float]] = field(default_factory=list)
    open_rows: int = 0
    index: int = 0  # in its handle
    retain: bool = False  # keep each row's KV when it finishes (kv[row])
    kv: dict = field(default_factory=dict)  # row -> PrefixKV, until taken or dropped
    reuse: PrefixKV | None = None  # start from these keys and values instead of a prefill


@dataclass(eq=False)
class DecodeHandle:
    """What one submission asked (`items`: ThoughtRequests or prompts) and, once `done`, its
    `result` in item order (list[list[Rollout]] or list[Completion])."""

    kind: str  # "thoughts" | "complete"
    items: list
    reqs: list[_Req] = field(default_factory=list)
    open: int = 0
    result: list | None = None
    stream: bool = False  # report each finished row (ContinuousBatch.finished_rows)

    def row_done(self, i: int, j: int) -> bool:
        return self.reqs[i].chains.finish[j] is not None

    def row_rollout(self, engine: "HFEngine", i: int, j: int) -> Rollout:
        """Chain j of request i once it has finished (before the whole handle is done)."""
        req = self.reqs[i]
        return req.chains.rollout(self.items[i], j, req.generated[j], req.logprobs[j], engine.adapter_version)

    def take_kv(self, i: int, j: int) -> PrefixKV | None:
        """The KV of finished chain j of request i (submitted with `retain`), handed over once."""
        return self.reqs[i].kv.pop(j, None)

    def drop_kv(self, i: int, j: int) -> None:
        self.reqs[i].kv.pop(j, None)

    def stop_retaining(self) -> None:
        """Keep no more KV of this handle's rows, and free what is kept."""
        for req in self.reqs:
            req.retain = False
            req.kv.clear()

    @property
    def done(self) -> bool:
        return self.result is not None


class _Cohort:
    """Rows decoded by one forward pass: one KV cache, left-padded to a common width."""

    def __init__(self, cache, attn: torch.Tensor, logits: torch.Tensor, fields: dict, slots: list):
        self.cache, self.attn, self.logits, self.f, self.slots = cache, attn, logits, fields, slots
        self.buffer: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.tok: torch.Tensor | None = None  # the tokens sampled this step (input of the next forward)

    @property
    def width(self) -> int:
        return self.attn.shape[1]

    def absorb(self, other: "_Cohort") -> None:
        """Append other's rows, left-padding the narrower side to the common width."""
        old_w, new_w = self.width, other.width
        _cache_pad_left(self.cache, new_w - old_w)
        _cache_pad_left(other.cache, old_w - new_w)
        _cache_cat(self.cache, other.cache)
        self.attn = torch.cat([F.pad(self.attn, (max(0, new_w - old_w), 0)), F.pad(other.attn, (max(0, old_w - new_w), 0))])
        self.logits = torch.cat([self.logits, other.logits])
        self.f = {k: torch.cat([self.f[k], v]) for k, v in other.f.items()}
        self.tok = torch.cat([self.tok, other.tok]) if self.tok is not None and other.tok is not None else None
        self.slots += other.slots

    def flush(self) -> None:
        """Move buffered tokens into the rows' python lists (one transfer for many steps)."""
        if not self.buffer:
            return
        toks = torch.stack([t for t, _ in self.buffer], 1).tolist()
        lps = torch.stack([lp for _, lp in self.buffer], 1).tolist()
        for b, (req, row) in enumerate(self.slots):
            if req.chains.finish[row] is None:
                req.generated[row].extend(toks[b])
                req.logprobs[row].extend(lps[b])
        self.buffer.clear()

    def keep(self, keep: torch.Tensor) -> None:
        """Keep rows `keep`, then drop the leading positions no remaining row attends to."""
        self.flush()
        self.cache.batch_select_indices(keep)
        self.attn, self.logits = self.attn[keep], self.logits[keep]
        self.f = {k: v[keep] for k, v in self.f.items()}
        self.slots = [self.slots[b] for b in keep.tolist()]
        first = int(self.attn.any(0).int().argmax())
        if first > 0:
            _cache_trim_left(self.cache, first)
            self.attn = self.attn[:, first:]


class ContinuousBatch:
    """Decode batches that requests join and leave while they run.

    `submit_thoughts` / `submit_complete` queue a request set and return its DecodeHandle; each
    `step()` first admits queued requests while there is room (`max_rows` rows in all; a request
    larger than that runs alone): their contexts are prefilled, once per context, and the KV cache
    expanded to each request's `n` rows; then every row samples one token, thought ends and chain
    ends are applied, finished rows leave (pruned when enough of them accumulate, or at once when
    requests wait), and the remaining rows run one forward step. `step()` returns the handles that
    finished in it.

    Cohorts. A forward pass costs a fixed overhead plus a part proportional to rows x padded
    width (attention over, and the copy of, the left-padded KV cache). Rows that join late have
    other context lengths than the running ones, so joining them to one left-padded cache can pad
    every running row; instead rows live in cohorts, each one cache and one forward per step, and
    new rows join the cohort where padding costs least, or open a new cohort when every join
    would pad more than `engine.cohort_cost` row-positions (the fixed cost of one more forward,
    in row-positions); cohorts merge once the padding of merging falls below that.

    Randomness is per chain: chain j drawn from context c with sampling seed s in a submission
    salted `salt` draws its t-th token from `chain_uniforms(chain_key(s, c, salt, j'), t)`, where
    j' counts the chains of earlier requests with the same context and seed in the same
    submission (or in every submission sharing its `seen` counter), so equal contexts still get
    independent chains. A chain's tokens are therefore a function of its logits alone, whatever
    the batch composition, cohort, admission order or capacity.

    Prefix reuse. A request submitted with `retain=True` keeps each row's keys and values when
    the row finishes (`handle.take_kv(i, j)` hands them over, `drop_kv` frees them; until then they
    hold memory: one copy of the row's cache). A request submitted with `reuse=[PrefixKV, ...]`
    (one per request, or None) whose context starts with the kept tokens is admitted without a
    prefill: its rows start from those keys and values and one forward of the context's last
    token gives their first logits. Mathematically the same keys, values and logits (each
    position's K/V depends on its own tokens and position only); in floats they differ from a
    prefill's in their last bits, as a row's logits do between batches (tests/test_scheduler.py).
    A PrefixKV that does not cover the context, or that other weights computed (its
    `adapter_version`), is ignored: the context is prefilled.
    """

    def __init__(self, engine: "HFEngine", max_rows: int | None = None):
        self.engine = engine
        self.max_rows = max_rows or engine.max_batch_rows
        self.queue: deque[_Req] = deque()
        self.cohorts: list[_Cohort] = []
        self.finished: list[DecodeHandle] = []
        self.finished_rows: list[tuple[DecodeHandle, int, int]] = []  # rows of streamed handles, as they finish
        self.stats = {"decode_steps": 0, "forwards": 0, "row_steps": 0, "padded_row_positions": 0, "prefills": 0, "prefill_tokens": 0, "reuse_forwards": 0, "reused_prefixes": 0, "reused_tokens": 0,
                      "cohorts_opened": 0, "merges": 0}
        self._stops: dict[str, int] = {}
        self._stop_table: torch.Tensor | None = None  # [S, V] tokens that may end each stop string
        self._groups: dict[tuple, int] = {}  # (temperature, top_p, top_k) -> sampling group

    # ---- submissions ---------------------------------------------------------------------------
    def _request(self, handle: DecodeHandle, context: list[int], prefix: list[int], spans: list, n: int, limits: ThoughtLimits, sampling: SamplingParams, salt: int, seen: dict,
                 retain: bool = False, reuse: PrefixKV | None = None) -> None:
        ctx = tuple(context)
        first = number_chains(seen, sampling.seed, ctx, n)
        chains = _Chains(self.engine, limits, [len(context)] * n, [list(prefix) for _ in range(n)], [list(spans) for _ in range(n)])
        keys = [chain_key(sampling.seed, ctx, salt, first + j) for j in range(n)]
        req = _Req(handle, list(context), list(prefix), n, limits, sampling, keys, chains, [[] for _ in range(n)], [[] for _ in range(n)], retain=retain, reuse=reuse)
        req.open_rows = sum(f is None for f in chains.finish)
        req.index = len(handle.reqs)
        handle.reqs.append(req)
        if req.open_rows:
            handle.open += 1
            self.queue.append(req)

    def submit_thoughts(self, requests: list[ThoughtRequest], limits: ThoughtLimits, sampling: SamplingParams, salt: int = 0, seen: dict | None = None, stream: bool = False,
                        retain: bool = False, reuse: list[PrefixKV | None] | None = None) -> DecodeHandle:
        """Queue requests. `seen` (shared across submissions) numbers the chains of each context
        on from the earlier submissions' instead of from 0; `stream` reports finished rows;
        `retain` keeps finished rows' KV, `reuse` starts requests from kept KV (see the class)."""
        handle, seen = DecodeHandle("thoughts", list(requests), stream=stream), {} if seen is None else seen
        reuse = [None] * len(requests) if reuse is None else list(reuse)
        if len(reuse) != len(requests):
            raise ValueError(f"submit_thoughts: {len(reuse)} reuse entries for {len(requests)} requests")
        for r, kv in zip(requests, reuse):
            self._request(handle, list(r.prompt_ids) + list(r.prefix_ids), list(r.prefix_ids), list(r.prefix_spans), r.n, limits, sampling, salt, seen, retain, kv)
        self._maybe_close(handle)
        return handle

    def submit_complete(self, prompts: list[list[int]], max_tokens: int, sampling: SamplingParams, salt: int = 0, seen: dict | None = None) -> DecodeHandle:
        limits = ThoughtLimits(stop="", max_thoughts=1, max_thought_tokens=max_tokens, max_response_tokens=max_tokens, max_model_len=10**9)
        handle, seen = DecodeHandle("complete", [list(p) for p in prompts]), {} if seen is None else seen
        for p in prompts:
            self._request(handle, list(p), [], [], 1, limits, sampling, salt, seen)
        self._maybe_close(handle)
        return handle

    def _maybe_close(self, handle: DecodeHandle) -> None:
        if handle.open or handle.done:
            return
        eng = self.engine
        if handle.kind == "thoughts":
            handle.result = [[req.chains.rollout(item, j, req.generated[j], req.logprobs[j], eng.adapter_version) for j in range(req.n)] for item, req in zip(handle.items, handle.reqs)]
        else:
            handle.result = [
                Completion(ids=r.generated[0], text=eng.decode(r.generated[0]), logprobs=r.logprobs[0], finish_reason="eos" if r.chains.finish[0] == "eos" else "length",
                           adapter_version=eng.adapter_version)
                for r in handle.reqs
            ]
        self.finished.append(handle)

    @property
    def rows(self) -> int:
        return sum(len(c.slots) for c in self.cohorts)

    @property
    def busy(self) -> bool:
        return bool(self.cohorts or self.queue)

    def run(self, handles: list[DecodeHandle]) -> None:
        """Step until every handle is done."""
        while not all(h.done for h in handles):
            if not self.busy:
                raise RuntimeError("continuous batch: handles still open with nothing queued or decoding")
            self.step()

    # ---- per-row tables --------------------------------------------------------------------------
    def _stop_slot(self, stop: str) -> int:
        if stop not in self._stops:
            _, candidates = self.engine._stop_info(stop)
            self._stops[stop] = len(self._stops)
            table = candidates[None]
            self._stop_table = table if self._stop_table is None else torch.cat([self._stop_table, table])
        return self._stops[stop]

    def _group(self, s: SamplingParams) -> int:
        return self._groups.setdefault((s.temperature, s.top_p, s.top_k), len(self._groups))

    # ---- admission ---------------------------------------------------------------------------------
    @torch.no_grad()
    def _prefill(self, reqs: list[_Req]) -> _Cohort:
        """Encode each request's context once (a prefill, or one forward on top of reused KV) and
        expand it to its live rows: one cohort."""
        version = self.engine.adapter_version
        reused, fresh = [], []
        for r in reqs:
            (reused if r.reuse is not None and r.reuse.covers(r.context, version) else fresh).append(r)
        parts = ([self._cohort(fresh, *self._encode(fresh))] if fresh else []) + ([self._cohort(reused, *self._encode_reused(reused))] if reused else [])
        for r in reqs:
            r.reuse = None  # the cohort holds what it needs
        cohort = parts[0]
        for other in parts[1:]:
            cohort.absorb(other)
        return cohort

    def _encode(self, reqs: list[_Req]) -> tuple:
        """One prefill of the contexts, left-padded together -> (cache, attn [R, W], logits [R, V])."""
        eng, device = self.engine, self.engine.device
        width = max(len(r.context) for r in reqs)
        ids = torch.full((len(reqs), width), eng.pad_id, dtype=torch.long)
        attn = torch.zeros((len(reqs), width), dtype=torch.long)
        for j, r in enumerate(reqs):
            ids[j, width - len(r.context):] = torch.tensor(r.context)
            attn[j, width - len(r.context):] = 1
        ids, attn = ids.to(device), attn.to(device)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        out = eng.model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1)
        cache, logits = _cache_of(out), out.logits[:, -1, :]
        del out
        self.stats["prefills"] += 1
        self.stats["prefill_tokens"] += ids.numel()
        return cache, attn, logits

    def _encode_reused(self, reqs: list[_Req]) -> tuple:
        """Each context's KV but its last token from the request's PrefixKV (right-aligned in a
        left-padded cache), then one forward of the last tokens -> (cache, attn [R, W], logits [R, V])."""
        from transformers import DynamicCache

        eng, device = self.engine, self.engine.device
        lens = [len(r.context) - 1 for r in reqs]  # positions taken from the PrefixKV
        width = max(lens)
        cache = DynamicCache()
        for layer in range(len(reqs[0].reuse.layers)):
            k0, v0 = reqs[0].reuse.layers[layer]
            keys = k0.new_zeros((len(reqs), k0.shape[0], width, k0.shape[2]))  # [R, H_kv, W, D]
            values = v0.new_zeros((len(reqs), v0.shape[0], width, v0.shape[2]))
            for j, (r, n) in enumerate(zip(reqs, lens)):
                k, v = r.reuse.layers[layer]
                keys[j, :, width - n:], values[j, :, width - n:] = k[:, :n], v[:, :n]
            cache.update(keys, values, layer)
        attn = torch.zeros((len(reqs), width + 1), dtype=torch.long)
        for j, n in enumerate(lens):
            attn[j, width - n:] = 1
        attn = attn.to(device)
        ids = torch.tensor([[r.context[-1]] for r in reqs], device=device)  # [R, 1]
        pos = torch.tensor([[n] for n in lens], device=device)  # [R, 1]: the last token's position
        out = eng.model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, **{eng._cache_kw: cache})
        cache, logits = _cache_of(out), out.logits[:, -1, :]
        del out
        self.stats["reuse_forwards"] += 1
        self.stats["reused_prefixes"] += len(reqs)
        self.stats["reused_tokens"] += sum(lens)
        return cache, attn, logits

    def _cohort(self, reqs: list[_Req], cache, attn: torch.Tensor, logits: torch.Tensor) -> _Cohort:
        """The encoded contexts expanded to their requests' live rows, with the rows' fields."""
        device = self.engine.device
        slots = [(r, j) for r in reqs for j in range(r.n) if r.chains.finish[j] is None]
        expand = torch.tensor([k for k, r in enumerate(reqs) for j in range(r.n) if r.chains.finish[j] is None], device=device)
        cache.batch_select_indices(expand)
        logits, attn = logits[expand], attn[expand]
        fields = {
            "next_pos": attn.sum(-1),
            "tok_in_thought": torch.zeros(len(slots), dtype=torch.long, device=device),
            "counter": torch.zeros(len(slots), dtype=torch.long, device=device),
            "key_hi": torch.tensor([r.keys[j][0] for r, j in slots], dtype=torch.long, device=device),
            "key_lo": torch.tensor([r.keys[j][1] for r, j in slots], dtype=torch.long, device=device),
            "max_tt": torch.tensor([r.limits.max_thought_tokens for r, _ in slots], device=device),
            "stop": torch.tensor([self._stop_slot(r.limits.stop) for r, _ in slots], device=device),
            "group": torch.tensor([self._group(r.sampling) for r, _ in slots], device=device),
            "done": torch.zeros(len(slots), dtype=torch.bool, device=device),
        }
        return _Cohort(cache, attn, logits, fields, slots)

    def _admit(self) -> None:
        rows, admitted = self.rows, []
        while self.queue and (rows + self.queue[0].open_rows <= self.max_rows or rows == 0):
            req = self.queue.popleft()
            admitted.append(req)
            rows += req.open_rows
        if not admitted:
            return
        # place each request (widest first) where it pads least: a running cohort or a new one
        budget = self.engine.cohort_cost
        plan: list[list] = [[c.width, len(c.slots), c, []] for c in self.cohorts]  # width, rows, cohort, requests
        for req in sorted(admitted, key=lambda r: -len(r.context)):
            c, n = len(req.context), req.open_rows
            costs = [(n * (w - c) if w >= c else b * (c - w), k) for k, (w, b, _, _) in enumerate(plan)]
            cost, k = min(costs, default=(budget, -1))
            if cost >= budget:
                plan.append([c, 0, None, []])
                k = len(plan) - 1
            plan[k][0], plan[k][1] = max(plan[k][0], c), plan[k][1] + n
            plan[k][3].append(req)
        order = {id(r): i for i, r in enumerate(admitted)}
        for _, _, cohort, reqs in plan:
            if not reqs:
                continue
            fresh = self._prefill(sorted(reqs, key=lambda r: order[id(r)]))
            if cohort is None:
                self.cohorts.append(fresh)
                self.stats["cohorts_opened"] += 1
            else:
                cohort.flush()
                cohort.absorb(fresh)

    def _merge(self) -> None:
        """Merge cohorts whose padding on merging costs less than a forward of their own."""
        budget = self.engine.cohort_cost
        while len(self.cohorts) > 1:
            pairs = [(len(b.slots) * abs(a.width - b.width) if a.width >= b.width else len(a.slots) * (b.width - a.width), i, j)
                     for i, a in enumerate(self.cohorts) for j, b in enumerate(self.cohorts) if i < j]
            cost, i, j = min(pairs)
            if cost >= budget:
                return
            a, b = self.cohorts[i], self.cohorts.pop(j)
            a.flush(), b.flush()
            a.absorb(b)
            self.stats["merges"] += 1

    # ---- decoding ------------------------------------------------------------------------------------
    def _sample(self, co: _Cohort) -> tuple[torch.Tensor, torch.Tensor]:
        f = co.f
        u = chain_uniforms(f["key_hi"], f["key_lo"], f["counter"])
        groups = list(self._groups.items())
        if len(groups) == 1:
            (t, p, k), _ = groups[0]
            return sample_tokens(co.logits, SamplingParams(t, p, k), u)
        tok = torch.zeros(len(co.slots), dtype=torch.long, device=co.logits.device)
        lp = torch.zeros(len(co.slots), dtype=torch.float32, device=co.logits.device)
        for (t, p, k), g in groups:
            idx = (f["group"] == g).nonzero()[:, 0]
            if len(idx):
                tok[idx], lp[idx] = sample_tokens(co.logits[idx], SamplingParams(t, p, k), u[idx])
        return tok, lp

    def _row_event(self, co: _Cohort, b: int, eos: bool, stop_tok: bool, count: int) -> tuple[bool, bool]:
        """Apply a thought or chain end to row b of a cohort: (thought restarted, row finished)."""
        req, row = co.slots[b]
        chains, gen, lim = req.chains, req.generated[row], req.limits
        restart = False
        if eos:
            gen.pop(), req.logprobs[row].pop()  # the EOS token is not part of the response
            chains.end_chain_at_eos(row, gen)
        else:
            stop_single, _ = self.engine._stop_info(lim.stop)
            end = len(chains.prefixes[row]) + len(gen)
            text = None if not stop_tok or stop_single is not None else chains.thought_text(row, gen, end)
            if (stop_tok and (text is None or lim.stop in text)) or count >= lim.max_thought_tokens:
                chains.end_thought(row, gen, end, text)
                restart = True
        if chains.finish[row] is None:
            return restart, False
        if req.retain:
            req.kv[row] = self._kept_kv(co, b, req.context + gen)
        if req.handle.stream:
            self.finished_rows.append((req.handle, req.index, row))
        req.open_rows -= 1
        if req.open_rows == 0:
            req.handle.open -= 1
            self._maybe_close(req.handle)
        return restart, True

    def _kept_kv(self, co: _Cohort, b: int, tokens: list[int]) -> PrefixKV:
        """Row b's keys and values as they stand (before this step's forward): its `next_pos` real
        positions, right-aligned in the cohort's cache, hold the first `next_pos` of `tokens`."""
        n = int(co.f["next_pos"][b])
        layers = [(layer.keys[b, :, -n:].clone(), layer.values[b, :, -n:].clone()) for layer in _cache_layers(co.cache)]
        return PrefixKV(tuple(tokens[:n]), layers, self.engine.adapter_version)

    @torch.no_grad()
    def step(self) -> list[DecodeHandle]:
        """Admit what fits, then in every cohort sample one token per row, apply thought and chain
        ends, drop finished rows and run one forward step. Returns the handles that finished."""
        self._admit()
        if self.cohorts:
            self.stats["decode_steps"] += 1
            pruned = False
            for co in list(self.cohorts):
                pruned |= self._decode_one(co)
            self.cohorts = [c for c in self.cohorts if c.slots]
            if pruned:
                self._merge()
            for co in self.cohorts:
                self._forward(co)
        out, self.finished = self.finished, []
        return out

    def _decode_one(self, co: _Cohort) -> bool:
        """Sample and apply ends in one cohort; True if rows were pruned."""
        eng, f = self.engine, co.f
        tok, lp = self._sample(co)  # [A], [A]
        done = f["done"]
        tok = torch.where(done, torch.full_like(tok, eng.pad_id), tok)
        co.buffer.append((tok, lp))
        co.tok = tok
        f["counter"] += 1
        f["tok_in_thought"] += 1
        is_eos = (tok == eng.eos_id) & ~done
        maybe_end = self._stop_table[f["stop"], tok]
        events = (is_eos | maybe_end | (f["tok_in_thought"] >= f["max_tt"])) & ~done
        if not bool(events.any()):
            if len(co.buffer) >= 64:
                co.flush()
            return False
        co.flush()
        ev = events.nonzero()[:, 0]
        restart, finished = [], []
        # one device-to-host copy per field for all event rows, not one per row and field
        for b, eos, stop_tok, count in zip(ev.tolist(), is_eos[ev].tolist(), maybe_end[ev].tolist(), f["tok_in_thought"][ev].tolist()):
            r, fin = self._row_event(co, b, eos, stop_tok, count)
            if r:
                restart.append(b)
            if fin:
                finished.append(b)
        if restart:
            f["tok_in_thought"][restart] = 0
        if finished:
            done[finished] = True
        n_done = int(done.sum())
        if n_done == len(co.slots):
            co.buffer.clear()
            co.slots = []
            return True
        if n_done >= max(1, int(eng.prune_fraction * len(co.slots))) or (n_done and self.queue):
            keep = (~done).nonzero()[:, 0]
            co.keep(keep)
            co.tok = tok[keep]
            return True
        return False

    def _forward(self, co: _Cohort) -> None:
        eng, f = self.engine, co.f
        co.attn = torch.cat([co.attn, torch.ones_like(co.attn[:, :1])], dim=1)
        out = eng.model(input_ids=co.tok[:, None], attention_mask=co.attn, position_ids=f["next_pos"][:, None], use_cache=True, **{eng._cache_kw: co.cache})
        co.cache, co.logits = _cache_of(out), out.logits[:, -1, :]
        f["next_pos"] += 1
        self.stats["forwards"] += 1
        self.stats["row_steps"] += len(co.slots)
        self.stats["padded_row_positions"] += co.attn.numel()


class HFEngine(RolloutEngine):
    def __init__(self, model, tokenizer, max_batch_rows: int = 256, prune_fraction: float = 0.25, adapter_version: str | None = None, cohort_cost: int | None = None):
        self.model = model
        # the fixed cost of one more forward per decode step, in row-positions of padded KV cache
        # (ContinuousBatch cohorts). Measured when this was written: ~7 ms + ~7.6 us per
        # row-position (fit over B 1..256, W 50..300), i.e. ~900, halved for a cohort's own
        # sampling ops and prefills. Measured again (`python bench/forward_cost.py`: tiny model with
        # its LoRA, one CPU thread): ~1.3 ms + ~8 us per row + ~0.4 us per row-position, i.e.
        # ~3300; not re-tuned: in one probe of bench/method_overhead.py's 128-prompt step, 4096
        # opened about as many cohorts as 512 (width gaps of hundreds of positions open them either
        # way). On a GPU the fixed part (kernel launches) dominates far more.
        self.cohort_cost = cohort_cost if cohort_cost is not None else (512 if self.device.type == "cpu" else 65536)
        self.tokenizer = tokenizer
        self.max_batch_rows = max_batch_rows
        self.prune_fraction = prune_fraction
        self.adapter_version = adapter_version
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._stop_cache: dict[str, tuple[int | None, torch.Tensor]] = {}
        # transformers 5 renamed `past_key_values` to `cache`
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._cache_kw = "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"

    # ---- text ------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=True)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def encode_chat(self, text: str) -> list[int]:
        if getattr(self.tokenizer, "chat_template", None):
            out = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
            return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)
        return self.encode(text)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _stop_info(self, stop: str | None) -> tuple[int | None, torch.Tensor]:
        """(single-token id of the stop string or None, bool[V] of tokens that may complete it)."""
        if stop not in self._stop_cache:
            vocab = len(self.tokenizer)
            candidates = torch.zeros(max(vocab, self.model.config.vocab_size), dtype=torch.bool)
            single = None
            if stop:
                ids = self.tokenizer.encode(stop, add_special_tokens=False)
                single = ids[0] if len(ids) == 1 else None
                if single is not None:
                    candidates[single] = True
                else:
                    last = stop[-1]
                    for tok_id in range(vocab):
                        if last in self.tokenizer.decode([tok_id]):
                            candidates[tok_id] = True
            self._stop_cache[stop] = (single, candidates.to(self.device))
        return self._stop_cache[stop]

    # ---- sampling -----------------------------------------------------------------------------
    def continuous_batch(self, max_rows: int | None = None) -> ContinuousBatch:
        """A decode batch that requests join and leave while it runs (srpo_core/scheduler.py)."""
        return ContinuousBatch(self, max_rows)

    def _chunks(self, requests: list, weight) -> list[list[int]]:
        chunks, cur, size = [], [], 0
        for i, req in enumerate(requests):
            w = weight(req)
            if cur and size + w > self.max_batch_rows:
                chunks.append(cur)
                cur, size = [], 0
            cur.append(i)
            size += w
        if cur:
            chunks.append(cur)
        return chunks

    def generate_thoughts(self, requests: list[ThoughtRequest], limits: ThoughtLimits, sampling: SamplingParams) -> list[list[Rollout]]:
        batch = self.continuous_batch()
        handle = batch.submit_thoughts(requests, limits, sampling)
        batch.run([handle])
        return handle.result

    def complete(self, prompts: list[list[int]], max_tokens: int, sampling: SamplingParams) -> list[Completion]:
        batch = self.continuous_batch()
        handle = batch.submit_complete(prompts, max_tokens, sampling)
        batch.run([handle])
        return handle.result

    @torch.no_grad()
    def teacher_force(self, prompts: list[list[int]], responses: list[list[int]], temperature: float = 1.0) -> list[TokenScores]:
        out: list[TokenScores] = []
        for chunk in self._chunks(prompts, lambda p: 1):
            seqs = [list(prompts[i]) + list(responses[i]) for i in chunk]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
            attn = torch.zeros_like(ids)
            for j, s in enumerate(seqs):
                ids[j, : len(s)] = torch.tensor(s)
                attn[j, : len(s)] = 1
            logits = self.model(input_ids=ids.to(self.device), attention_mask=attn.to(self.device)).logits
            for j, i in enumerate(chunk):  # float32 softmax over each response's positions only
                p, r = len(prompts[i]), len(responses[i])
                row = logits[j, p - 1 : p + r - 1]  # [r, V]
                tgt = torch.tensor(responses[i], device=row.device)
                logp = algos.token_logprobs(row[None], tgt[None], temperature)[0]
                out.append(TokenScores(logprobs=logp.tolist(), greedy_ids=row.argmax(-1).tolist()))
        return out


def generate_thoughts_per_call(model, tokenizer, requests: list[ThoughtRequest], limits: ThoughtLimits, sampling: SamplingParams) -> list[list[Rollout]]:
    """Reference mode, as the paper ran it: one `model.generate` call per thought with the stop
    string, the growing context re-encoded each call. Slow; used to check the fast engine."""
    engine = HFEngine(model, tokenizer)
    stop_ids = tokenizer.encode(limits.stop, add_special_tokens=False)
    stop_kwargs = {"eos_token_id": [tokenizer.eos_token_id, stop_ids[0]]} if len(stop_ids) == 1 else {"stop_strings": [limits.stop], "tokenizer": tokenizer, "eos_token_id": tokenizer.eos_token_id}
    torch.manual_seed(sampling.seed)
    out = []
    for req in requests:
        chains = []
        for _ in range(req.n):
            response, lps = list(req.prefix_ids), []
            state = _Chains(engine, limits, [len(req.prompt_ids) + len(req.prefix_ids)], [list(req.prefix_ids)], [list(req.prefix_spans)])
            finish = state.finish[0]
            while finish is None:
                ctx = torch.tensor([list(req.prompt_ids) + response], device=engine.device)
                gen = model.generate(
                    input_ids=ctx,
                    attention_mask=torch.ones_like(ctx),
                    max_new_tokens=limits.max_thought_tokens,
                    do_sample=sampling.temperature > 0,
                    temperature=sampling.temperature or None,
                    top_p=sampling.top_p if sampling.temperature > 0 else None,
                    top_k=sampling.top_k or None,
                    pad_token_id=engine.pad_id,
                    output_logits=True,
                    return_dict_in_generate=True,
                    **stop_kwargs,
                )
                new = gen.sequences[0, ctx.shape[1]:].tolist()
                step_lp = [F.log_softmax(l[0].float() / (sampling.temperature or 1.0), -1)[t].item() for l, t in zip(gen.logits, new)]
                if tokenizer.eos_token_id in new:
                    cut = new.index(tokenizer.eos_token_id)
                    response += new[:cut]
                    lps += step_lp[:cut]
                    state.end_chain_at_eos(0, response[len(req.prefix_ids):])
                    break
                response += new
                lps += step_lp
                state.prefixes[0] = list(req.prefix_ids)
                state.end_thought(0, response[len(req.prefix_ids):], len(response))
                finish = state.finish[0]
            chains.append(state.rollout(req, 0, response[len(req.prefix_ids):], lps, engine.adapter_version))
        out.append(chains)
    return out

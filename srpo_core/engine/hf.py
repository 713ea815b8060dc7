"""Hugging Face rollout engine (CPU or GPU): one continuous, batched, KV-cached decode per call.

Thought structure is tracked as the tokens come out instead of one engine call per thought: a
thought ends at the stop string or at `max_thought_tokens`, and the chain-end rules of
`engine.base` are stopping conditions checked at each thought end. The model sees exactly the
context it would see with one call per thought (prompt + every token so far), so the sampled
distribution is the same; `generate_thoughts_per_call` is that per-thought reference, built on
`model.generate` with a stop string, and the tests check both give identical greedy chains.

Each distinct context (prompt + reset prefix) is prefilled once and its KV cache is expanded to
its `n` samples, so a shared prefix is encoded once for its G suffixes. Finished rows are pruned
from the batch when enough of them accumulate.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from srpo_core import algos
from srpo_core.engine.base import Completion, Rollout, RolloutEngine, SamplingParams, ThoughtLimits, ThoughtRequest, TokenScores

BOXED = "\\boxed{"


def _cache_of(out):
    return out.cache if getattr(out, "cache", None) is not None else out.past_key_values


def sample_tokens(logits: torch.Tensor, sampling: SamplingParams, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens and their log-probs at the sampling temperature (before top-p/top-k truncation,
    which is what the learner recomputes). logits: [A, V] -> ([A], [A])."""
    logits = logits.float()
    if sampling.temperature <= 0:
        tok = logits.argmax(-1)
        return tok, F.log_softmax(logits, -1).gather(-1, tok[:, None])[:, 0]
    scaled = logits / sampling.temperature
    logp = F.log_softmax(scaled, -1)  # [A, V]
    masked = scaled
    if sampling.top_k > 0:
        kth = torch.topk(masked, min(sampling.top_k, masked.shape[-1]), dim=-1).values[:, -1:]
        masked = masked.masked_fill(masked < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(masked, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > sampling.top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        masked = torch.full_like(masked, float("-inf")).scatter(-1, order, sorted_logits)
    tok = torch.multinomial(masked.softmax(-1), 1, generator=generator)[:, 0]
    return tok, logp.gather(-1, tok[:, None])[:, 0]


class _Chains:
    """Per-row thought bookkeeping for one decode call (python lists; touched only at thought
    ends, which are rare next to tokens)."""

    def __init__(self, engine: "HFEngine", limits: ThoughtLimits, ctx_lens: list[int], prefixes: list[list[int]], prefix_spans: list[list[tuple[int, int]]]):
        self.engine, self.limits = engine, limits
        self.ctx_lens = ctx_lens  # prompt + prefix
        self.prefixes = prefixes
        self.spans = [list(s) for s in prefix_spans]
        self.thought_start = [len(p) for p in prefixes]  # response index where the open thought starts
        self.finish: list[str | None] = [None] * len(prefixes)
        for row in range(len(prefixes)):
            self.finish[row] = self._pre_thought_check(row, len(prefixes[row]))

    def _pre_thought_check(self, row: int, resp_len: int) -> str | None:
        lim = self.limits
        if len(self.spans[row]) >= lim.max_thoughts:
            return "max_thoughts"
        if resp_len + lim.max_thought_tokens > lim.max_response_tokens:
            return "max_response"
        if self.ctx_lens[row] - len(self.prefixes[row]) + resp_len + lim.max_thought_tokens > lim.max_model_len:
            return "max_model_len"
        return None

    def thought_text(self, row: int, generated: list[int], end: int) -> str:
        """The open thought's text: response[thought_start:end], response = prefix + generated."""
        prefix, start = self.prefixes[row], self.thought_start[row]
        ids = generated[start - len(prefix) : end - len(prefix)] if start >= len(prefix) else prefix[start:] + generated[: end - len(prefix)]
        return self.engine.decode(ids)

    def end_thought(self, row: int, generated: list[int], end: int, text: str | None = None) -> None:
        text = self.thought_text(row, generated, end) if text is None else text
        self.spans[row].append((self.thought_start[row], end))
        self.thought_start[row] = end
        self.finish[row] = "answer" if BOXED in text else self._pre_thought_check(row, end)


class HFEngine(RolloutEngine):
    def __init__(self, model, tokenizer, max_batch_rows: int = 256, prune_fraction: float = 0.25, adapter_version: str | None = None):
        self.model = model
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

    # ---- the decode loop ---------------------------------------------------------------------
    @torch.no_grad()
    def _decode(self, contexts: list[list[int]], repeats: list[int], prefixes: list[list[int]], prefix_spans: list[list[tuple[int, int]]], limits: ThoughtLimits, sampling: SamplingParams, generator: torch.Generator | None) -> list[tuple[list[int], list[float], list[tuple[int, int]], str]]:
        """Decode `repeats[i]` continuations of each context. Returns per row (row order =
        contexts expanded by repeats): (generated ids, logprobs, spans, finish reason)."""
        device = self.device
        rows_ctx = [i for i, r in enumerate(repeats) for _ in range(r)]
        chains = _Chains(self, limits, [len(contexts[i]) for i in rows_ctx], [list(prefixes[i]) for i in rows_ctx], [list(prefix_spans[i]) for i in rows_ctx])
        n_rows = len(rows_ctx)
        generated: list[list[int]] = [[] for _ in range(n_rows)]
        logprobs: list[list[float]] = [[] for _ in range(n_rows)]
        final_len = [0] * n_rows
        live_ctx = sorted({rows_ctx[r] for r in range(n_rows) if chains.finish[r] is None})
        if not live_ctx:
            return [(generated[r], logprobs[r], chains.spans[r], chains.finish[r]) for r in range(n_rows)]

        # prefill each distinct live context once (left padded)
        width = max(len(contexts[i]) for i in live_ctx)
        ids = torch.full((len(live_ctx), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(live_ctx), width), dtype=torch.long)
        for j, i in enumerate(live_ctx):
            ids[j, width - len(contexts[i]):] = torch.tensor(contexts[i])
            attn[j, width - len(contexts[i]):] = 1
        ids, attn = ids.to(device), attn.to(device)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1)
        cache, last_logits = _cache_of(out), out.logits[:, -1, :]
        del out

        # expand to rows (only live rows enter the batch)
        slot = {i: j for j, i in enumerate(live_ctx)}
        active_rows = [r for r in range(n_rows) if chains.finish[r] is None]
        expand = torch.tensor([slot[rows_ctx[r]] for r in active_rows], device=device)
        cache.batch_select_indices(expand)
        last_logits, attn = last_logits[expand], attn[expand]
        next_pos = attn.sum(-1)  # [A]: position id of the next token
        active = torch.tensor(active_rows, device=device)  # batch slot -> row id
        done = torch.zeros(len(active_rows), dtype=torch.bool, device=device)
        tok_in_thought = torch.tensor([0] * len(active_rows), device=device)
        stop_single, stop_candidates = self._stop_info(limits.stop)
        step_tokens: list[torch.Tensor] = []
        step_logps: list[torch.Tensor] = []
        step_rows: list[torch.Tensor] = []

        def flush():
            # move buffered tokens into python lists (one transfer for many steps)
            if not step_tokens:
                return
            toks = torch.stack(step_tokens, 1).tolist()
            lps = torch.stack(step_logps, 1).tolist()
            rws = step_rows[0].tolist()
            for b, row in enumerate(rws):
                generated[row].extend(toks[b])
                logprobs[row].extend(lps[b])
            step_tokens.clear(), step_logps.clear(), step_rows.clear()

        while True:
            tok, lp = sample_tokens(last_logits, sampling, generator)  # [A], [A]
            tok = torch.where(done, torch.full_like(tok, self.pad_id), tok)
            step_tokens.append(tok), step_logps.append(lp), step_rows.append(active)
            tok_in_thought += 1
            is_eos = (tok == self.eos_id) & ~done
            if stop_single is not None:
                maybe_end = tok == stop_single
            else:
                maybe_end = stop_candidates[tok]
            events = (is_eos | maybe_end | (tok_in_thought >= limits.max_thought_tokens)) & ~done
            if bool(events.any()):
                flush()
                ev = events.nonzero()[:, 0]
                # one device-to-host copy per field for all event rows, not one per row and field
                fields = zip(ev.tolist(), active[ev].tolist(), is_eos[ev].tolist(), maybe_end[ev].tolist(), tok_in_thought[ev].tolist())
                restart, finished = [], []
                for b, row, eos, stop_tok, count in fields:
                    if eos:
                        generated[row].pop(), logprobs[row].pop()  # the EOS token is not part of the response
                        end = len(chains.prefixes[row]) + len(generated[row])
                        if end > chains.thought_start[row]:
                            chains.spans[row].append((chains.thought_start[row], end))
                        chains.finish[row] = "eos"
                    else:
                        end = len(chains.prefixes[row]) + len(generated[row])
                        text = None if not stop_tok or stop_single is not None else chains.thought_text(row, generated[row], end)
                        is_stop = stop_tok and (text is None or limits.stop in text)
                        if is_stop or count >= limits.max_thought_tokens:
                            chains.end_thought(row, generated[row], end, text)
                            restart.append(b)
                    if chains.finish[row] is not None:
                        final_len[row] = len(generated[row])
                        finished.append(b)
                if restart:
                    tok_in_thought[restart] = 0
                if finished:
                    done[finished] = True
                if bool(done.all()):
                    break
                n_done = int(done.sum())
                if n_done >= max(1, int(self.prune_fraction * len(active))):
                    keep = (~done).nonzero()[:, 0]
                    cache.batch_select_indices(keep)
                    attn, next_pos, tok, active, tok_in_thought = attn[keep], next_pos[keep], tok[keep], active[keep], tok_in_thought[keep]
                    done = done[keep]
            attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
            out = self.model(input_ids=tok[:, None], attention_mask=attn, position_ids=next_pos[:, None], use_cache=True, **{self._cache_kw: cache})
            cache, last_logits = _cache_of(out), out.logits[:, -1, :]
            next_pos = next_pos + 1
            if len(step_tokens) >= 64:
                flush()
        flush()
        # a finished row stays in the batch until pruned: drop what it sampled after finishing
        return [(generated[r][: final_len[r]], logprobs[r][: final_len[r]], chains.spans[r], chains.finish[r]) for r in range(n_rows)]

    def _generator(self, seed: int) -> torch.Generator:
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed)
        return gen

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

    def _rollout(self, req: ThoughtRequest, gen_ids, lps, spans, finish) -> Rollout:
        response = list(req.prefix_ids) + gen_ids
        thoughts = [self.decode(response[a:b]) for a, b in spans]
        return Rollout(prompt_ids=list(req.prompt_ids), response_ids=response, prefix_len=len(req.prefix_ids), spans=[tuple(s) for s in spans], logprobs=lps, thoughts=thoughts, text=self.decode(response), finish_reason=finish, adapter_version=self.adapter_version)

    def generate_thoughts(self, requests: list[ThoughtRequest], limits: ThoughtLimits, sampling: SamplingParams) -> list[list[Rollout]]:
        gen = self._generator(sampling.seed)
        out: list[list[Rollout]] = [[] for _ in requests]
        for chunk in self._chunks(requests, lambda r: r.n):
            reqs = [requests[i] for i in chunk]
            rows = self._decode([list(r.prompt_ids) + list(r.prefix_ids) for r in reqs], [r.n for r in reqs], [list(r.prefix_ids) for r in reqs], [list(r.prefix_spans) for r in reqs], limits, sampling, gen)
            k = 0
            for i, req in zip(chunk, reqs):
                for _ in range(req.n):
                    out[i].append(self._rollout(req, *rows[k]))
                    k += 1
        return out

    def complete(self, prompts: list[list[int]], max_tokens: int, sampling: SamplingParams) -> list[Completion]:
        limits = ThoughtLimits(stop="", max_thoughts=1, max_thought_tokens=max_tokens, max_response_tokens=max_tokens, max_model_len=10**9)
        gen = self._generator(sampling.seed)
        out: list[Completion] = []
        for chunk in self._chunks(prompts, lambda p: 1):
            ps = [prompts[i] for i in chunk]
            for ids, lps, _, finish in self._decode(ps, [1] * len(ps), [[] for _ in ps], [[] for _ in ps], limits, sampling, gen):
                out.append(Completion(ids=ids, text=self.decode(ids), logprobs=lps, finish_reason="length" if finish != "eos" else "eos", adapter_version=self.adapter_version))
        return out

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
            response, spans, lps = list(req.prefix_ids), list(req.prefix_spans), []
            state = _Chains(engine, limits, [len(req.prompt_ids) + len(req.prefix_ids)], [list(req.prefix_ids)], [list(req.prefix_spans)])
            finish = state.finish[0]
            while finish is None:
                ctx = torch.tensor([list(req.prompt_ids) + response], device=engine.device)
                gen = model.generate(input_ids=ctx, attention_mask=torch.ones_like(ctx), max_new_tokens=limits.max_thought_tokens, do_sample=sampling.temperature > 0, temperature=sampling.temperature or None, top_p=sampling.top_p if sampling.temperature > 0 else None, top_k=sampling.top_k or None, pad_token_id=engine.pad_id, output_logits=True, return_dict_in_generate=True, **stop_kwargs)
                new = gen.sequences[0, ctx.shape[1]:].tolist()
                step_lp = [F.log_softmax(l[0].float() / (sampling.temperature or 1.0), -1)[t].item() for l, t in zip(gen.logits, new)]
                if tokenizer.eos_token_id in new:
                    cut = new.index(tokenizer.eos_token_id)
                    start = len(response)
                    response += new[:cut]
                    lps += step_lp[:cut]
                    if cut:
                        state.spans[0].append((start, len(response)))
                    finish = "eos"
                    break
                response += new
                lps += step_lp
                state.prefixes[0] = list(req.prefix_ids)
                state.end_thought(0, response[len(req.prefix_ids):], len(response))
                finish = state.finish[0]
            spans = state.spans[0]
            chains.append(engine._rollout(req, response[len(req.prefix_ids):], lps, spans, finish))
        out.append(chains)
    return out

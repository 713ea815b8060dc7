"""Rollout engine speed, as ratios measured in one run (this machine is noisy; absolute numbers
are printed for context only).

1. Thought-structured generation (HFEngine: one continuous KV-cached decode that tracks thought
   boundaries and chain-end rules) vs one plain `model.generate()` producing the same number of
   tokens for the same rows. Target ratio >= 0.8. The paper's mode (one `generate` call per
   thought with a stop string) is timed too.
2. G suffixes from a shared reset prefix: prefix encoded once and its KV cache expanded, vs the
   prefix re-encoded for every suffix.

    python bench/rollout_speed.py [--model builtin:tiny-arith] [--prompts 32] [--n 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:tiny-arith")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (the tiny preset uses 1; 0 = torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from srpo_core import templates
    from srpo_core.engine.base import SamplingParams, ThoughtLimits, ThoughtRequest
    from srpo_core.engine.hf import HFEngine, generate_thoughts_per_call
    from srpo_core.tasks import synthetic
    from srpo_core.tiny.build import resolve_model_path

    path = resolve_model_path(args.model)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    engine = HFEngine(model, tok, max_batch_rows=4096)
    limits = ThoughtLimits(max_thoughts=20, max_thought_tokens=16, max_response_tokens=256, max_model_len=512)
    problems = synthetic.make_split("test", args.prompts, 7)
    prompts = [engine.encode(templates.rollout_prompt("tiny_rollout_v1", p.question)) for p in problems]
    sampling = SamplingParams(temperature=1.0, seed=0)

    def thought_structured(seed):
        out = engine.generate_thoughts([ThoughtRequest(tuple(p), n=args.n) for p in prompts], limits, SamplingParams(1.0, seed=seed))
        return sum(r.generated_tokens for g in out for r in g)

    rows = [p for p in prompts for _ in range(args.n)]
    width = max(len(p) for p in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id)
    attn = torch.zeros_like(ids)
    for i, p in enumerate(rows):
        ids[i, width - len(p):] = torch.tensor(p)
        attn[i, width - len(p):] = 1

    def plain_generate(n_tokens):
        per_row = max(1, round(n_tokens / len(rows)))
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=1.0, top_p=1.0, max_new_tokens=per_row, min_new_tokens=per_row, pad_token_id=tok.pad_token_id)
        return per_row * len(rows)

    def timed(fn, *a):
        t = time.perf_counter()
        n = fn(*a)
        return n, time.perf_counter() - t

    thought_structured(99)  # warm-up
    ratios, ours_tps, plain_tps = [], [], []
    for r in range(args.repeats):
        n_ours, t_ours = timed(thought_structured, r)
        n_plain, t_plain = timed(plain_generate, n_ours)
        ours_tps.append(n_ours / t_ours)
        plain_tps.append(n_plain / t_plain)
        ratios.append(ours_tps[-1] / plain_tps[-1])
    few = [ThoughtRequest(tuple(p), n=1) for p in prompts[:4]]
    t = time.perf_counter()
    per_call = generate_thoughts_per_call(model, tok, few, limits, sampling)
    per_call_tps = sum(r.generated_tokens for g in per_call for r in g) / (time.perf_counter() - t)

    # shared prefixes: seeds' first thoughts as reset states
    seeds = [g[0] for g in engine.generate_thoughts([ThoughtRequest(tuple(p), n=1) for p in prompts], limits, SamplingParams(0.0))]
    shared, flat = [], []
    for p, s in zip(prompts, seeds):
        h = max(1, len(s.spans) - 1)
        end = s.spans[h - 1][1] if h >= 1 else 0
        shared.append(ThoughtRequest(tuple(p), n=args.n, prefix_ids=tuple(s.response_ids[:end]), prefix_spans=tuple(s.spans[:h])))
        flat += [ThoughtRequest(tuple(p), n=1, prefix_ids=tuple(s.response_ids[:end]), prefix_spans=tuple(s.spans[:h]))] * args.n
    sp_ratio = []
    for r in range(args.repeats):
        t = time.perf_counter()
        engine.generate_thoughts(shared, limits, SamplingParams(1.0, seed=r))
        t_once = time.perf_counter() - t
        t = time.perf_counter()
        engine.generate_thoughts(flat, limits, SamplingParams(1.0, seed=r))
        t_re = time.perf_counter() - t
        sp_ratio.append(t_re / t_once)
    mean_prefix = statistics.mean(len(q.prefix_ids) + len(q.prompt_ids) for q in shared)

    print(f"model {path}: {args.prompts} prompts x {args.n} samples, torch threads {torch.get_num_threads()}")
    print(f"thought-structured tokens/s: {statistics.median(ours_tps):.0f}   plain generate(): {statistics.median(plain_tps):.0f}   one call per thought: {per_call_tps:.0f}")
    print(f"RATIO thought-structured / plain generate (target >= 0.8): median {statistics.median(ratios):.2f}  runs {[round(x, 2) for x in ratios]}")
    print(f"(the one-call-per-thought reference decodes one chain at a time: {statistics.median(ours_tps) / per_call_tps:.0f}x slower per token here; context only)")
    print(
        f"RATIO shared prefix encoded once vs re-encoded per suffix (speed-up, mean context {mean_prefix:.0f} tokens): median {statistics.median(sp_ratio):.2f}  runs {[round(x, 2) for x in sp_ratio]}"
    )


if __name__ == "__main__":
    main()

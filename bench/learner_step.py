"""Learner costs, as ratios measured in one run (this machine is noisy; absolute numbers are for
context only).

1. Log-probs at a real vocabulary (Qwen2.5's 152,064, bf16 logits): what autograd keeps for the
   backward and the forward+backward time, sliced (`algos.token_logprobs(..., chunk_tokens)`, the
   learner's setting) vs one shot. Memory is counted exactly (bytes of saved tensors), not timed.
2. One learner step through `distributed.learn` with `train.processes` 1 (in this process) vs 2
   (FSDP2 under torchrun, gloo on a CPU): the launch + second model load is a fixed cost per
   epoch step; on GPUs the processes split the work instead of two CPU cores.

    python bench/learner_step.py [--tokens 2048] [--vocab 152064] [--sequences 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch


def logprob_costs(tokens: int, vocab: int, chunk: int, repeats: int) -> None:
    from srpo_core import algos

    torch.manual_seed(0)
    rows = 4
    logits = torch.randn(rows, tokens // rows, vocab, dtype=torch.bfloat16)
    targets = torch.randint(0, vocab, (rows, tokens // rows))

    def once(chunk_tokens: int) -> tuple[int, float]:
        x = logits.clone().requires_grad_(True)
        saved: list[int] = []
        t = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s.numel() * s.element_size()) or s, lambda s: s):
            lp = algos.token_logprobs(x, targets, 0.7, chunk_tokens)
        lp.sum().backward()
        return sum(saved), time.perf_counter() - t

    res = {c: [once(c) for _ in range(repeats)] for c in (0, chunk)}
    mem = {c: res[c][0][0] for c in res}
    sec = {c: statistics.median(r[1] for r in res[c]) for c in res}
    print(f"log-probs, {tokens} tokens x vocab {vocab} (bf16 logits {logits.numel() * 2 / 1e9:.2f} GB):")
    print(f"  saved for backward   one shot {mem[0] / 1e9:6.2f} GB   sliced ({chunk} tokens) {mem[chunk] / 1e9:6.2f} GB   ratio {mem[chunk] / mem[0]:.3f}")
    print(f"  forward + backward   one shot {sec[0]:6.2f} s    sliced {sec[chunk]:6.2f} s    ratio {sec[chunk] / sec[0]:.2f}")


def process_costs(n_seqs: int, repeats: int) -> None:
    from srpo_core.config import load_config
    from srpo_core.distributed import learn
    from srpo_core.learner import TrainSequence

    rng = random.Random(0)
    seqs = []
    for i in range(n_seqs):
        p = [rng.randrange(3, 40) for _ in range(rng.randrange(20, 40))]
        r = [rng.randrange(3, 40) for _ in range(rng.randrange(40, 200))]
        seqs.append(TrainSequence(p, r, 0, rng.choice([1.0, -1.0, 0.5]), [-1.0] * len(r), i // 8))
    times: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(repeats):
            for n in (1, 2):  # interleaved: drift on a noisy machine hits both
                cfg = load_config("tiny", {"train.processes": n})
                t = time.perf_counter()
                learn(cfg, seqs, None, Path(tmp) / f"{n}-{rep}", 0)
                times[n].append(time.perf_counter() - t)
    med = {n: statistics.median(v) for n, v in times.items()}
    print(f"learner step, tiny model, {n_seqs} sequences ({sum(len(s.prompt_ids) + len(s.response_ids) for s in seqs)} tokens):")
    print(f"  processes=1 {med[1]:6.2f} s   processes=2 (torchrun, gloo) {med[2]:6.2f} s   ratio {med[2] / med[1]:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=152064)
    ap.add_argument("--sequences", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from srpo_core.learner import LOGPROB_CHUNK_TOKENS

    logprob_costs(args.tokens, args.vocab, LOGPROB_CHUNK_TOKENS, args.repeats)
    process_costs(args.sequences, args.repeats)


if __name__ == "__main__":
    main()

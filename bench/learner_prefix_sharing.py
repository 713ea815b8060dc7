"""Learner-step time with each shared context forwarded once vs every sequence whole
(`train.share_prefix_forward` true / false), at context:suffix lengths 1:1 and 3:1, all measured in
one run (interleaved, median of repeats: this machine is shared and noisy, so only the ratios mean
something).

    python bench/learner_prefix_sharing.py [--hidden 256] [--layers 4] [--length 512] [--group 8] [--groups 1] [--repeats 3] [--threads 1]

A step is `Learner.update` on `--groups` shared-prefix groups of `--group` suffixes each, every
sequence `--length` tokens: a context x* = prompt + reset prefix of length L * r / (r + 1) and a
suffix of L / (r + 1), r the context:suffix ratio (advantages +-1, one mini-batch, one micro-batch
per group). Unshared, a step runs G (Lc + Ls) tokens per group through the model; shared, Lc + G Ls
(the token ratio is printed beside the time ratio; attention over the context is still paid per
suffix token). The model is a random Qwen2 (bench/gpu_smoke.py's builder) on this machine's device.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def sequences(ratio: int, length: int, group: int, groups: int, seed: int = 0):
    from srpo_core.learner import TrainSequence

    rng = random.Random(seed)
    context, suffix = length * ratio // (ratio + 1), length // (ratio + 1)
    out = []
    for k in range(groups):
        prompt = [rng.randrange(3, 100) for _ in range(max(1, context // 4))]
        prefix = [rng.randrange(3, 100) for _ in range(context - len(prompt))]
        for j in range(group):
            x = [rng.randrange(3, 100) for _ in range(suffix)]
            out.append(TrainSequence(prompt, prefix + x, len(prefix), 1.0 if j % 2 else -1.0, [-1.0] * len(x), k))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--groups", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (1: no OpenMP contention on a shared machine; 0: torch's default)")
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from bench.gpu_smoke import build_model
    from srpo_core.config import load_config
    from srpo_core.learner import Learner

    cfg = load_config("tiny")
    with tempfile.TemporaryDirectory() as tmp:
        path = build_model(Path(tmp), argparse.Namespace(hidden=args.hidden, layers=args.layers, heads=8, kv_heads=2), torch.float32)
        learners = {share: Learner(str(path), cfg.lora, cfg.optim, share_prefix_forward=share) for share in (True, False)}
        print(
            f"random Qwen2 (hidden {args.hidden}, {args.layers} layers) on {learners[True].device} ({torch.get_num_threads()} threads), "
            f"{args.groups} groups x {args.group} suffixes of {args.length} tokens, median of {args.repeats}:"
        )
        for ratio in (1, 3):
            seqs = sequences(ratio, args.length, args.group, args.groups)
            times: dict[bool, list[float]] = {True: [], False: []}
            tokens = {}
            for share, learner in learners.items():  # warm-up (allocator, kernels), not timed
                learner.update(seqs, args.groups, args.group)
            for _ in range(args.repeats):
                for share, learner in learners.items():  # interleaved: drift hits both
                    if torch.cuda.is_available():
                        torch.cuda.synchronize()
                    t = time.perf_counter()
                    metrics = learner.update(seqs, args.groups, args.group)
                    if torch.cuda.is_available():
                        torch.cuda.synchronize()
                    times[share].append(time.perf_counter() - t)
                    tokens[share] = metrics["learner/forward_tokens"]
            med = {k: statistics.median(v) for k, v in times.items()}
            context = args.length * ratio // (ratio + 1)
            print(
                f"  context:suffix {ratio}:1 ({context}:{args.length - context})  unshared {med[False]:7.3f} s  shared {med[True]:7.3f} s"
                f"  time ratio shared/unshared {med[True] / med[False]:.2f}  (forwarded tokens {tokens[True] / tokens[False]:.2f})"
            )


if __name__ == "__main__":
    main()

"""What the inference server's shared batch (srpo_core/server/batching.py) buys: `--shards`
concurrent `/generate_thoughts` calls (as the flow's shards make them), each of its share of
`--prompts` prompts x 8 chains, served by one server decoding them together (default) and by one
serving them in turn (`--serial-calls`), both started here on loopback with the tiny model. Prints
the wall time of the concurrent calls and the ratio shared/serial per prompt count, median over
`--repeats` (the two servers alternate, the machine is noisy).

    python bench/server_shared_batch.py [--prompts 16 64] [--shards 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time


def concurrent_calls(engine, shards: list[list[tuple[int, ...]]], limits, seed: int) -> float:
    from srpo_core.engine.base import SamplingParams, ThoughtRequest

    def call(k: int) -> None:
        engine.generate_thoughts([ThoughtRequest(p, n=8) for p in shards[k]], limits, SamplingParams(temperature=1.0, seed=seed + k))

    threads = [threading.Thread(target=call, args=(k,)) for k in range(len(shards))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from srpo_core import templates
    from srpo_core.config import load_config
    from srpo_core.server.launch import start_server
    from srpo_core.shard import limits_of
    from srpo_core.tasks import get_task
    from srpo_core.tiny.build import resolve_model_path

    cfg = load_config("tiny")
    limits = limits_of(cfg)  # the phases' thought limits (stop string included)
    items = get_task("synthetic").items("train", max(args.prompts), 0)
    times: dict[tuple[str, int], list[float]] = {}
    path = resolve_model_path(cfg.model.name_or_path)
    for rep in range(args.repeats):
        for mode, extra in (("shared", ()), ("serial", ("--serial-calls",)))[:: 1 if rep % 2 == 0 else -1]:
            with tempfile.TemporaryDirectory() as tmp, start_server(path, threads=1, extra_args=extra, workdir=tmp) as handle:
                engine = handle.engine()
                prompts = [tuple(engine.encode(templates.rollout_prompt(cfg.rollout.template, it.question))) for it in items]
                for n in args.prompts:
                    shards = [prompts[:n][k :: args.shards] for k in range(args.shards)]
                    concurrent_calls(engine, shards, limits, seed=1000)  # warm-up
                    times.setdefault((mode, n), []).append(concurrent_calls(engine, shards, limits, seed=rep))
    print(f"{args.shards} concurrent /generate_thoughts calls, tiny model on CPU (1 thread), server batch cap 256 rows, median of {args.repeats}")
    print(f"{'prompts x 8':>12s} {'rows per call':>14s} {'shared':>9s} {'in turn':>9s} {'shared/in turn':>15s}")
    for n in args.prompts:
        shared, serial = statistics.median(times[("shared", n)]), statistics.median(times[("serial", n)])
        print(f"{n:>12d} {n * 8 // args.shards:>14d} {shared:>8.2f}s {serial:>8.2f}s {shared / serial:>14.2f}x")


if __name__ == "__main__":
    main()

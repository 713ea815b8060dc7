"""Host memory of the FSDP learner's processes, rank-0 loading vs every process materialising the
weights, measured in one run (peak RSS per process; the baseline replaces
`accelerate.init_empty_weights` by a no-op, so non-zero ranks build the model with real tensors).

    python bench/learner_host_memory.py [--hidden 1024] [--layers 12] [--processes 2]

Builds a random Qwen2 model (bench/gpu_smoke.py's builder), then starts `torchrun` twice per
repeat, each process constructing the `Learner` (FSDP2-sharded) and reporting its peak RSS.
On a CPU the shards stay in host memory, so a non-zero rank's peak is imports + its shard with
rank-0 loading, imports + the whole model without; on GPUs the shards move to the device.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def worker(model_path: str, out: str) -> None:
    import accelerate
    import torch.distributed as dist

    from srpo_core import fsdp as D

    if os.environ.get("SRPO_BENCH_ALL_LOAD"):
        accelerate.init_empty_weights = contextlib.nullcontext  # baseline: every rank materialises the weights
    from srpo_core.config import load_config
    from srpo_core.learner import learner_from_config

    D.init_from_env()
    learner_from_config(load_config("tiny", {"model.name_or_path": model_path, "lora.r": 8}))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    Path(out, f"rank{dist.get_rank()}.json").write_text(json.dumps({"rss_gb": rss}))
    dist.destroy_process_group()


def run(model_path: Path, processes: int, all_load: bool) -> list[float]:
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "OMP_NUM_THREADS": "1", **({"SRPO_BENCH_ALL_LOAD": "1"} if all_load else {})}
        subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", __file__, "--worker", str(model_path), out], env=env, check=True, capture_output=True
        )
        return [json.loads(Path(out, f"rank{r}.json").read_text())["rss_gb"] for r in range(processes)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    import torch

    from bench.gpu_smoke import build_model

    with tempfile.TemporaryDirectory() as tmp:
        path = build_model(Path(tmp), argparse.Namespace(hidden=args.hidden, layers=args.layers, heads=16, kv_heads=4), torch.float32)
        size = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 1e9
        rows = {False: [], True: []}
        for _ in range(args.repeats):  # interleaved
            for all_load in (True, False):
                rows[all_load].append(run(path, args.processes, all_load))
    rank0 = {k: max(r[0] for r in v) for k, v in rows.items()}
    others = {k: max(max(r[1:]) for r in v) for k, v in rows.items()}
    print(f"random Qwen2, {size:.2f} GB of fp32 weights, {args.processes} processes, peak RSS (GB, max over {args.repeats} runs):")
    print(f"  every process materialises the weights: rank 0 {rank0[True]:.2f}, other ranks {others[True]:.2f}")
    print(f"  rank-0 loading (meta skeletons):        rank 0 {rank0[False]:.2f}, other ranks {others[False]:.2f}")
    print(f"  other ranks, rank-0 loading / every process: {others[False] / others[True]:.2f}")


if __name__ == "__main__":
    main()

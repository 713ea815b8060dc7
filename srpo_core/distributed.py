"""The learner over several processes: FSDP2 (`torch.distributed.fsdp.fully_shard`) data-parallel
sharding, launched with torchrun, configured from the srpo YAML (`train.processes`).

    python -m torch.distributed.run --standalone --nproc-per-node 4 -m srpo_core.distributed REQUEST.json

`learn(cfg, sequences, ...)` is what the flow's learner step calls: with one process it updates
in-process, with more it writes a request file, runs this module under torchrun (one process per
GPU, or gloo processes on a CPU) and reads the result back. This module is the launcher only: the
FSDP2 primitives (process group, device, sharding) are in `srpo_core.fsdp`, the model in
`srpo_core.learner`, which imports `fsdp` and never this module.

Sequences of a mini-batch are split over the processes by `Learner.update` (equal numbers of
micro-batches per process, since an FSDP forward is a collective); each process's loss is scaled
by world/len(batch) so the averaged gradient equals the single-process one. What is saved is
process-count independent: the adapter as peft writes it, the optimizer state keyed by parameter
name (`torch.distributed.checkpoint.state_dict`), so a run may resume with another `processes`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from srpo_core.fsdp import init_from_env, peak_memory, resolve_processes, world


def update_and_save(cfg, sequences, parent_dir: Path | None, out_dir: Path, seed: int, canary_path: Path | None = None) -> dict[str, float]:
    """Load the learner (from `parent_dir`'s adapter and optimizer if given), one training step,
    save `out_dir/adapter` and `out_dir/optimizer.pt`; with `canary_path`, the learner's scores of
    the canary sequence for the inference server's weight-sync check. Runs on every process."""
    import time

    from srpo_core.learner import learner_from_config
    from srpo_core.server.canary import canary_reference

    torch.manual_seed(seed)
    start = time.perf_counter()
    learner = learner_from_config(cfg, str(parent_dir / "adapter") if parent_dir else None)
    if parent_dir is not None:
        learner.load_optimizer(parent_dir / "optimizer.pt")
    metrics = learner.update(sequences, cfg.train.mini_batch_prompts, cfg.train.micro_batch_sequences, cfg.train.update_epochs, micro_batch_tokens=cfg.train.micro_batch_tokens)
    metrics["time/learner"] = time.perf_counter() - start
    metrics["learner/processes"] = float(world()[1])
    metrics.update(peak_memory())
    learner.save_adapter(out_dir / "adapter")
    learner.save_optimizer(out_dir / "optimizer.pt")
    if canary_path is not None:
        ref = canary_reference(learner)
        if world()[0] == 0:
            canary_path.write_text(json.dumps(asdict(ref)))
    return metrics


def learn(cfg, sequences, parent_dir: Path | None, out_dir: Path, seed: int, canary_path: Path | None = None) -> dict[str, float]:
    """The learner step of the flow: `update_and_save` in this process when `train.processes`
    resolves to 1, else under torchrun with that many processes (this process waits)."""
    if parent_dir is not None:
        for need in ("adapter/adapter_config.json", "optimizer.pt"):
            if not (parent_dir / need).exists():
                raise FileNotFoundError(f"{parent_dir / need}: the checkpoint to continue from is incomplete (needs adapter/ and optimizer.pt)")
    n = resolve_processes(cfg.train.processes)
    if torch.cuda.is_available() and n > torch.cuda.device_count():
        raise ValueError(f"train.processes={cfg.train.processes}: {n} learner processes but {torch.cuda.device_count()} visible GPUs (NCCL needs one GPU per process)")
    out_dir.mkdir(parents=True, exist_ok=True)
    if n == 1:
        return update_and_save(cfg, sequences, parent_dir, out_dir, seed, canary_path)
    with tempfile.TemporaryDirectory(prefix="srpo-learner-") as tmp:
        request = Path(tmp) / "request.json"
        result = Path(tmp) / "metrics.json"
        request.write_text(json.dumps({
            "config": cfg.to_dict(), "sequences": [asdict(s) for s in sequences], "seed": seed,
            "parent_dir": str(parent_dir) if parent_dir else None, "out_dir": str(out_dir),
            "canary_path": str(canary_path) if canary_path else None, "metrics_path": str(result),
        }))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m", "srpo_core.distributed", str(request)]
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(max(cfg.model.threads, 1)))
        proc = subprocess.run(cmd, check=False, env=env, preexec_fn=_dies_with(os.getpid()))
        if proc.returncode != 0:
            raise RuntimeError(f"the learner failed under torchrun with {n} processes (exit {proc.returncode}); each process's traceback is in the log above. Command: {' '.join(cmd)}")
        return json.loads(result.read_text())


def _dies_with(parent: int):
    """preexec_fn: on Linux the child gets SIGTERM when `parent` dies (PR_SET_PDEATHSIG), so a
    killed learner step leaves no torchrun agent behind; the agent's SIGTERM handler stops its
    workers (and their GPU memory) before a retry or a resume starts new ones."""
    if not sys.platform.startswith("linux"):
        return None

    def set_death_signal() -> None:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(1)

    return set_death_signal


def _record(fn):
    """torchrun's `record`: a failing process's exception goes into the agent's failure summary."""
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(fn)


@_record
def main(argv: list[str] | None = None) -> int:
    """Worker entry point, one per process under torchrun: `python -m srpo_core.distributed REQUEST.json`."""
    from srpo_core.config import from_dict
    from srpo_core.learner import TrainSequence
    from srpo_core.runtime import set_threads

    (path,) = argv if argv is not None else sys.argv[1:]
    req = json.loads(Path(path).read_text())
    cfg = from_dict(req["config"])
    set_threads(cfg)
    init_from_env()
    try:
        seqs = [TrainSequence(**s) for s in req["sequences"]]
        parent = Path(req["parent_dir"]) if req["parent_dir"] else None
        canary = Path(req["canary_path"]) if req["canary_path"] else None
        metrics = update_and_save(cfg, seqs, parent, Path(req["out_dir"]), req["seed"], canary)
        if world()[0] == 0:
            Path(req["metrics_path"]).write_text(json.dumps(metrics))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

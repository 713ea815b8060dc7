"""A learner process that lives for the whole training, so the flow's `learner` step imports no
torch (`rollout.server_url: auto`: the training's local services, srpo_core/flow_driver.py).

    python -m srpo_core.learner_worker --dir DIR        # started under srpo_core.watchdog

Protocol (files in DIR; local only, like the `auto` server):
    requests/<id>.json   written by `submit` (atomically: tmp + rename): the step's context
                         (flow_phases.StepContext) and its shard keys in the artifact store
    results/<id>.json    written by the worker when done: {"outcome": StepOutcome} or {"error": traceback}
    ready                written once torch and the learner code are imported
    pid                  the worker's pid (`submit` fails, naming the log, when it is gone)

Each request runs `flow_phases.learn_here` exactly as the learner step would in its own process
(advantages, the LoRA update, the checkpoint, the server sync, `latest`): the update seeds torch
itself and loads the parent adapter and optimizer state from the store, so a step's result does
not depend on which process ran it or on the requests before it. What the worker saves is the process start and the imports (torch, transformers, peft:
most of a tiny learner step); on CUDA it returns cached memory after each request.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

from srpo_core.learner_client import LearnerWorkerError, submit, write_atomic  # noqa: F401  (the protocol's client half)


def _handle(request: dict) -> dict:
    import torch

    from srpo_core.flow_phases import StepContext, learn_here

    try:
        return asdict(learn_here(StepContext(**request["ctx"]), request["shard_keys"], lease=request.get("lease") or ""))
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the inference server may share the GPU between steps


def serve(workdir: Path, poll_s: float = 0.05) -> None:
    import torch  # noqa: F401  (the imports this worker exists to keep)

    import srpo_core.distributed  # noqa: F401
    import srpo_core.flow_phases  # noqa: F401
    import srpo_core.learner  # noqa: F401

    requests, results = workdir / "requests", workdir / "results"
    (workdir / "ready").write_text(str(os.getpid()))
    print(f"learner worker {os.getpid()} ready in {workdir}", flush=True)
    while True:
        pending = sorted(requests.glob("*.json"), key=lambda p: p.stat().st_mtime)
        if not pending:
            time.sleep(poll_s)
            continue
        path = pending[0]
        request = json.loads(path.read_text())
        path.unlink()
        begin = time.perf_counter()
        try:
            answer = {"outcome": _handle(request)}
        except Exception:  # the flow's learner step raises it, whole
            answer = {"error": traceback.format_exc()}
        write_atomic(results / path.name, answer)
        print(f"request {path.stem}: {'failed' if 'error' in answer else 'done'} in {time.perf_counter() - begin:.2f} s", flush=True)


def prepare_dir(workdir: Path) -> Path:
    for sub in ("requests", "results"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
        for stale in (workdir / sub).glob("*.json"):
            stale.unlink()
    (workdir / "ready").unlink(missing_ok=True)
    return workdir


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", required=True)
    args = ap.parse_args(argv)
    work = prepare_dir(Path(args.dir))
    (work / "pid").write_text(str(os.getpid()))
    serve(work)


if __name__ == "__main__":
    sys.exit(main())

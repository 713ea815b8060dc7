"""The client half of the learner worker's file protocol (srpo_core/learner_worker.py has the
protocol and the worker): the flow's `learner` step submits a request and waits for its result,
importing no torch."""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import asdict
from pathlib import Path

from srpo_core.watchdog import alive


class LearnerWorkerError(RuntimeError):
    """The worker failed a request (its traceback is in the message) or is gone."""


def write_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def submit(workdir: str | os.PathLike, ctx, shard_keys: list[str], poll_s: float = 0.1, lease: str = "") -> dict:
    """Run the learner phase of epoch step `ctx` (a flow_phases.StepContext) over the shards at
    `shard_keys` in the worker at `workdir`; its StepOutcome as a dict."""
    work = Path(workdir)
    pid = int((work / "pid").read_text())
    rid = uuid.uuid4().hex
    result = work / "results" / f"{rid}.json"
    write_atomic(work / "requests" / f"{rid}.json", {"ctx": asdict(ctx), "shard_keys": list(shard_keys), "lease": lease})
    while not result.exists():
        if not alive(pid):
            raise LearnerWorkerError(f"the learner worker (pid {pid}) is gone; its log: {work / 'worker.log'}")
        time.sleep(poll_s)
    answer = json.loads(result.read_text())
    result.unlink(missing_ok=True)
    if "error" in answer:
        raise LearnerWorkerError(f"the learner worker failed epoch step {ctx.step} (log {work / 'worker.log'}):\n{answer['error']}")
    return answer["outcome"]



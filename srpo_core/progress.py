"""The training flow's console: one progress display instead of the epoch-step runs' task logs.

Who writes, who reads
    The flow's steps run in Metaflow task processes whose output Metaflow relays line by line, so
    they cannot draw a display. They report `events` (one JSON object a line) to the file named by
    SRPO_PROGRESS_FILE; `console_progress()`, entered by flows/srpo_flow.py in the process the
    user started (Metaflow's runtime, whose environment every task inherits), creates that file,
    follows it in a thread and draws ONE display: a live panel on a terminal, one line per change
    otherwise (logs, CI, tests). Without a listener (SRPO_PROGRESS_FILE unset: a task run by hand
    or on Kubernetes) `emit` prints the same line to stdout, where Metaflow relays it.

Events (`type` plus fields)
    training    training_id, total_steps, first_step, log_path, artifacts
    phase       step, phase                      (a task of the epoch-step run started)
    step_done   step, wall, metrics, evaluations (an epoch-step run finished)
    failed      step, message

The display shows epoch step k of N, the phase running, reward and pass rates of the last step,
the last evaluation, elapsed time and ETA (mean wall time of the steps done here x steps left),
and where the epoch-step runs' task logs go.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ENV = "SRPO_PROGRESS_FILE"
SHOWN_METRICS = (
    ("reward/base/mean", "reward base"), ("reward/shared_prefix/mean", "reward sp"), ("reward/fallback/mean", "reward fallback"),
    ("pass_rate/base", "pass base"), ("pass_rate/shared_prefix", "pass sp"), ("pass_rate/fallback", "pass fallback"),
)


def emit(event: dict) -> None:
    """Report one event to the display (or, without one, print its line)."""
    path = os.environ.get(ENV)
    if not path:
        state = State()
        state.apply(event)
        print(state.line(event), flush=True)
        return
    data = (json.dumps(event, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)  # one write per event: lines never interleave
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    s = int(round(max(seconds, 0.0)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


@dataclass
class State:
    """What the display shows, folded from the events."""

    started: float = field(default_factory=time.monotonic)
    training_id: str = ""
    total_steps: int = 0
    first_step: int = 0
    step: int | None = None
    phase: str = ""
    done_walls: list[float] = field(default_factory=list)
    last_step: int | None = None
    metrics: dict = field(default_factory=dict)
    evaluation: tuple[int, dict] | None = None
    log_path: str = ""
    artifacts: str = ""
    failed: str = ""

    def apply(self, event: dict) -> None:
        kind = event.get("type")
        if kind == "training":
            self.training_id = str(event.get("training_id", ""))
            self.total_steps = int(event.get("total_steps", 0))
            self.first_step = int(event.get("first_step", 0))
            self.log_path = str(event.get("log_path", ""))
            self.artifacts = str(event.get("artifacts", ""))
        elif kind == "phase":
            self.step, self.phase = int(event["step"]), str(event["phase"])
        elif kind == "step_done":
            self.last_step = int(event["step"])
            self.step, self.phase = self.last_step, "done"
            self.done_walls.append(float(event.get("wall", 0.0)))
            self.metrics = dict(event.get("metrics") or {})
            evals = event.get("evaluations") or {}
            if evals:
                at = max(evals, key=int)
                self.evaluation = (int(at), dict(evals[at]))
        elif kind == "failed":
            self.step, self.phase, self.failed = event.get("step"), "failed", str(event.get("message", ""))

    def eta(self) -> float | None:
        if not self.done_walls or not self.total_steps:
            return None
        left = self.total_steps - (self.last_step + 1 if self.last_step is not None else self.first_step)
        return sum(self.done_walls) / len(self.done_walls) * max(left, 0)

    def fields(self) -> list[tuple[str, str]]:
        """(label, value) pairs of the display, in order."""
        out = []
        if self.step is not None:
            out.append(("epoch step", f"{self.step + 1}/{self.total_steps or '?'}"))
            out.append(("phase", self.phase))
        for key, label in SHOWN_METRICS:
            if key in self.metrics:
                out.append((label, f"{float(self.metrics[key]):.3f}"))
        if self.evaluation is not None:
            at, accs = self.evaluation
            out.append((f"eval @ step {at}", " ".join(f"{name} {float(acc):.3f}" for name, acc in sorted(accs.items()))))
        out.append(("elapsed", _clock(time.monotonic() - self.started)))
        out.append(("ETA", _clock(self.eta())))
        return out

    def line(self, event: dict | None = None) -> str:
        if event is not None and event.get("type") == "training":
            return f"training {self.training_id}: {self.total_steps} epoch steps (from step {self.first_step}); epoch-step task logs: {self.log_path}"
        if event is not None and event.get("type") == "failed":
            return f"epoch step {self.step + 1 if isinstance(self.step, int) else '?'}/{self.total_steps or '?'} FAILED (task logs: {self.log_path})"
        if event is not None and event.get("type") == "phase":  # one short line per phase; the whole state after each step
            return f"progress: epoch step {self.step + 1}/{self.total_steps or '?'} | phase {self.phase} | elapsed {_clock(time.monotonic() - self.started)} | ETA {_clock(self.eta())}"
        return "progress: " + " | ".join(f"{k} {v}" for k, v in self.fields())


class _Follower:
    """Reads new events from the progress file (whole lines only)."""

    def __init__(self, path: Path):
        self.path, self.offset, self.partial = path, 0, b""

    def new_events(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        events = []
        for raw in lines:
            try:
                events.append(json.loads(raw))
            except json.JSONDecodeError:
                continue  # not ours: ignore rather than stop the display
        return events


def _render(state: State):
    from rich.panel import Panel
    from rich.table import Table

    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    for label, value in state.fields():
        grid.add_row(label, value)
    if state.log_path:
        grid.add_row("task logs", state.log_path)
    return Panel(grid, title=f"srpo training {state.training_id}".strip(), expand=False)


@contextmanager
def console_progress(argv: list[str] | None = None, poll_s: float = 0.5, live: bool | None = None):
    """Draw the progress display while the block runs, when `argv` is a `run` or `resume` of the
    flow (not one of its task processes). Sets SRPO_PROGRESS_FILE for the tasks."""
    argv = sys.argv if argv is None else argv
    commands = [a for a in argv[1:] if not a.startswith("-")]
    if not commands or commands[0] not in ("run", "resume") or os.environ.get(ENV):
        yield None
        return
    handle, name = tempfile.mkstemp(prefix="srpo-progress-", suffix=".jsonl")
    os.close(handle)
    os.environ[ENV] = name
    follower, state, stop = _Follower(Path(name)), State(), threading.Event()
    live = sys.stdout.isatty() if live is None else live

    def plain() -> None:
        while True:
            stopping = stop.wait(poll_s)
            for event in follower.new_events():
                state.apply(event)
                print(state.line(event), flush=True)
            if stopping:
                return

    def drawn() -> None:
        from rich.console import Console
        from rich.live import Live

        console = Console(file=sys.__stdout__)
        with Live(_render(state), console=console, refresh_per_second=2, redirect_stdout=False, redirect_stderr=False) as display:
            while True:
                stopping = stop.wait(poll_s)
                for event in follower.new_events():
                    state.apply(event)
                    if event.get("type") in ("training", "failed"):
                        console.print(state.line(event))
                display.update(_render(state))
                if stopping:
                    return

    thread = threading.Thread(target=drawn if live else plain, name="srpo-progress", daemon=True)
    thread.start()
    try:
        yield state
    finally:
        stop.set()
        thread.join(timeout=10)
        os.environ.pop(ENV, None)
        Path(name).unlink(missing_ok=True)

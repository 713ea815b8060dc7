"""Run a command for as long as another process lives:

    python -m srpo_core.watchdog --watch-pid PID -- COMMAND [ARGS...]

Starts COMMAND as a child and waits. When process PID is gone (the Metaflow runtime of a training,
even after `kill -9`), or when this process gets SIGTERM/SIGINT/SIGHUP, the child gets SIGTERM
and, after `--grace` seconds, SIGKILL. Exits with the child's exit code. The training's inference
server (`rollout.server_url: auto`, srpo_core/flow_driver.start_training_server) runs under it, so
a killed training leaves no server behind. Standard library only: it starts in milliseconds.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time


def alive(pid: int) -> bool:
    """Whether process `pid` exists (the one liveness check of the training's services)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--watch-pid", type=int, required=True)
    ap.add_argument("--grace", type=float, default=15.0)
    ap.add_argument("--poll", type=float, default=0.5)
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("no command after --")
    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    child = subprocess.Popen(command)
    while child.poll() is None:
        if stop["signal"] is not None or not alive(args.watch_pid):
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=args.grace)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            break
        time.sleep(args.poll)
    return child.returncode if child.returncode >= 0 else 128 - child.returncode


if __name__ == "__main__":
    sys.exit(main())

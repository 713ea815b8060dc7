"""Concurrent sampling calls decoded together: the server's shared continuous batch.

The contract:
  * Calls that sample (`/generate_thoughts`, `/complete`) and arrive while others run are not
    served in turn: each becomes a `Ticket`, and one worker thread decodes every ticket of one
    adapter version in one continuous batch of the engine (engine/hf.py `ContinuousBatch`): a
    ticket's rows join at the next decode step and leave when done, and its caller is answered the
    moment its last row finishes. This is how the flow's prompt shards overlap (the issue's
    "foreach branches running at once against one inference server"): shard A's suffixes decode
    in the same forward passes as shard B's seed search.
  * Same results as the call alone: the engine keys every chain's randomness by (sampling seed,
    context, salt, chain number within its call), never by batch position, so a ticket's chains
    are the chains of the same call served alone; only the float arithmetic of a batch of other
    rows differs (tests/test_scheduler.py, "a chain does not depend on its batch").
  * One version per batch, selected under the host's model lock for the whole batch (adapter loads,
    scoring and calls of another version wait for the lock as before). Tickets of the running
    version join the running batch only while no ticket of another version waits, so no version
    starves. The version and content hash a ticket pins are checked when the batch starts (409 for
    that ticket alone, as `ModelHost.run`).
  * Failures: a ticket whose submission raises gets that error alone; an error while decoding (a
    device error marks the server failed, see `ModelHost._device_guard`) fails every ticket of
    the batch; the worker goes on with the next batch.
"""

from __future__ import annotations

import logging
import threading
from collections import deque

log = logging.getLogger(__name__)


class Ticket:
    def __init__(self, version: str, sha256: str | None, submit):
        self.version, self.sha256, self.submit = version, sha256, submit
        self.done = threading.Event()
        self.result = None
        self.error: BaseException | None = None

    def finish(self, result) -> None:
        self.result = result
        self.done.set()

    def fail(self, exc: BaseException) -> None:
        self.error = exc
        self.done.set()


class SharedBatch:
    """The worker thread and its queue of tickets for one `ModelHost` (see the module docstring)."""

    def __init__(self, host):
        self.host = host
        self.queue: deque[Ticket] = deque()
        self.cv = threading.Condition()
        self.worker: threading.Thread | None = None
        self.stats = {"batches": 0, "tickets": 0, "most_tickets_in_a_batch": 0, "decode_steps": 0}

    def call(self, version: str, sha256: str | None, submit):
        """(version, result) of `submit(batch) -> DecodeHandle` decoded in the shared batch."""
        ticket = Ticket(version, sha256, submit)
        with self.cv:
            self.queue.append(ticket)
            if self.worker is None:
                self.worker = threading.Thread(target=self._work, name="shared-batch", daemon=True)
                self.worker.start()
            self.cv.notify()
        ticket.done.wait()
        if ticket.error is not None:
            raise ticket.error
        return ticket.version, ticket.result

    # ---- the worker --------------------------------------------------------------------------------
    def _take(self, version: str, first: bool) -> list[Ticket]:
        """The queued tickets of `version`; after the first admission, none while another version waits."""
        with self.cv:
            if not first and any(t.version != version for t in self.queue):
                return []
            mine = [t for t in self.queue if t.version == version]
            for t in mine:
                self.queue.remove(t)
            return mine

    def _work(self) -> None:
        while True:
            with self.cv:
                while not self.queue:
                    self.cv.wait()
                version = self.queue[0].version
            try:
                self._run_batch(version)
            except BaseException as exc:  # noqa: BLE001 - the tickets got the error; the worker must live on
                log.warning("shared batch under %s failed: %s: %s", version, type(exc).__name__, exc)

    def _run_batch(self, version: str) -> None:
        host = self.host
        live: dict[int, Ticket] = {}
        tickets = 0
        with host.model_lock:
            try:
                backend = host._require_ready()
                _, name = host._resolve(version, None)
                with host._device_guard(f"a model call under {version}"), backend.select(name, version) as engine:
                    batch = engine.continuous_batch()
                    first = True
                    while True:
                        for t in self._take(version, first):
                            tickets += 1
                            try:
                                host._resolve(version, t.sha256)  # the pin, now that the batch holds the version
                                handle = t.submit(batch)
                            except Exception as exc:  # noqa: BLE001 - this ticket's own error (bad request, pin)
                                t.fail(exc)
                                continue
                            if handle.done:
                                t.finish(handle.result)
                            else:
                                live[id(handle)] = t
                        first = False
                        if not live:
                            break
                        if not batch.busy:
                            raise RuntimeError(f"shared batch: {len(live)} calls open with nothing queued or decoding")
                        for handle in batch.step():
                            t = live.pop(id(handle), None)
                            if t is not None:
                                t.finish(handle.result)
                    self.stats["decode_steps"] += batch.stats["decode_steps"]
            except BaseException as exc:
                for t in live.values():
                    t.fail(exc)
                with self.cv:  # tickets of this version taken by no batch (the version is gone, the device failed)
                    stranded = [t for t in self.queue if t.version == version] if not tickets else []
                    for t in stranded:
                        self.queue.remove(t)
                for t in stranded:
                    t.fail(exc)
                raise
            finally:
                self.stats["batches"] += 1
                self.stats["tickets"] += tickets
                self.stats["most_tickets_in_a_batch"] = max(self.stats["most_tickets_in_a_batch"], tickets)

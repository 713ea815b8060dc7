"""Training leases: at most one writer per training id.

A training that writes checkpoints holds its training id's lease; a second writer is refused
with an error naming the holder (host, pid, start time, Metaflow run). The lease is built on the
store's own contract (immutable keys, atomic create-if-absent on both backends), so it needs no
lock service:

    runs/<training_id>/lease/<generation:08d>.json     one immutable record per generation

The current lease is the record with the highest generation. Acquiring, renewing and releasing
each *create* generation g+1 after reading g: two writers racing for g+1 both try to create the
same key, the store lets exactly one succeed (os.link / `If-None-Match: *`), and the loser reads
the winner and is refused. A record carries its holder (with a random token identifying it), an
expiry (renewed at every epoch step), and whether it releases the lease.

Taking over a lease another holder has not released is allowed only when that holder is dead:
it ran on this host and its process is gone (or its pid now belongs to a younger process), or its
lease expired (`$SRPO_LEASE_TTL_S` after its last renewal, default 6 h), or the user says so
with `$SRPO_LEASE_TAKEOVER=1` (a training on another host killed without a release). So a resume
after `kill -9` on the same host continues at once.

Fencing: a holder that was taken over finds out at its next `Lease.check` (a newer generation
belongs to someone else) and stops: `save_step` checks before discarding a step's uncommitted
keys and before writing the manifest, `set_latest_step` before moving `latest`.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

from srpo_core.store.base import _TRAINING_ID_RE, ImmutableKeyError, InvalidKeyError, Store, StoreError

LEASE_ENV = "SRPO_LEASE"  # the held lease (Lease.to_env), from the training to its phase steps
TAKEOVER_ENV = "SRPO_LEASE_TAKEOVER"  # "1": take over a lease whose holder looks alive (it must be dead)
TTL_ENV = "SRPO_LEASE_TTL_S"
DEFAULT_TTL_S = 6 * 3600.0  # longer than an epoch step: the training renews it at every step


class LeaseHeldError(StoreError):
    """Another live writer holds the training's lease."""


class LeaseLostError(StoreError):
    """This writer's lease was taken over (or released): it must stop writing the training."""


def _now_iso(ts: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if ts is None else ts, tz=timezone.utc).isoformat(timespec="seconds")


def _process_start(pid: int) -> str | None:
    """Start time of process `pid` in clock ticks since boot (/proc/<pid>/stat field 22), None
    where /proc is unavailable: tells a live holder from a younger process that reused its pid."""
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as fh:
            stat = fh.read().decode("ascii", "replace")
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]  # fields after "(comm)": state is field 3, starttime 22


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


@dataclass(frozen=True)
class LeaseHolder:
    """Who holds a lease: the process whose life is the training's (the Metaflow runtime of the
    training flow), when it started, and a random token that identifies it in records."""

    host: str
    pid: int
    pid_start: str | None
    started_at: str
    metaflow_run: str
    token: str

    @classmethod
    def current(cls, *, pid: int | None = None, metaflow_run: str = "") -> LeaseHolder:
        pid = os.getpid() if pid is None else int(pid)
        return cls(socket.gethostname(), pid, _process_start(pid), _now_iso(), metaflow_run, uuid.uuid4().hex)

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}, started {self.started_at}, Metaflow run {self.metaflow_run or '(none)'}"

    def is_dead(self) -> bool:
        """True only when this host can tell: the holder ran here and its process is gone."""
        if self.host != socket.gethostname():
            return False
        if not _pid_alive(self.pid):
            return True
        now_start = _process_start(self.pid)
        return self.pid_start is not None and now_start is not None and now_start != self.pid_start


@dataclass(frozen=True)
class LeaseRecord:
    """One generation of a training's lease (an immutable store key)."""

    training_id: str
    generation: int
    holder: LeaseHolder
    expires_at: float  # unix time; renewing writes a new generation with a later one
    released: bool
    written_at: str

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, where: str) -> LeaseRecord:
        try:
            raw = json.loads(text)
            return cls(
                training_id=str(raw["training_id"]), generation=int(raw["generation"]), holder=LeaseHolder(**raw["holder"]),
                expires_at=float(raw["expires_at"]), released=bool(raw["released"]), written_at=str(raw["written_at"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"lease record {where} is unreadable: {exc}") from exc

    def describe(self) -> str:
        state = "released" if self.released else f"expires {_now_iso(self.expires_at)}"
        return f"{self.holder.describe()} (lease generation {self.generation}, {state})"


def _check_tid(training_id: str) -> str:
    if not isinstance(training_id, str) or not _TRAINING_ID_RE.match(training_id):
        raise InvalidKeyError(f"training_id {training_id!r} must match {_TRAINING_ID_RE.pattern}")
    return training_id


def lease_prefix(training_id: str) -> str:
    return f"runs/{_check_tid(training_id)}/lease/"


def lease_key(training_id: str, generation: int) -> str:
    return f"{lease_prefix(training_id)}{int(generation):08d}.json"


def current_lease(store: Store, training_id: str) -> LeaseRecord | None:
    """The newest lease record of a training (None: never leased)."""
    prefix = lease_prefix(training_id)
    gens = sorted(int(k[len(prefix) : -len(".json")]) for k in store.list(prefix) if k.endswith(".json") and k[len(prefix) : -len(".json")].isdigit())
    if not gens:
        return None
    key = lease_key(training_id, gens[-1])
    return LeaseRecord.from_json(store.get_bytes(key), store.describe(key))


def _ttl(ttl_s: float | None) -> float:
    if ttl_s is not None:
        return float(ttl_s)
    raw = os.environ.get(TTL_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_TTL_S
    except ValueError:
        raise ValueError(f"${TTL_ENV}={raw!r} is not a number of seconds") from None
    if value <= 0:
        raise ValueError(f"${TTL_ENV}={raw!r} must be > 0")
    return value


def takeover_reason(record: LeaseRecord, *, takeover: bool | None = None, now: float | None = None) -> str | None:
    """Why `record`'s holder may be replaced (None: it may not)."""
    if record.released:
        return "released"
    if (time.time() if now is None else now) >= record.expires_at:
        return f"expired at {_now_iso(record.expires_at)}"
    if record.holder.is_dead():
        return f"holder process {record.holder.pid} on {record.holder.host} is gone"
    if takeover if takeover is not None else os.environ.get(TAKEOVER_ENV, "") == "1":
        return f"${TAKEOVER_ENV}=1"
    return None


@dataclass(frozen=True)
class Lease:
    """A lease this process's training holds (generation it last wrote)."""

    training_id: str
    holder: LeaseHolder
    generation: int

    def to_env(self) -> str:
        """A quote- and comma-free string (base64 of JSON), safe in an environment variable and in
        a Metaflow `--with environment:vars={...}` spec."""
        raw = json.dumps({"training_id": self.training_id, "generation": self.generation, "holder": dataclasses.asdict(self.holder)}, sort_keys=True)
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @classmethod
    def from_env(cls, value: str | None = None) -> Lease | None:
        """The lease handed down in `$SRPO_LEASE` (None when unset)."""
        value = os.environ.get(LEASE_ENV, "") if value is None else value
        if not value:
            return None
        try:
            raw = json.loads(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))
            return cls(str(raw["training_id"]), LeaseHolder(**raw["holder"]), int(raw["generation"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"${LEASE_ENV} is not a lease: {exc}") from None

    def check(self, store: Store) -> LeaseRecord:
        """Raise LeaseLostError unless this holder still holds the training's lease."""
        record = current_lease(store, self.training_id)
        if record is None or record.holder.token != self.holder.token or record.released:
            now = "no lease at all" if record is None else record.describe()
            raise LeaseLostError(
                f"training {self.training_id!r} in {store.describe()}: this writer ({self.holder.describe()}) no longer holds its lease; "
                f"now: {now}. Stopping before it writes anything more"
            )
        return record

    def _write_next(self, store: Store, record: LeaseRecord, *, released: bool, expires_at: float) -> Lease:
        nxt = LeaseRecord(self.training_id, record.generation + 1, self.holder, expires_at, released, _now_iso())
        try:
            store.put_bytes(lease_key(self.training_id, nxt.generation), nxt.to_json().encode())
        except ImmutableKeyError:  # someone else created that generation first
            self.check(store)
            raise
        return dataclasses.replace(self, generation=nxt.generation)

    def renew(self, store: Store, ttl_s: float | None = None) -> Lease:
        """Extend the expiry (a new generation); LeaseLostError if it was taken over."""
        return self._write_next(store, self.check(store), released=False, expires_at=time.time() + _ttl(ttl_s))

    def release(self, store: Store) -> None:
        """Give the lease up (a released generation); a lease already taken over is left alone."""
        try:
            record = self.check(store)
        except LeaseLostError:
            return
        self._write_next(store, record, released=True, expires_at=time.time())


def acquire_lease(store: Store, training_id: str, holder: LeaseHolder, *, ttl_s: float | None = None, takeover: bool | None = None) -> Lease:
    """Take the training's lease for `holder`, or raise LeaseHeldError naming the live holder.
    `takeover` (default: `$SRPO_LEASE_TAKEOVER=1`) replaces a holder this host cannot see dying."""
    for _ in range(5):  # each lost race means a newer record to judge
        record = current_lease(store, training_id)
        if record is not None and record.holder.token != holder.token:
            reason = takeover_reason(record, takeover=takeover)
            if reason is None:
                raise LeaseHeldError(
                    f"training {training_id!r} in {store.describe()} is being written by another process: {record.describe()}. "
                    f"Wait for it to end, or, if it is dead (e.g. killed on another host), set {TAKEOVER_ENV}=1 to take its lease over"
                )
            if reason != "released":
                print(f"training {training_id}: taking over the lease of {record.holder.describe()} ({reason})", file=sys.stderr)
        gen = 0 if record is None else record.generation + 1
        nxt = LeaseRecord(training_id, gen, holder, time.time() + _ttl(ttl_s), False, _now_iso())
        try:
            store.put_bytes(lease_key(training_id, gen), nxt.to_json().encode())
        except ImmutableKeyError:
            continue  # another writer created generation `gen` first: judge its record
        return Lease(training_id, holder, gen)
    raise LeaseHeldError(f"training {training_id!r} in {store.describe()}: lost the race for its lease 5 times; another writer is active")

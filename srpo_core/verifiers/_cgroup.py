"""One cgroup per sandboxed run: memory and process limits for the run as a whole.

Resource limits (rlimits) count per process (memory, CPU) or per file (output); a cgroup counts
the run: all its processes together may use at most ``memory_bytes`` of memory (anonymous
memory, page cache and the work directory's tmpfs pages alike, no swap) and hold at most
``max_pids`` tasks. When the run is over every task left in it is killed and the cgroup removed.

Where the run cgroups go:
  * cgroup v2 (the unified hierarchy; every current distribution and Kubernetes node): under
    ``$SRPO_SANDBOX_CGROUP`` if set (a delegated directory), else in ``srpo-sandbox/`` next to
    this process's own cgroup, with ``+memory +pids`` enabled in its ``cgroup.subtree_control``.
    A process that sits in the root cgroup of a container's cgroup namespace cannot do that (v2
    forbids controllers on a cgroup that holds processes): the error says how to move it.
  * cgroup v1 (hybrid hosts where the memory and pids controllers are bound to v1 hierarchies,
    as on the development VM): ``srpo-sandbox/run-*`` below this process's own memory and pids
    cgroups, with ``memory.limit_in_bytes`` (and ``memory.memsw.limit_in_bytes`` when swap is
    accounted) and ``pids.max``. The same guarantee through the older interface.
Neither writable (an unprivileged container: /sys/fs/cgroup read-only) -> :class:`CgroupUnavailable`
naming what was tried. There is deliberately no fallback to per-process limits only.
"""

from __future__ import annotations

import errno
import os
import secrets
import signal
import time
from dataclasses import dataclass
from pathlib import Path

CGROUP_PARENT_ENV = "SRPO_SANDBOX_CGROUP"
SANDBOX_DIR = "srpo-sandbox"
CONTROLLERS = ("memory", "pids")
_EMPTY_WAIT_S = 10.0  # bound on waiting for killed tasks to leave the cgroup (they exit at once)


class CgroupUnavailable(RuntimeError):
    """No cgroup with the memory and pids controllers can be created here (the message says why)."""


def _mounts() -> list[tuple[str, str, set[str]]]:
    """(mount point, filesystem type, super options) of each mount, from /proc/self/mountinfo."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        if len(fields) >= 5 and len(rest) >= 3:
            out.append((fields[4], rest[0], set(rest[2].split(","))))
    return out


def _own_cgroups() -> dict[str, str]:
    """This process's cgroup per hierarchy: "" for v2, else each v1 controller name."""
    own = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for name in controllers.split(",") if controllers else [""]:
            own[name] = path
    return own


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _v2_base(mount: Path, own: str) -> Path:
    """The directory run cgroups are created in, with memory and pids enabled for its children."""
    explicit = os.environ.get(CGROUP_PARENT_ENV)
    if explicit:
        base = Path(explicit)
    elif own == "/":
        base = mount / SANDBOX_DIR
    else:
        base = (mount / own.lstrip("/")).parent / SANDBOX_DIR
    try:
        base.mkdir(exist_ok=True)
        missing = [c for c in CONTROLLERS if c not in (base / "cgroup.controllers").read_text().split()]
        if missing:  # the parent must offer them to its children first
            _write(base.parent / "cgroup.subtree_control", " ".join(f"+{c}" for c in missing))
        enabled = (base / "cgroup.subtree_control").read_text().split()
        if any(c not in enabled for c in CONTROLLERS):
            _write(base / "cgroup.subtree_control", " ".join(f"+{c}" for c in CONTROLLERS))
    except OSError as exc:
        hint = (
            "this process is in the root cgroup of its namespace (a container): at container start "
            "move it to a leaf and enable the controllers, e.g. `mkdir /sys/fs/cgroup/main && "
            "echo $$ > /sys/fs/cgroup/main/cgroup.procs && echo '+memory +pids' > "
            "/sys/fs/cgroup/cgroup.subtree_control`, or "
            if own == "/" and not explicit else ""
        )
        raise CgroupUnavailable(
            f"cannot prepare the cgroup v2 directory {base} with +memory +pids: {exc}; {hint}"
            f"set {CGROUP_PARENT_ENV} to a delegated cgroup v2 directory"
        ) from None
    return base


@dataclass(frozen=True)
class RunCgroup:
    """The cgroup(s) of one run: one directory on v2, one per controller (memory, pids) on v1."""

    dirs: tuple[Path, ...]
    version: int

    @classmethod
    def create(cls, memory_bytes: int, max_pids: int) -> RunCgroup:
        mounts = _mounts()
        own = _own_cgroups()
        name = f"run-{secrets.token_hex(8)}"
        tried = []
        v2 = next((Path(m) for m, fstype, _ in mounts if fstype == "cgroup2"), None)
        if v2 is not None and "" in own:
            available = (v2 / "cgroup.controllers").read_text().split()
            if all(c in available for c in CONTROLLERS):
                run = _v2_base(v2, own[""]) / name
                return cls._make(2, [(run, {"memory.max": memory_bytes, "memory.swap.max": 0, "pids.max": max_pids})])
            tried.append(f"cgroup v2 at {v2} offers {available or 'no controllers'}")
        v1 = {c: Path(m) for m, fstype, opts in mounts if fstype == "cgroup" for c in CONTROLLERS if c in opts}
        if all(c in v1 and c in own for c in CONTROLLERS):
            memory = v1["memory"] / own["memory"].lstrip("/") / SANDBOX_DIR / name
            pids = v1["pids"] / own["pids"].lstrip("/") / SANDBOX_DIR / name
            return cls._make(1, [
                # memsw (memory + swap) must not be below the memory limit: written after it
                (memory, {"memory.limit_in_bytes": memory_bytes, "memory.memsw.limit_in_bytes": memory_bytes}),
                (pids, {"pids.max": max_pids}),
            ])
        tried.append(f"cgroup v1 memory/pids hierarchies: {sorted(v1) or 'none mounted'}")
        raise CgroupUnavailable(f"no cgroup with the memory and pids controllers ({'; '.join(tried)})")

    @classmethod
    def _make(cls, version: int, plan: list[tuple[Path, dict[str, int]]]) -> RunCgroup:
        made: list[Path] = []
        try:
            for directory, limits in plan:
                directory.mkdir(parents=True)
                made.append(directory)
                for key, value in limits.items():
                    if (directory / key).exists() or not key.startswith(("memory.swap", "memory.memsw")):
                        _write(directory / key, str(value))
        except OSError as exc:
            cls(tuple(made), version).remove()
            raise CgroupUnavailable(
                f"cannot create the run cgroup {directory} (v{version}): {exc} (an unprivileged container "
                "mounts /sys/fs/cgroup read-only: run the scorer as root in a privileged pod, or delegate a "
                f"cgroup and set {CGROUP_PARENT_ENV})"
            ) from None
        return cls(tuple(made), version)

    @property
    def procs_files(self) -> list[str]:
        """The files a process writes its pid to in order to join the run (all of them)."""
        return [str(d / "cgroup.procs") for d in self.dirs]

    def tasks(self) -> set[int]:
        found: set[int] = set()
        for d in self.dirs:
            try:
                found.update(int(pid) for pid in (d / "cgroup.procs").read_text().split())
            except FileNotFoundError:
                pass
        return found

    def kill_all(self) -> None:
        """SIGKILL every task of the run and wait (bounded) until none is left."""
        if self.version == 2 and self.dirs and (self.dirs[0] / "cgroup.kill").exists():
            _write(self.dirs[0] / "cgroup.kill", "1")
        deadline = time.monotonic() + _EMPTY_WAIT_S
        while (left := self.tasks()) and time.monotonic() < deadline:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.01)

    def remove(self) -> None:
        """Kill what is left and remove the directories (best effort: a busy one stays, logged by name)."""
        self.kill_all()
        for d in self.dirs:
            for _ in range(100):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY:
                        raise
                    time.sleep(0.01)

    def memory_events(self) -> dict[str, int]:
        """Counters of memory.events (v2) or memory.oom_control (v1): ``oom_kill`` and friends."""
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            text = (self.dirs[0] / name).read_text()
        except OSError:
            return {}
        return {key: int(value) for key, value in (line.split() for line in text.splitlines() if len(line.split()) == 2)}

"""Pytest plugin: a real single-node SLURM cluster on loopback, plus stand-ins for the SLURM tests.

Load it from ``tests/conftest.py`` with ``pytest_plugins = [..., "tests.slurm_cluster"]`` (or ad hoc:
``pytest -p tests.slurm_cluster ...``).

Fixture
    ``slurm_cluster`` (session): Debian's ``munged``, ``slurmctld`` and ``slurmd`` (slurm-wlm 22.05+)
    as a one-node cluster: NodeName=localhost, NodeAddr=127.0.0.1, SlurmctldHost=localhost(127.0.0.1),
    free ports, everything (config, munge key and socket, state, spool, logs, pid files) in a temp
    directory, so it never touches /etc/slurm or a system munged and several sessions can run side
    by side. ProctrackType=proctrack/linuxproc, TaskPlugin=task/none, no accounting database
    (``sacct`` does not work: jobs are checked with ``scontrol show job``). Two fake GPUs: a
    ``gres.conf`` with ``AutoDetect=off`` naming character devices made with ``mknod`` in the temp
    directory (``Gres=gpu:a100:2``), so ``--gres=gpu:a100:N`` and ``--gres=gpu:N`` jobs schedule and
    get ``SLURM_GPUS_ON_NODE`` / ``CUDA_VISIBLE_DEVICES``. The daemons run in the foreground as
    children of the test process and are stopped by PID at the end of the session (jobs still
    queued or running are cancelled first). Client commands need ``SLURM_CONF``: use
    ``cluster.env`` (``os.environ`` plus ``SLURM_CONF``) or the helpers ``sbatch``/``wait``.

    Needs root (slurmd starts jobs, mknod makes the devices) and the binaries (``.ci/install-slurm.sh``
    installs them). Without them the fixture skips with the reason, unless ``CI`` is set: then it fails.

Command line (stand-ins used by the SLURM tests, run inside jobs):
    ``python tests/slurm_cluster.py flow-shim run --training-id ID [flow args]``
        accepts exactly the parameters of ``python flows/srpo_flow.py run`` (the config from
        ``$SRPO_CONFIG``; one ``--set`` string) and runs the plain trainer (``srpo train``) with
        them, output in ``$SRPO_ARTIFACT_ROOT/<ID>``; writes
        ``invocation.json`` there first (its argv, the environment the wrapper set up, and, when
        ``SRPO_INFERENCE_URL`` is set, the status of ``GET /ready``). ``SRPO_SHIM_RECORD_ONLY=1``:
        write invocation.json and exit 0 without training.
    ``python tests/slurm_cluster.py fake-server --host H --port P [any args]``
        stands in for ``python -m srpo_core.server``: writes ``$SRPO_FAKE_SERVER_RECORD`` (argv, pid,
        process group), then answers ``GET /ready`` with 200 after ``$SRPO_FAKE_SERVER_DELAY`` seconds
        (503 before; ``never``: never ready). ``SRPO_FAKE_SERVER_FAIL=1``: exit 3 at once.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SLURM_BINARIES = ("munged", "munge", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "sinfo")
SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")  # daemons live here; a non-login PATH may lack them
READY_TIMEOUT_S = 60.0
TERMINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
    "DEADLINE", "PREEMPTED", "SPECIAL_EXIT",
}
FAKE_GPUS = 2
GPU_TYPE = "a100"


def find_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in SBIN_DIRS:
        candidate = Path(d) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def missing_prerequisites() -> list[str]:
    """What the fixture needs and this machine lacks (empty: the cluster can start)."""
    missing = [f"{name} (apt-get install slurm-wlm munge, or .ci/install-slurm.sh)" for name in SLURM_BINARIES if not find_binary(name)]
    if os.geteuid() != 0:
        missing.append("root (slurmd launches the jobs and mknod makes the fake GPU devices)")
    return missing


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_port_pair() -> tuple[int, int]:
    """Two free ports (slurmctld, slurmd), distinct."""
    a = free_port()
    while True:
        b = free_port()
        if b != a:
            return a, b


def pid_alive(pid: int) -> bool:
    """Whether a process runs (a zombie, exited but not yet reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"<no log: {exc}>"


def parse_scontrol_record(line: str) -> dict[str, str]:
    """``scontrol show job -o`` prints one job per line as Key=Value pairs separated by spaces;
    values may contain spaces (Command=..., Reason=...), so split on ' Key=' boundaries."""
    out: dict[str, str] = {}
    for match in re.finditer(r"(?:^|\s)([A-Za-z][A-Za-z0-9_:/]*)=(.*?)(?=\s[A-Za-z][A-Za-z0-9_:/]*=|$)", line.strip()):
        out[match.group(1)] = match.group(2)
    return out


@dataclass
class Daemon:
    name: str
    process: subprocess.Popen
    log_path: Path


@dataclass
class SlurmCluster:
    """A running test cluster. ``env``: os.environ + SLURM_CONF, for any client command."""

    root: Path
    conf: Path
    env: dict[str, str]
    daemons: list[Daemon] = field(default_factory=list)

    # --- clients ---------------------------------------------------------------------------------
    def run(self, cmd: Sequence[str], check: bool = True, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("env", self.env)
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, **kwargs)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}\n{self.diagnostics()}")
        return proc

    def sbatch(self, args: Sequence[str], env: dict[str, str] | None = None, cwd: Path | str | None = None) -> str:
        """Submit; returns the job id (the array job id for arrays)."""
        proc = self.run(["sbatch", "--parsable", *args], env={**self.env, **(env or {})}, cwd=cwd)
        return proc.stdout.strip().split(";")[0]

    def jobs(self, job_id: str) -> list[dict[str, str]]:
        """``scontrol show job`` records of a job (one per array task); [] once it aged out."""
        proc = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        if proc.returncode != 0:
            return []
        return [parse_scontrol_record(line) for line in proc.stdout.splitlines() if line.strip()]

    def wait(self, job_id: str, timeout: float = 900, expect_tasks: int = 1, poll: float = 2.0) -> list[dict[str, str]]:
        """Poll until every task of the job is in a terminal state; returns their records."""
        deadline = time.monotonic() + timeout
        records: list[dict[str, str]] = []
        while time.monotonic() < deadline:
            records = self.jobs(job_id)
            # a pending array shows as one record with ArrayTaskId=0-N until its tasks are split out
            if len(records) >= expect_tasks and all(r.get("JobState") in TERMINAL_STATES for r in records):
                return records
            time.sleep(poll)
        self.run(["scancel", str(job_id)], check=False)
        raise AssertionError(f"job {job_id} not finished after {timeout:.0f} s: {records}\n{self.diagnostics()}")

    def diagnostics(self) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log"):
            parts.append(f"--- {name} (tail) ---\n{log_tail(self.root / 'log' / name, 20)}")
        return "\n".join(parts)

    # --- lifecycle -------------------------------------------------------------------------------
    def stop(self) -> None:
        """Cancel what is left, then stop the daemons by PID (TERM, then KILL)."""
        if self.daemons and all(d.process.poll() is None for d in self.daemons):
            proc = self.run(["squeue", "-h", "-o", "%i"], check=False, timeout=20)
            ids = proc.stdout.split()
            if ids:
                self.run(["scancel", *ids], check=False, timeout=20)
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and self.run(["squeue", "-h", "-o", "%i"], check=False, timeout=20).stdout.strip():
                    time.sleep(0.5)
        for daemon in reversed(self.daemons):  # slurmd, slurmctld, munged
            stop_process(daemon.process)
        self.daemons.clear()


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


def write_config(root: Path, ctld_port: int, slurmd_port: int, user: str) -> Path:
    for sub in ("state", "spool", "log", "dev", "run"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    devices = []
    for i in range(FAKE_GPUS):  # dummy character devices standing in for /dev/nvidiaN (major 195)
        dev = root / "dev" / f"nvidia{i}"
        if not dev.exists():
            os.mknod(dev, 0o666 | 0o020000, os.makedev(195, i))
        devices.append(dev)
    conf = root / "slurm.conf"
    conf.write_text(
        f"""# single-node test cluster on loopback, written by tests/slurm_cluster.py
ClusterName=srpotest{ctld_port}
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root / 'munge' / 'munge.socket'}
StateSaveLocation={root / 'state'}
SlurmdSpoolDir={root / 'spool'}
SlurmctldPidFile={root / 'run' / 'slurmctld.pid'}
SlurmdPidFile={root / 'run' / 'slurmd.pid'}
SlurmctldLogFile={root / 'log' / 'slurmctld.log'}
SlurmdLogFile={root / 'log' / 'slurmd.log'}
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# the node claims more than the machine has, so the wrappers' real headers (--cpus-per-task=32,
# --mem=480G) schedule unchanged; config_overrides keeps slurmd from draining it for that
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=600
SchedulerParameters=sched_interval=1
GresTypes=gpu
NodeName=localhost NodeAddr=127.0.0.1 CPUs=64 RealMemory=1024000 Gres=gpu:{GPU_TYPE}:{FAKE_GPUS} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""
    )
    (root / "gres.conf").write_text(
        "AutoDetect=off\n" + "".join(f"NodeName=localhost Name=gpu Type={GPU_TYPE} File={dev}\n" for dev in devices)
    )
    # slurmd 22.05 loads a cgroup plugin even with proctrack/linuxproc ("disabled" is not accepted);
    # autodetect + IgnoreSystemd only loads it, nothing is constrained with task/none.
    (root / "cgroup.conf").write_text("CgroupPlugin=autodetect\nIgnoreSystemd=yes\n")
    return conf


def start_daemon(name: str, cmd: list[str], log_path: Path, env: dict[str, str]) -> Daemon:
    log = log_path.open("ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    log.close()
    return Daemon(name, proc, log_path)


def wait_until(predicate, timeout: float, what: str, daemons: list[Daemon], cluster_root: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        for d in daemons:
            if d.process.poll() is not None:
                raise RuntimeError(f"{d.name} exited with {d.process.returncode} while waiting for {what}:\n{log_tail(d.log_path)}\n{log_tail(cluster_root / 'log' / (d.name + '.log'))}")
        time.sleep(0.3)
    tails = "\n".join(f"--- {d.name} ---\n{log_tail(d.log_path)}" for d in daemons)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}\n{log_tail(cluster_root / 'log' / 'slurmctld.log')}\n{log_tail(cluster_root / 'log' / 'slurmd.log')}")


def start_cluster(root: Path) -> SlurmCluster:
    """Start munged, slurmctld and slurmd under ``root``; returns once the node is idle."""
    import pwd

    user = pwd.getpwuid(os.geteuid()).pw_name
    munge_dir, key_dir = root / "munge", root / "munge-key"
    for d, mode in ((munge_dir, 0o755), (key_dir, 0o700)):
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(mode)
    key = key_dir / "munge.key"
    if not key.exists():
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
    ctld_port, slurmd_port = free_port_pair()
    conf = write_config(root, ctld_port, slurmd_port, user)
    env = {**os.environ, "SLURM_CONF": str(conf)}
    for var in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_")) and k != "SLURM_CONF"]:
        env.pop(var)  # the test process may itself run inside an allocation
    path_dirs = env.get("PATH", "").split(os.pathsep)
    env["PATH"] = os.pathsep.join(path_dirs + [d for d in SBIN_DIRS if d not in path_dirs])
    cluster = SlurmCluster(root=root, conf=conf, env=env)
    socket_path = munge_dir / "munge.socket"
    try:
        cluster.daemons.append(start_daemon("munged", [
            find_binary("munged"), "--foreground", "--force", f"--key-file={key}", f"--socket={socket_path}",
            f"--pid-file={munge_dir / 'munged.pid'}", f"--log-file={root / 'log' / 'munged.log'}",
            f"--seed-file={key_dir / 'munged.seed'}",
        ], root / "log" / "munged.out", env))
        munge = find_binary("munge")
        wait_until(lambda: subprocess.run([munge, "-n", "-S", str(socket_path)], capture_output=True).returncode == 0,
                   READY_TIMEOUT_S, "munged", cluster.daemons, root)
        cluster.daemons.append(start_daemon("slurmctld", [find_binary("slurmctld"), "-D", "-f", str(conf)], root / "log" / "slurmctld.out", env))
        wait_until(lambda: subprocess.run(["scontrol", "ping"], capture_output=True, text=True, env=env).stdout.count("UP") > 0,
                   READY_TIMEOUT_S, "slurmctld", cluster.daemons, root)
        cluster.daemons.append(start_daemon("slurmd", [find_binary("slurmd"), "-D", "-f", str(conf), "-N", "localhost"], root / "log" / "slurmd.out", env))

        def node_idle() -> bool:
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, env=env).stdout.strip()
            return out.startswith("idle")

        wait_until(node_idle, READY_TIMEOUT_S, "the node to be idle", cluster.daemons, root)
    except BaseException:
        cluster.stop()
        raise
    return cluster


# --- pytest fixture ---------------------------------------------------------------------------------
try:
    import pytest
except ImportError:  # the command-line stand-ins below run inside jobs; pytest is not needed there
    pytest = None

if pytest is not None:

    @pytest.fixture(scope="session")
    def slurm_cluster(tmp_path_factory) -> Iterator[SlurmCluster]:
        missing = missing_prerequisites()
        if missing:
            reason = "no local SLURM cluster: missing " + "; ".join(missing)
            if os.environ.get("CI"):
                pytest.fail(reason + " (CI is set: run .ci/install-slurm.sh first)")
            pytest.skip(reason)
        root = tmp_path_factory.mktemp("slurm")
        try:
            cluster = start_cluster(root)
        except RuntimeError as exc:
            pytest.fail(f"the test SLURM cluster did not start: {exc}")
        try:
            yield cluster
        finally:
            cluster.stop()


# --- command-line stand-ins (run inside jobs) ---------------------------------------------------------
FLOW_ENV_KEYS = (
    "SRPO_ARTIFACT_ROOT", "SRPO_S3_ENDPOINT_URL", "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL",
    "METAFLOW_DEFAULT_DATASTORE", "METAFLOW_DATASTORE_SYSROOT_S3", "METAFLOW_S3_ENDPOINT_URL", "USERNAME",
    "OMP_NUM_THREADS", "PYTHONUNBUFFERED", "SRPO_CONFIG", "SRPO_INFERENCE_URL", "SRPO_TENSOR_PARALLEL_SIZE", "SRPO_NUM_GPUS",
    "CUDA_VISIBLE_DEVICES", "SLURM_GPUS_ON_NODE", "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID",
    "SLURM_ARRAY_TASK_ID", "SLURM_JOB_NAME", "VIRTUAL_ENV",
)


def flow_shim(argv: list[str]) -> int:
    """`python flows/srpo_flow.py run ...` -> `srpo train` (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="flow-shim", description="stands in for python flows/srpo_flow.py")
    parser.add_argument("command", choices=["run"])
    # the flow's parameters (flows/srpo_flow.py); the config comes from $SRPO_CONFIG, as there
    parser.add_argument("--method", choices=["grpo", "rrpo", "srpo"])
    parser.add_argument("--split", choices=["1x4", "2x4", "1x8"])
    parser.add_argument("--localizer")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--set", action="append", default=[], metavar="'KEY=VALUE ...'")
    parser.add_argument("--training-id", required=True)
    parser.add_argument("--quiet-steps", action="store_true")
    args = parser.parse_args(argv)
    if len(args.set) > 1:  # Metaflow would keep only the last one, silently
        parser.error(f"--set given {len(args.set)} times; the flow takes one space-separated string")
    root = os.environ.get("SRPO_ARTIFACT_ROOT")
    if not root or "://" in root:
        parser.error("SRPO_ARTIFACT_ROOT must be a local directory for the shim")
    out = Path(root) / args.training_id
    out.mkdir(parents=True, exist_ok=True)
    record = {"argv": argv, "cwd": os.getcwd(), "env": {k: os.environ[k] for k in FLOW_ENV_KEYS if k in os.environ}}
    if os.environ.get("SRPO_INFERENCE_URL"):
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(os.environ["SRPO_INFERENCE_URL"] + "/ready", timeout=10) as resp:
                record["inference_ready_status"] = resp.status
        except (urllib.error.URLError, OSError) as exc:
            record["inference_ready_status"] = repr(exc)
    (out / "invocation.json").write_text(json.dumps(record, indent=2))
    print(f"flow-shim: {' '.join(argv)} -> {out}", flush=True)
    if os.environ.get("SRPO_SHIM_RECORD_ONLY") == "1":
        return 0
    cmd = [sys.executable, "-m", "srpo_core.cli", "train", "--config", os.environ.get("SRPO_CONFIG", "tiny"), "--out", str(out)]
    for flag in ("method", "split", "localizer", "seed", "steps"):
        value = getattr(args, flag)
        if value is not None:
            cmd += [f"--{flag}", str(value)]
    for pair in shlex.split(args.set[0]) if args.set else []:
        if pair.startswith("rollout.server_url="):
            continue  # the plain trainer generates in-process
        cmd += ["--set", pair]
    sys.stdout.flush()
    os.execv(sys.executable, cmd)
    return 1  # not reached


def fake_server(argv: list[str]) -> int:
    """Stands in for `python -m srpo_core.server` (see the module docstring)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    parser = argparse.ArgumentParser(prog="fake-server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args, _ = parser.parse_known_args(argv)
    record_path = os.environ.get("SRPO_FAKE_SERVER_RECORD")
    if record_path:
        Path(record_path).write_text(json.dumps({"argv": argv, "pid": os.getpid(), "pgid": os.getpgid(0), "sid": os.getsid(0)}))
    if os.environ.get("SRPO_FAKE_SERVER_FAIL") == "1":
        print("fake-server: failing on purpose (SRPO_FAKE_SERVER_FAIL=1)", flush=True)
        return 3
    delay = os.environ.get("SRPO_FAKE_SERVER_DELAY", "0")
    ready_at = float("inf") if delay == "never" else time.monotonic() + float(delay)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            ok = self.path == "/ready" and time.monotonic() >= ready_at
            self.send_response(200 if ok else 503)
            self.end_headers()
            self.wfile.write(b"ready\n" if ok else b"loading\n")

        def log_message(self, fmt, *a):
            print("fake-server:", fmt % a, flush=True)

    server = ThreadingHTTPServer((args.host, args.port), Handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"fake-server: listening on {args.host}:{args.port}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"flow-shim": flow_shim, "fake-server": fake_server}
    if not argv or argv[0] not in commands:
        print(f"usage: {Path(__file__).name} {{{','.join(commands)}}} ...", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())

"""Launcher of one sandboxed run (see :mod:`srpo_core.verifiers.sandbox`). Runs as root, stdlib only.

Started as ``python -I -S _sandbox_launcher.py CONFIG_JSON`` with stdin/stdout/stderr already
redirected to files by the parent (a fresh interpreter: nothing runs between fork and exec in the
threaded parent). With ``isolate`` it
  1. joins the run's cgroup(s) (every process of the run inherits them: memory and pids limits
     for the run as a whole);
  2. sets the per-process resource limits (inherited likewise);
  3. execs bubblewrap, which builds the sandbox (own root, namespaces, /proc, tmpfs work directory)
     and runs :data:`INIT_SOURCE` in it as root with only CAP_SETUID/CAP_SETGID/CAP_CHOWN: that
     gives the work directory to the throwaway uid, drops to it and execs Python on the program.
Without ``isolate`` it sets the limits and execs Python in the host work directory.

Setup failures are written, with the SETUP_FAILED marker, to a status file descriptor that is
closed when the program is exec'd (so a program cannot fake one), and exit with code 121.
"""

import json
import os
import resource
import sys

SETUP_FAILED = "SRPO_SANDBOX_SETUP_FAILED"
SETUP_EXIT = 121
INIT_STARTED = "SRPO_SANDBOX_INIT_STARTED"  # written by the init: bubblewrap's setup is complete

# Runs inside the sandbox (python -I -S -c INIT_SOURCE CONFIG_JSON), as root with CAP_SETUID,
# CAP_SETGID and CAP_CHOWN only; bubblewrap has already set no_new_privs. Changing uid clears the
# permitted and effective capabilities, so the program starts with none.
INIT_SOURCE = """\
import json, os, sys
cfg = json.loads(sys.argv[1])
status = cfg["status_fd"]
os.set_inheritable(status, False)
os.write(status, (cfg["init_started"] + "\\n").encode())
step = "init"
try:
    step = "chown work directory"
    os.chown(cfg["workdir"], cfg["uid"], cfg["gid"])
    step = "drop privileges"
    os.setgroups([])
    os.setgid(cfg["gid"])
    os.setuid(cfg["uid"])
    if os.getuid() == 0 or os.geteuid() == 0:
        raise OSError("still root after setuid")
    step = "exec python"
    os.chdir(cfg["workdir"])
    os.execve(cfg["python"], [cfg["python"], "-I", *cfg["argv"]], cfg["env"])
except OSError as exc:
    os.write(status, (cfg["setup_failed"] + ": " + step + ": " + str(exc) + "\\n").encode())
    os._exit(cfg["setup_exit"])
"""

STATUS_FD = None  # a file of the parent's, closed on exec of the program (never seen by it)


def fail(step, detail):
    os.write(STATUS_FD if STATUS_FD is not None else 2, f"{SETUP_FAILED}: {step}: {detail}\n".encode())
    os._exit(SETUP_EXIT)


def set_limits(cfg):
    lim = cfg["limits"]
    cpu = int(lim["cpu_s"] + 0.999)
    pairs = [
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),
        (resource.RLIMIT_AS, (lim["memory_bytes"],) * 2),
        (resource.RLIMIT_FSIZE, (lim["fsize_bytes"],) * 2),
        (resource.RLIMIT_NOFILE, (lim["nofile"],) * 2),
        (resource.RLIMIT_CORE, (0, 0)),
    ]
    if cfg["isolate"]:  # RLIMIT_NPROC counts per uid: only meaningful with a throwaway uid
        pairs.append((resource.RLIMIT_NPROC, (lim["nproc"],) * 2))
    for which, value in pairs:
        try:
            resource.setrlimit(which, value)
        except (ValueError, OSError) as exc:
            fail("setrlimit", f"{which}: {exc}")


def join_cgroups(procs_files):
    for path in procs_files:
        try:
            with open(path, "w") as f:
                f.write(str(os.getpid()))
        except OSError as exc:
            fail("join cgroup", f"{path}: {exc}")


def main():
    global STATUS_FD
    cfg = json.loads(sys.argv[1])
    STATUS_FD = cfg["status_fd"]
    if not cfg["isolate"]:
        os.set_inheritable(STATUS_FD, False)  # close-on-exec: the program cannot write to it
        set_limits(cfg)
        os.chdir(cfg["workdir"])
        python = cfg["python_executable"]
        try:
            os.execve(python, [python, "-I", *cfg["argv"]], cfg["env"])
        except OSError as exc:
            fail("exec python", f"{python}: {exc}")
    join_cgroups(cfg["cgroup_procs"])
    set_limits(cfg)
    bwrap = cfg["bwrap_argv"]
    try:
        os.execve(bwrap[0], bwrap, {})
    except OSError as exc:
        fail("exec bubblewrap", f"{bwrap[0]}: {exc}")


if __name__ == "__main__":
    try:
        main()
    except Exception as exc:  # noqa: BLE001 - any setup problem is a setup failure, not a result
        fail("setup", f"{type(exc).__name__}: {exc}")

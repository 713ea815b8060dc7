"""Launcher of one sandboxed run (see :mod:`srpo_core.verifiers.sandbox`). Runs as root, stdlib only.

Started as ``python -I -S _sandbox_launcher.py CONFIG_JSON`` with stdin/stdout/stderr already
redirected to files by the parent. With ``isolate`` it:
  1. unshares the mount, network and PID namespaces (the new network namespace has only a
     loopback device that is down: no connection can be made, not even to 127.0.0.1);
  2. makes mounts private, covers /tmp, /var/tmp, /dev/shm, /run/lock with read-only tmpfs
     mounts, bind-mounts the working directory (writable) at /tmp/work and the Python
     installation read-only at /tmp/.srpo-python (so an unprivileged uid can run it even when it
     lives under /root), and enters /tmp/work;
  3. forks the namespace's init (PID 1), which forks the program: resource limits, all groups
     dropped, a throwaway uid/gid, no_new_privs, then exec of Python on the program.
When init exits, the kernel kills every process left in the namespace (fork bombs, daemons).
Setup failures are written, with the SETUP_FAILED marker, to a status file descriptor that is
closed when the program is exec'd (so a program cannot fake one), and exit with code 121.
"""

import ctypes
import json
import os
import resource
import sys

SETUP_FAILED = "SRPO_SANDBOX_SETUP_FAILED"
SETUP_EXIT = 121

CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
PR_SET_NO_NEW_PRIVS = 38
PR_SET_PDEATHSIG = 1
PYTHON_MOUNT = "/tmp/.srpo-python"
WORK_MOUNT = "/tmp/work"
COVERED_DIRS = ("/var/tmp", "/dev/shm", "/run/lock", "/var/lock", "/dev/mqueue")

_libc = ctypes.CDLL(None, use_errno=True)


STATUS_FD = None  # a file of the parent's, closed on exec of the program (never seen by it)


def fail(step, detail):
    os.write(STATUS_FD if STATUS_FD is not None else 2, f"{SETUP_FAILED}: {step}: {detail}\n".encode())
    os._exit(SETUP_EXIT)


def libc_call(step, name, *args):
    if getattr(_libc, name)(*args) != 0:
        fail(step, os.strerror(ctypes.get_errno()))


def mount(step, source, target, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    libc_call(step, "mount", enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data))


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


def prepare_namespace(cfg):
    libc_call("unshare(mount, network, pid namespaces)", "unshare", CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID)
    mount("make mounts private", None, "/", None, MS_REC | MS_PRIVATE)
    # Both may live under /tmp, which is covered next: hold them by descriptor.
    prefix_fd = os.open(cfg["python_prefix"], os.O_PATH | os.O_DIRECTORY)
    work_fd = os.open(cfg["workdir"], os.O_PATH | os.O_DIRECTORY)
    safe = MS_NOSUID | MS_NODEV
    mount("tmpfs over /tmp", "tmpfs", "/tmp", "tmpfs", safe, "size=64k,mode=0755")
    os.mkdir(PYTHON_MOUNT, 0o755)
    mount("bind python", f"/proc/self/fd/{prefix_fd}", PYTHON_MOUNT, None, MS_BIND | MS_REC)
    mount("python read-only", None, PYTHON_MOUNT, None, MS_REMOUNT | MS_BIND | MS_RDONLY | safe)
    os.mkdir(WORK_MOUNT, 0o755)
    mount("bind workdir", f"/proc/self/fd/{work_fd}", WORK_MOUNT, None, MS_BIND)
    mount("workdir nosuid", None, WORK_MOUNT, None, MS_REMOUNT | MS_BIND | safe)
    mount("/tmp read-only", None, "/tmp", None, MS_REMOUNT | MS_RDONLY | safe)
    os.close(prefix_fd)
    os.close(work_fd)
    os.chdir(WORK_MOUNT)
    for path in COVERED_DIRS:
        if os.path.isdir(path) and not os.path.islink(path) and os.stat(path).st_mode & 0o002:
            mount(f"cover {path}", "tmpfs", path, "tmpfs", MS_RDONLY | safe | MS_NOEXEC, "size=4k")


def exec_program(cfg):
    set_limits(cfg)
    env = dict(cfg["env"])
    if cfg["isolate"]:
        python = os.path.join(PYTHON_MOUNT, cfg["python_rel"])
        env["LD_LIBRARY_PATH"] = os.path.join(PYTHON_MOUNT, "lib")
        env["HOME"] = WORK_MOUNT
        try:
            os.setgroups([])
            os.setgid(cfg["gid"])
            os.setuid(cfg["uid"])
        except OSError as exc:
            fail("drop privileges", str(exc))
        libc_call("no_new_privs", "prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        libc_call("parent death signal", "prctl", PR_SET_PDEATHSIG, 9, 0, 0, 0)
    else:
        python = cfg["python_executable"]
        os.chdir(cfg["workdir"])
    try:
        os.execve(python, [python, "-I", *cfg["argv"]], env)
    except OSError as exc:
        fail("exec python", f"{python}: {exc}")


def wait_exit_code(pid):
    """Exit code of child ``pid``, reaping any orphans (we may be a namespace's init)."""
    while True:
        try:
            got, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return 1
        if got == pid:
            if os.WIFSIGNALED(status):
                return 128 + os.WTERMSIG(status)
            return os.WEXITSTATUS(status)


def main():
    global STATUS_FD
    cfg = json.loads(sys.argv[1])
    STATUS_FD = cfg["status_fd"]
    os.set_inheritable(STATUS_FD, False)  # close-on-exec: the program cannot write to it
    if not cfg["isolate"]:
        exec_program(cfg)
    prepare_namespace(cfg)
    init = os.fork()
    if init:
        os._exit(wait_exit_code(init))
    # PID 1 of the new namespace
    libc_call("parent death signal", "prctl", PR_SET_PDEATHSIG, 9, 0, 0, 0)
    program = os.fork()
    if program == 0:
        exec_program(cfg)
    os._exit(wait_exit_code(program))


if __name__ == "__main__":
    try:
        main()
    except Exception as exc:  # noqa: BLE001 - any setup problem is a setup failure, not a result
        fail("setup", f"{type(exc).__name__}: {exc}")

#!/usr/bin/env bash
# Install what tests/slurm_cluster.py needs for its one-node SLURM cluster: Debian/Ubuntu's
# slurm-wlm (slurmctld, slurmd, sbatch, ...) and munge, plus curl (train_multigpu.sbatch waits on
# the inference server with it). Idempotent and non-interactive; returns at once when all is there.
# Installs nothing system-wide beyond the packages: the test fixture writes its own slurm.conf,
# munge key and socket in a temp directory and starts/stops the daemons itself.
set -euo pipefail

needed=(munged munge slurmctld slurmd sbatch scontrol squeue scancel sinfo curl)
have_all() {
    local bin
    for bin in "${needed[@]}"; do
        command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || [ -x "/sbin/$bin" ] || return 1
    done
}

if have_all; then
    echo "install-slurm: slurm-wlm, munge and curl already installed"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-slurm: no apt-get here; install slurm-wlm (slurmctld, slurmd, client tools), munge and curl yourself" >&2
    exit 1
fi
sudo=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "install-slurm: needs root or sudo to install packages" >&2; exit 1; }
    sudo=(sudo -n)
fi
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
# --no-install-recommends keeps it small; the daemons are not started here (the fixture does it,
# and policy-rc.d-less containers would otherwise try and fail)
"${sudo[@]}" apt-get install -y -qq --no-install-recommends slurm-wlm munge curl >/dev/null
have_all || { echo "install-slurm: packages installed but binaries missing: ${needed[*]}" >&2; exit 1; }
echo "install-slurm: installed $(slurmctld -V 2>/dev/null || /usr/sbin/slurmctld -V), $(munged -V 2>/dev/null | head -n1 || true)"

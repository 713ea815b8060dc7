#!/usr/bin/env bash
# Install what the code sandbox (srpo_core/verifiers/sandbox.py) needs: bubblewrap (bwrap), which
# builds each run's own root, namespaces, /proc and tmpfs work directory. Debian/Ubuntu package
# `bubblewrap` (0.8 or later: --size for tmpfs). Idempotent and non-interactive; returns at once
# when bwrap is there. The sandbox also needs root and a writable cgroup hierarchy with the memory
# and pids controllers; those come from how the machine runs, not from a package.
set -euo pipefail

if command -v bwrap >/dev/null 2>&1; then
    echo "install-sandbox: $(bwrap --version) already installed"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-sandbox: no apt-get here; install bubblewrap (bwrap >= 0.8) yourself" >&2
    exit 1
fi
sudo=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "install-sandbox: needs root or sudo to install packages" >&2; exit 1; }
    sudo=(sudo -n)
fi
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends bubblewrap >/dev/null
command -v bwrap >/dev/null 2>&1 || { echo "install-sandbox: bubblewrap installed but bwrap missing" >&2; exit 1; }
echo "install-sandbox: installed $(bwrap --version)"

#!/usr/bin/env bash
# Install headless Chromium (Debian package `chromium`) for tests/test_mlflow_ui.py.
# Idempotent and non-interactive: does nothing when a chromium binary is already on PATH.
# Needs root or passwordless sudo (apt-get). Fonts are included so screenshots show text.
set -euo pipefail

find_chromium() {
  command -v chromium || command -v chromium-browser || command -v google-chrome || true
}

if [ -n "$(find_chromium)" ]; then
  echo "chromium already installed: $(find_chromium)"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    echo "install-chromium: need root or passwordless sudo to apt-get install chromium" >&2
    exit 1
  fi
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core fonts-liberation >/dev/null
echo "installed: $(find_chromium) ($("$(find_chromium)" --version 2>/dev/null || echo 'version unknown'))"

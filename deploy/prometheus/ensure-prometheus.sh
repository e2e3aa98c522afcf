#!/usr/bin/env bash
# Makes sure a `prometheus` server binary is on PATH for tests/integration/test_prometheus.py:
# Debian's package if it is missing. Called by `make test`; a no-op when already installed.
set -euo pipefail

if command -v prometheus >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-prometheus: prometheus is missing and apt-get is not available;" \
         "install Prometheus 2.x or later and put it on PATH" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    SUDO="sudo"
fi
echo "ensure-prometheus: installing Debian's prometheus package..."
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# --no-install-recommends: the server binary only, no node exporter and friends.
$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
# The package's service is not wanted here: the tests start their own server.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
    $SUDO systemctl stop prometheus || true
fi
command -v prometheus >/dev/null
prometheus --version 2>&1 | head -1

#!/usr/bin/env bash
# Make `prometheus` and `promtool` available (part of `make lint`; tests/test_monitoring.py uses both).
# Already on PATH or in /usr/bin: prints where, installs nothing. Else installs Debian's
# `prometheus` package, which ships both (apt-get update first; needs root, as in CI), and stops
# the service the package may start: the tests run their own server on a free loopback port.
# Exit status: 0 when both are there, 1 when they are missing and cannot be installed.
set -euo pipefail

find_tool() {  # find_tool NAME: its path, or nothing
    command -v "$1" 2>/dev/null || { [ -x "/usr/bin/$1" ] && echo "/usr/bin/$1"; } || true
}

if [ -n "$(find_tool prometheus)" ] && [ -n "$(find_tool promtool)" ]; then
    echo "prometheus: $(find_tool prometheus); promtool: $(find_tool promtool)"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-prometheus: prometheus/promtool not found and no apt-get here; install Prometheus" \
         "(both binaries) and put them on PATH" >&2
    exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install-prometheus: prometheus/promtool not found; run as root, or: sudo apt-get update &&" \
         "sudo apt-get install -y prometheus" >&2
    exit 1
fi

echo "install-prometheus: apt-get install prometheus"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq prometheus >/dev/null
# The package enables a service on port 9090; where it got started (not in most containers,
# whose policy-rc.d refuses), stop it: nothing here needs it.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
    systemctl stop prometheus || true
elif command -v service >/dev/null 2>&1 && service prometheus status >/dev/null 2>&1; then
    service prometheus stop || true
fi

if [ -z "$(find_tool prometheus)" ] || [ -z "$(find_tool promtool)" ]; then
    echo "install-prometheus: the prometheus package installed but prometheus/promtool are not on PATH" >&2
    exit 1
fi
echo "prometheus: $(find_tool prometheus); promtool: $(find_tool promtool)"

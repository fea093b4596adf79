#!/usr/bin/env bash
# The tool `make bench` counts the PDP's fsyncs with: perf (linux-perf), from Debian's
# packages. Installs it when missing (as root or with password-less sudo). Where that cannot
# be done it says so and exits 0: the benchmark then prints n/a for the fsync count.
set -euo pipefail

command -v perf >/dev/null && exit 0
. "${BASH_SOURCE[0]%/*}/apt.sh"
apt_install bench-tools lenient linux-perf

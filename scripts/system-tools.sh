#!/usr/bin/env bash
# The system tools the tests start for real, from Debian's packages: redis-server (the shared
# run store), prometheus and promtool (alert rules, alerting end to end), node and npm (the
# Node example client), curl (the README's curl call). `make test` and `.ci/run` both run
# this first. Installs what is missing as root (or with password-less sudo); otherwise says
# exactly what to run and fails, so no test fails later for a missing tool.
set -euo pipefail

packages=()
command -v redis-server >/dev/null || packages+=(redis-server)
{ command -v promtool >/dev/null && command -v prometheus >/dev/null; } || packages+=(prometheus)
{ command -v node >/dev/null && command -v npm >/dev/null; } || packages+=(nodejs npm)
command -v curl >/dev/null || packages+=(curl)
[ ${#packages[@]} -eq 0 ] && exit 0

. "${BASH_SOURCE[0]%/*}/apt.sh"
apt_install system-tools strict "${packages[@]}"

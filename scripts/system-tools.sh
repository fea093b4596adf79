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

if [ "$(id -u)" = 0 ]; then
  sudo=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  sudo=(sudo)
else
  echo "system-tools: missing ${packages[*]}; install them first:" >&2
  echo "  sudo apt-get update && sudo apt-get install -y --no-install-recommends ${packages[*]}" >&2
  exit 1
fi
echo "system-tools: installing ${packages[*]} from Debian's packages" >&2
"${sudo[@]}" apt-get update -q
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
  apt-get install -y -q --no-install-recommends "${packages[@]}"

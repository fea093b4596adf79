#!/usr/bin/env bash
# The tools `make image-test` builds and runs the image with, from Debian's packages: podman
# (its build is buildah's code built in, run with --isolation=chroot: no container runtime, no
# registry), mmdebstrap (the stand-in base image), util-linux (unshare, mount) and coreutils'
# chroot (run the image's filesystem). Installs what is missing as root (or with password-less
# sudo). Where that cannot be done it says so loudly and exits 0: the image test then skips,
# naming the missing tool.
set -euo pipefail

packages=()
command -v podman >/dev/null || packages+=(podman)
command -v mmdebstrap >/dev/null || packages+=(mmdebstrap)
[ ${#packages[@]} -eq 0 ] && exit 0

. "${BASH_SOURCE[0]%/*}/apt.sh"
apt_install image-tools lenient "${packages[@]}"

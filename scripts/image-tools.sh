#!/usr/bin/env bash
# The tools `make image-test` builds and runs the image with, from Debian's packages: podman
# and buildah (build with --isolation=chroot: no container runtime, no registry), mmdebstrap
# (the stand-in base image), util-linux (unshare, mount) and coreutils' chroot (run the image's
# filesystem). Installs what is missing as root (or with password-less sudo). Where that cannot
# be done it says so loudly and exits 0: the image test then skips, naming the missing tool.
set -euo pipefail

packages=()
command -v podman >/dev/null || packages+=(podman)
command -v buildah >/dev/null || packages+=(buildah)
command -v mmdebstrap >/dev/null || packages+=(mmdebstrap)
[ ${#packages[@]} -eq 0 ] && exit 0

if [ "$(id -u)" = 0 ]; then
  sudo=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  sudo=(sudo)
else
  sudo=(false)
fi
if ! command -v apt-get >/dev/null || [ "${sudo[*]}" = false ]; then
  echo "image-tools: WARNING: cannot install ${packages[*]} (needs apt-get and root);" \
    "the image test will SKIP. Install them first:" >&2
  echo "  sudo apt-get update && sudo apt-get install -y --no-install-recommends ${packages[*]}" >&2
  exit 0
fi
echo "image-tools: installing ${packages[*]} from Debian's packages" >&2
"${sudo[@]}" apt-get update -q
if ! "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
  apt-get install -y -q --no-install-recommends "${packages[@]}"; then
  echo "image-tools: WARNING: apt-get could not install ${packages[*]}; the image test will SKIP" >&2
fi

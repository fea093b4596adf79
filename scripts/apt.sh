# Sourced by system-tools.sh and image-tools.sh: install Debian packages as root, or with
# password-less sudo. `apt_install TAG STRICT PACKAGE...` returns 0 when they are installed.
# Where they cannot be, it prints the exact apt-get line to run and returns 1 when STRICT is
# "strict" (the caller fails), 0 otherwise (the caller's test skips, loudly).
apt_install() {
  local tag=$1 strict=$2
  shift 2
  local sudo=()
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
      sudo=(sudo)
    else
      sudo=(false)
    fi
  fi
  if ! command -v apt-get >/dev/null || [ "${sudo[*]}" = false ]; then
    echo "$tag: cannot install $* (needs apt-get and root); install them first:" >&2
    echo "  sudo apt-get update && sudo apt-get install -y --no-install-recommends $*" >&2
    _apt_give_up "$tag" "$strict"
    return
  fi
  echo "$tag: installing $* from Debian's packages" >&2
  if "${sudo[@]}" apt-get update -q &&
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -q --no-install-recommends "$@"; then
    return 0
  fi
  echo "$tag: apt-get could not install $*" >&2
  _apt_give_up "$tag" "$strict"
}

_apt_give_up() {
  [ "$2" = strict ] && return 1
  echo "$1: WARNING: going on without them; the tests that need them SKIP, naming the tool" >&2
}

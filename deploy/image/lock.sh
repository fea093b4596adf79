#!/usr/bin/env bash
# Regenerate the image's locks after requirements.lock changes: the same versions and hashes
# (requirements.lock is the constraint), limited to what each image stage installs, and
# wheels only for Linux x86-64 with glibc 2.36 (Debian bookworm, the image's base).
# Needs uv, which .venv has (requirements.lock).
# opa-golib-python-bindings asks for Python 3.14 in its metadata (its wheel runs on 3.11), so
# uv cannot resolve it for 3.11: its entry in runtime.lock and demo.lock is the one from
# requirements.lock, copied by hand (tests/deploy/test_docker.py checks they agree).
set -euo pipefail
cd "$(dirname "$0")/../.."
compile() {
    local out=$1
    shift
    .venv/bin/uv pip compile "$@" -c requirements.lock --generate-hashes --python-version 3.11 \
        --python-platform x86_64-manylinux_2_36 --only-binary :all: --no-header \
        -o "deploy/image/$out"
}
compile build.lock deploy/image/build.in
compile runtime.lock pyproject.toml
compile demo.lock pyproject.toml deploy/image/demo.in

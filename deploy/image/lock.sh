#!/usr/bin/env bash
# Regenerate the image's locks after requirements.lock changes: the same versions and hashes
# (requirements.lock is the constraint), limited to what each image stage installs, and
# wheels only for Linux x86-64 with glibc 2.36 (Debian bookworm, the image's base).
# Needs uv in the venv: .venv/bin/pip install uv
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

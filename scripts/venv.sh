#!/usr/bin/env bash
# Build or refresh a virtual environment from a hash-pinned lock: `scripts/venv.sh VENV LOCK`.
# uv installs the lock: it downloads in parallel, seconds where pip takes a minute or more
# on a fresh machine. uv itself comes first, into .venv, from its own pin in
# requirements.lock, installed by pip. Every file is hash-checked and every dependency is
# in the lock (--no-deps), so taking a version from whichever configured index has it is
# safe: the hashes decide.
set -euo pipefail
venv=$1
lock=$2
root=${BASH_SOURCE[0]%/*}/..
python=${PYTHON:-python3}
uv=$root/.venv/bin/uv

# pick PACKAGE LOCK: that package's pin and hashes; drop PACKAGE LOCK: the lock without them.
pick() { awk -v pin="$1==" 'index($0, pin) == 1 { on = 1; print; next }
  on && /^ / { print; next } { on = 0 }' "$2"; }
drop() { awk -v pin="$1==" 'index($0, pin) == 1 { on = 1; next }
  on && /^ / { next } { on = 0; print }' "$2"; }
pip() { "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
  --require-hashes --no-deps "$@"; }

test -x "$venv/bin/python" || "$python" -m venv "$venv"
if [ ! -x "$uv" ]; then
  "$root/.venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    --require-hashes --no-deps -r <(pick uv "$root/requirements.lock")
fi
# opa-golib-python-bindings declares Requires-Python >=3.14 yet works on 3.11 (see
# requirements.lock); pip can be told to ignore that for it alone, uv cannot.
if grep -q '^opa-golib-python-bindings==' "$lock"; then
  pip --ignore-requires-python -r <(pick opa-golib-python-bindings "$lock")
fi
"$uv" pip install --quiet --python "$venv/bin/python" --require-hashes --no-deps \
  --index-strategy unsafe-best-match -r <(drop opa-golib-python-bindings "$lock")

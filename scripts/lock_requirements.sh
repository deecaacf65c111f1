#!/usr/bin/env bash
# Refresh requirements.lock, the exact versions scripts/setup_env.sh installs, from requirements.txt.
#
#   ./scripts/lock_requirements.sh              # add what requirements.txt gained; keep every other pin
#   ./scripts/lock_requirements.sh --upgrade    # the newest versions requirements.txt allows, for everything
#   ./scripts/lock_requirements.sh --upgrade-package transformers   # move one package
#
# The lock is resolved by uv (`uv pip compile --universal`, uv pinned below and installed into
# .cache/lock-tools on first use) for every platform and Python >= 3.10, with environment markers
# where a version differs (Linux x86_64 with Python 3.11 is what CI tests). torch is excluded from
# the resolution on purpose: setup_env.sh keeps the torch a machine has (a CUDA build on a GPU
# node) or installs the right build for it, so the lock must not drag CUDA wheels onto a CPU box.
# After a refresh, run ./scripts/check_latest.sh or ./run_tests.sh and commit requirements.lock.
# Extra arguments go to `uv pip compile`.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
UV_VERSION="0.13.9"
TOOLS="${TRAINKIT_LOCK_TOOLS:-$REPO/.cache/lock-tools}"
BASE_PYTHON="${PYTHON:-python3}"

die() { echo "lock: error: $*" >&2; exit 1; }

case "${1:-}" in -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;; esac

if [[ ! -x "$TOOLS/bin/uv" ]] || [[ "$("$TOOLS/bin/uv" --version 2>/dev/null)" != "uv $UV_VERSION"* ]]; then
    echo "lock: installing uv $UV_VERSION into $TOOLS" >&2
    "$BASE_PYTHON" -m venv "$TOOLS" || die "$BASE_PYTHON -m venv $TOOLS failed"
    "$TOOLS/bin/python" -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION" \
        || die "pip install uv==$UV_VERSION failed (see above)"
fi

excludes="$(mktemp)"
trap 'rm -f "$excludes"' EXIT
echo "torch" >"$excludes"
cd "$REPO"
"$TOOLS/bin/uv" pip compile requirements.txt --output-file requirements.lock \
    --universal --python-version 3.10 --excludes "$excludes" \
    --custom-compile-command "./scripts/lock_requirements.sh" "$@" \
    || die "uv pip compile failed (see above)"
echo "lock: wrote requirements.lock ($(grep -c '^[A-Za-z0-9]' requirements.lock) pins); test it with ./run_tests.sh" >&2

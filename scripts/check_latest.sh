#!/usr/bin/env bash
# Run the CPU test suite against the newest versions requirements.txt allows, in a throwaway venv,
# to learn before users do what the next releases of our dependencies break.
#
#   ./scripts/check_latest.sh                    # the whole suite
#   ./scripts/check_latest.sh tests/test_gla.py  # any pytest arguments
#
# It builds a fresh venv with TRAINKIT_UNLOCKED=1 (scripts/setup_env.sh: newest allowed versions,
# torch kept as setup_env.sh chooses it), prints which versions differ from requirements.lock,
# runs ./run_tests.sh in it, prints one result line and removes the venv (TRAINKIT_KEEP_VENV=1
# keeps it and prints where). Exit code: the test run's.
# What it finds is fixed, or bounded in requirements.txt with a comment naming the upstream issue;
# then ./scripts/lock_requirements.sh --upgrade moves the lock.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
case "${1:-}" in -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;; esac

WORK="$(mktemp -d -t trainkit-latest-XXXXXX)"
VENV="$WORK/venv"
cleanup() {
    if [[ "${TRAINKIT_KEEP_VENV:-0}" == 1 ]]; then echo "check_latest: kept $VENV" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

export TRAINKIT_VENV="$VENV" TRAINKIT_UNLOCKED=1
cd "$REPO"
PY="$(./scripts/setup_env.sh --print-python)" || { echo "check_latest: error: environment setup failed (see above)" >&2; exit 1; }
echo "check_latest: newest allowed versions in $VENV" >&2
"$PY" scripts/lock_plan.py requirements.lock --report-only 2>&1 | sed 's/^setup: note: /check_latest: /' >&2 || true
set +e
./run_tests.sh "$@"
rc=$?
set -e
versions="$("$PY" -c 'import importlib.metadata as m
names = ["torch", "transformers", "accelerate", "peft", "bitsandbytes", "datasets", "flash-linear-attention", "triton"]
print(", ".join(f"{n} {m.version(n)}" for n in names))')"
if [[ $rc == 0 ]]; then
    echo "check_latest: PASSED with the newest allowed versions ($versions)" >&2
else
    echo "check_latest: FAILED (pytest exit $rc) with the newest allowed versions ($versions)" >&2
fi
exit $rc

#!/usr/bin/env bash
# The one test command (README, CI): set up the environment, then run pytest.
#   ./run_tests.sh                 # all CPU tests (GPU tests skip without CUDA)
#   ./run_tests.sh -m gpu          # the GPU tests, on a GPU machine
#   ./run_tests.sh tests/test_launcher.py -k dry_run    # any pytest arguments
# Uses .venv (scripts/setup_env.sh creates it on first use); TRAINKIT_VENV and
# TRAINKIT_NO_VENV=1 work as for launch_training.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
PY="$(./scripts/setup_env.sh --print-python)" || { echo "run_tests.sh: error: environment setup failed (see above)" >&2; exit 1; }
exec "$PY" -m pytest -q --durations=25 "$@"

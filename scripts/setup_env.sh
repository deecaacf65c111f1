#!/usr/bin/env bash
# Set up the Python environment trainkit runs in. Idempotent: a no-op (well under a
# second) when requirements.lock, requirements.txt, the install mode and the Python
# version have not changed since the last successful run.
#
#   ./scripts/setup_env.sh                  # create/refresh .venv from requirements.lock
#   ./scripts/setup_env.sh --print-python   # the same, then print the interpreter to use
#   TRAINKIT_UNLOCKED=1 ./scripts/setup_env.sh   # the newest versions requirements.txt allows
#
# What it does, the first time:
#   1. python3 -m venv --system-site-packages .venv   (a torch you already have, e.g. a
#      CUDA build on a GPU node, stays visible and is never replaced)
#   2. if `import torch` fails in the venv: install torch. No NVIDIA GPU (nvidia-smi -L
#      fails): the CPU build, torch==2.13.0+cpu from the PyTorch CPU index; with a GPU:
#      torch from PyPI. TORCH_SPEC overrides, e.g. TORCH_SPEC="torch==2.13.0".
#   3. pip install the exact versions of requirements.lock (made from requirements.txt by
#      scripts/lock_requirements.sh), with torch pinned to the installed version so nothing
#      upgrades or replaces it. A locked package whose version the installed torch does not
#      accept (a CUDA torch pins its own triton) is left as torch has it, and said so.
#      TRAINKIT_UNLOCKED=1: requirements.txt instead, newest allowed versions (--upgrade).
#   4. writes a stamp (hashes of both files + mode + Python version) into the venv.
#
# Environment:
#   TRAINKIT_VENV=PATH     venv location (default: <repo>/.venv)
#   TRAINKIT_NO_VENV=1     use the current python3 as is: no venv, no installs; only
#                          check that the packages are importable (and name the ones whose
#                          version differs from requirements.lock)
#   TRAINKIT_UNLOCKED=1    install the newest versions requirements.txt allows, not the lock
#   TORCH_SPEC=SPEC        pip requirement for torch when it has to be installed
#   PYTHON=EXE             base interpreter (default: python3)
#
# All messages go to stderr; on failure it exits non-zero with a one-line reason.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REQUIREMENTS="$REPO/requirements.txt"
LOCKFILE="$REPO/requirements.lock"
UNLOCKED="${TRAINKIT_UNLOCKED:-0}"
VENV="${TRAINKIT_VENV:-$REPO/.venv}"
BASE_PYTHON="${PYTHON:-python3}"
CPU_TORCH_SPEC="torch==2.13.0+cpu"
CPU_TORCH_INDEX="https://download.pytorch.org/whl/cpu"
# Import names of what requirements.txt installs, for the quick checks below.
MODULES="torch transformers accelerate peft bitsandbytes datasets tokenizers safetensors yaml tqdm fla triton sklearn scipy rouge_score sacrebleu sqlparse flask matplotlib pynvml prometheus_client pytest"

say() { echo "setup: $*" >&2; }
die() { echo "setup: error: $*" >&2; exit 1; }

PRINT_PYTHON=0
case "${1:-}" in
    --print-python) PRINT_PYTHON=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    "") ;;
    *) die "unknown option $1 (see --help)" ;;
esac

done_python() {  # print the interpreter for callers that asked for it
    if [[ $PRINT_PYTHON == 1 ]]; then echo "$1"; fi
    exit 0
}

missing_modules() {  # $1: interpreter; prints the modules of MODULES it cannot find
    "$1" - $MODULES <<'PY'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
PY
}

lock_plan() {  # $1: interpreter; the lock as it applies to this machine (scripts/lock_plan.py)
    "$1" "$REPO/scripts/lock_plan.py" "$LOCKFILE" "$2"
}

# ---------------------------------------------------------------- TRAINKIT_NO_VENV=1
if [[ "${TRAINKIT_NO_VENV:-0}" == 1 ]]; then
    py="$(command -v "$BASE_PYTHON" || true)"
    [[ -n "$py" ]] || die "TRAINKIT_NO_VENV=1 but $BASE_PYTHON is not on PATH"
    missing="$(missing_modules "$py")" || die "$py does not run"
    [[ -z "$missing" ]] || die "TRAINKIT_NO_VENV=1 but $py lacks: $missing (pip install -r requirements.lock, and torch)"
    lock_plan "$py" --report-only || true
    done_python "$py"
fi

# ---------------------------------------------------------------- fast path: stamp matches
[[ -f "$REQUIREMENTS" ]] || die "no requirements.txt in $REPO"
[[ -f "$LOCKFILE" || "$UNLOCKED" == 1 ]] || die "no requirements.lock in $REPO (./scripts/lock_requirements.sh makes it; TRAINKIT_UNLOCKED=1 installs without it)"
[[ "$UNLOCKED" =~ ^[01]$ ]] || die "TRAINKIT_UNLOCKED must be 0 or 1, not '$UNLOCKED'"
command -v "$BASE_PYTHON" >/dev/null || die "$BASE_PYTHON not found: install Python >= 3.10"
PY_VERSION="$("$BASE_PYTHON" -c 'import platform; print(platform.python_version())')" \
    || die "$BASE_PYTHON does not run"
"$BASE_PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || die "Python >= 3.10 needed, $BASE_PYTHON is $PY_VERSION (set PYTHON=python3.11 or similar)"
file_hash() {
    [[ -f "$1" ]] || { echo none; return; }
    if command -v sha256sum >/dev/null; then sha256sum "$1" | cut -d' ' -f1; else shasum -a 256 "$1" | cut -d' ' -f1; fi
}
MODE="locked"; [[ "$UNLOCKED" == 1 ]] && MODE="unlocked"
STAMP="$VENV/.trainkit-setup-stamp"
WANT_STAMP="requirements=$(file_hash "$REQUIREMENTS") lock=$(file_hash "$LOCKFILE") mode=$MODE python=$PY_VERSION"
VPY="$VENV/bin/python"
if [[ -x "$VPY" && -f "$STAMP" && "$(cat "$STAMP")" == "$WANT_STAMP" ]]; then
    done_python "$VPY"
fi

# ---------------------------------------------------------------- slow path, under a lock
# Several launches at once (e.g. every node of a multi-node job on a shared disk) must
# not build the same venv concurrently.
mkdir -p "$VENV"
LOCK="$VENV/.trainkit-setup.lock"
if command -v flock >/dev/null; then
    exec 9>"$LOCK"
    flock 9
    if [[ -x "$VPY" && -f "$STAMP" && "$(cat "$STAMP")" == "$WANT_STAMP" ]]; then
        done_python "$VPY"  # another process finished the setup while we waited
    fi
fi
start=$SECONDS

# 1. the venv
if [[ -f "$STAMP" ]] && ! grep -q "python=$PY_VERSION\$" "$STAMP"; then
    say "Python changed ($(sed 's/.*python=//' "$STAMP") -> $PY_VERSION): recreating $VENV"
    # Our own venv (it has our stamp): empty it, keeping the lock we hold.
    find "$VENV" -mindepth 1 -maxdepth 1 ! -name "$(basename "$LOCK")" -exec rm -rf {} +
    "$BASE_PYTHON" -m venv --system-site-packages "$VENV" >&2 \
        || die "python3 -m venv failed (Debian/Ubuntu: apt-get install python3-venv)"
elif [[ ! -x "$VPY" ]]; then
    say "creating $VENV (python $PY_VERSION, --system-site-packages: a torch you already have is kept)"
    "$BASE_PYTHON" -m venv --system-site-packages "$VENV" >&2 \
        || die "python3 -m venv failed (Debian/Ubuntu: apt-get install python3-venv)"
else
    say "updating $VENV (requirements changed, the install mode changed, or an earlier setup did not finish)"
fi
"$VPY" -c 'pass' 2>/dev/null || die "$VPY does not run: remove $VENV and run again"
pip_install() { "$VPY" -m pip install --disable-pip-version-check "$@" >&2; }

# 2. torch: keep the one that is there; otherwise the build that fits this machine
if "$VPY" -c 'import torch' 2>/dev/null; then
    say "keeping the installed torch $("$VPY" -c 'import torch; print(torch.__version__)')"
else
    if [[ -n "${TORCH_SPEC:-}" ]]; then
        say "installing $TORCH_SPEC (from TORCH_SPEC)"
        # word splitting on purpose: TORCH_SPEC may carry pip options
        # shellcheck disable=SC2086
        pip_install $TORCH_SPEC || die "pip install $TORCH_SPEC failed (see above)"
    elif nvidia-smi -L >/dev/null 2>&1; then
        say "NVIDIA GPU found: installing torch from PyPI (CUDA build)"
        pip_install torch || die "pip install torch failed (see above)"
    elif [[ "$(uname -s)" == Linux ]]; then
        say "no NVIDIA GPU: installing the CPU build $CPU_TORCH_SPEC"
        # Few retries and a short timeout: an unreachable PyTorch index must not stall
        # the setup when another configured index has the wheel.
        pip_install "$CPU_TORCH_SPEC" --extra-index-url "$CPU_TORCH_INDEX" --retries 1 --timeout 10 \
            || die "pip install $CPU_TORCH_SPEC failed (set TORCH_SPEC to another torch requirement)"
    else
        say "no NVIDIA GPU on $(uname -s): installing torch from PyPI"
        pip_install torch || die "pip install torch failed (see above)"
    fi
fi
TORCH_VERSION="$("$VPY" -c 'import torch; print(torch.__version__)' 2>/dev/null)" \
    || die "torch is installed but does not import in $VENV"

# 3. everything else, with torch pinned so pip never swaps it
CONSTRAINTS="$VENV/.trainkit-constraints.txt"
echo "torch==$TORCH_VERSION" >"$CONSTRAINTS"
if [[ "$MODE" == unlocked ]]; then
    say "installing the newest versions requirements.txt allows (TRAINKIT_UNLOCKED=1; torch pinned to $TORCH_VERSION)"
    pip_install --upgrade --upgrade-strategy eager -r "$REQUIREMENTS" -c "$CONSTRAINTS" \
        || die "pip install -r requirements.txt failed (see above; a requirement may need a newer torch than $TORCH_VERSION)"
else
    PLAN="$VENV/.trainkit-locked-requirements.txt"
    lock_plan "$VPY" "$PLAN" || die "could not read requirements.lock"
    say "installing requirements.lock ($(grep -c . "$PLAN") packages; torch pinned to $TORCH_VERSION)"
    pip_install -r "$PLAN" -c "$CONSTRAINTS" \
        || die "pip install -r requirements.lock failed (see above; the lock may need a newer torch than $TORCH_VERSION, or TRAINKIT_UNLOCKED=1)"
fi
missing="$(missing_modules "$VPY")"
[[ -z "$missing" ]] || die "installed, but these do not import: $missing"

# 4. stamp
echo "$WANT_STAMP" >"$STAMP"
say "ready: $VENV ($MODE; torch $TORCH_VERSION, python $PY_VERSION) in $((SECONDS - start)) s"
done_python "$VPY"

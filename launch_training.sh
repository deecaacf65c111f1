#!/usr/bin/env bash
# launch_training.sh: the one command that trains a config.
#
# Sets up .venv on first use (scripts/setup_env.sh), checks the config and its model/data
# paths, finds the GPUs (or the CPU), resumes from the run's latest checkpoint, and runs
# the script the config names (`script:`, default train_qlora.py) under `accelerate launch`.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PROG="./$(basename "${BASH_SOURCE[0]}")"

usage() {
    cat <<EOF
Usage: $PROG [options] [section.key=value ...] [-- section.key=value ...]

Trains a config with accelerate: sets up .venv on first use, validates the config,
picks processes and GPUs, resumes from the latest checkpoint of the run, and runs the
script the config names (its 'script:' key; default train_qlora.py).

Config:
  --config FILE              YAML config (default: training_config.yaml)
  section.key=value          override a config key (any number; also after --)

Processes and devices:
  --num-processes N          total processes over all machines (default: visible GPUs
                             x machines; 1 on a machine without a GPU)
  --gpus LIST                GPUs to use, e.g. "0,1" (sets CUDA_VISIBLE_DEVICES)
  --accelerate-config C      a config from configs/accelerate/ by name (single_gpu, ddp,
                             deepspeed_zero2, deepspeed_zero3, fsdp, multi_node, cpu)
                             or a path to an accelerate config YAML
  --mixed-precision P        no | fp16 | bf16 | fp8 (default: bf16 on GPU, no on CPU,
                             or the accelerate config's value)
  --num-machines N           machines in a multi-node run (default 1)
  --machine-rank R           rank of this machine (0 .. N-1)
  --main-process-ip IP       address of machine 0
  --main-process-port PORT   port on machine 0 (default 29500)

Resume:
  (default)                  resume from the run's latest complete checkpoint-* if any
                             (the newest on the line of the latest attempt)
  --no-resume                start over; an existing run directory is moved aside to
                             <run>.old-<timestamp> (nothing is deleted)
  --resume-from PATH         resume from this checkpoint directory
  --allow-config-change      resume even when keys that cannot change on resume (model,
                             adapter shape, data, seed, sequence length, batch) differ
                             from the checkpoint's config

Other:
  --dashboard                also start ./start_dashboard.sh --logdir <output_dir> in the
                             background, stopped when training ends
  --dry-run                  validate, print the accelerate command, and exit
  -h, --help                 this help

Environment:
  TRAINKIT_VENV=PATH         venv to use/create (default: .venv)
  TRAINKIT_NO_VENV=1         use the python3 on PATH as is (no setup)
  TORCH_SPEC=SPEC            torch to install when none is importable (see scripts/setup_env.sh)
  Values of variables and config keys whose names contain KEY, TOKEN, SECRET or PASSWORD
  are printed as ***.

One writer per run directory: the launcher locks <output_dir>/.<run_name>.lock before it
resumes or moves anything and holds it until training ends; a second launch of the same run
(launcher or script) exits 2 with one line naming the holder's host and pid.

Exit code: the training script's exit code; 2 (with one line) for a bad config, missing
model/data path, bad option or a run directory in use; 143 (SIGTERM) or 130 (SIGINT, Ctrl-C) when a signal stopped
the training: SIGTERM/SIGINT to this script are passed to the training processes, which
finish the current step, save a checkpoint and exit; this script waits for them. Running
the same command again resumes. 1 when a training process died without an exit code of its
own (SIGKILL, the OOM killer): one line names the rank, also written to the run's
logs/error_log.jsonl (RankDied), and run.json is set to failed if rank 0 could not do it.

Examples:
  $PROG                                          # default config, CPU or all GPUs
  $PROG --config configs/big.yaml --gpus 0,1 training.max_steps=500
  $PROG --accelerate-config deepspeed_zero2 --num-processes 4
  $PROG --num-machines 2 --machine-rank 0 --main-process-ip 10.0.0.1 --accelerate-config multi_node
  $PROG --dry-run --no-resume
EOF
}

die() { echo "launch_training.sh: error: $*" >&2; exit 2; }
say() { echo "launch_training.sh: $*"; }

# ---------------------------------------------------------------- arguments
CONFIG="training_config.yaml"
NUM_PROCESSES=""
GPUS=""
ACC_CONFIG=""
MIXED_PRECISION=""
NUM_MACHINES=""
MACHINE_RANK=""
MAIN_IP=""
MAIN_PORT=""
NO_RESUME=0
RESUME_FROM=""
ALLOW_CONFIG_CHANGE=0
DASHBOARD=0
DRY_RUN=0
OVERRIDES=()

need_value() { [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "$1 needs a value (see --help)"; }
is_int() { [[ "$1" =~ ^[0-9]+$ ]]; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --config) need_value "$@"; CONFIG="$2"; shift 2 ;;
        --num-processes) need_value "$@"; NUM_PROCESSES="$2"; shift 2 ;;
        --gpus) need_value "$@"; GPUS="$2"; shift 2 ;;
        --accelerate-config) need_value "$@"; ACC_CONFIG="$2"; shift 2 ;;
        --mixed-precision) need_value "$@"; MIXED_PRECISION="$2"; shift 2 ;;
        --num-machines) need_value "$@"; NUM_MACHINES="$2"; shift 2 ;;
        --machine-rank) need_value "$@"; MACHINE_RANK="$2"; shift 2 ;;
        --main-process-ip) need_value "$@"; MAIN_IP="$2"; shift 2 ;;
        --main-process-port) need_value "$@"; MAIN_PORT="$2"; shift 2 ;;
        --no-resume) NO_RESUME=1; shift ;;
        --resume-from) need_value "$@"; RESUME_FROM="$2"; shift 2 ;;
        --allow-config-change) ALLOW_CONFIG_CHANGE=1; shift ;;
        --dashboard) DASHBOARD=1; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        --) shift; OVERRIDES+=("$@"); break ;;
        --*=*) die "unknown option ${1%%=*} (options take their value after a space; see --help)" ;;
        -*) die "unknown option $1 (see --help)" ;;
        *=*) OVERRIDES+=("$1"); shift ;;
        *) die "unexpected argument '$1' (overrides look like section.key=value; see --help)" ;;
    esac
done

[[ -z "$NUM_PROCESSES" ]] || { is_int "$NUM_PROCESSES" && [[ $NUM_PROCESSES -ge 1 ]]; } || die "--num-processes: expected a positive integer, got '$NUM_PROCESSES'"
[[ -z "$NUM_MACHINES" ]] || { is_int "$NUM_MACHINES" && [[ $NUM_MACHINES -ge 1 ]]; } || die "--num-machines: expected a positive integer, got '$NUM_MACHINES'"
[[ -z "$MACHINE_RANK" ]] || is_int "$MACHINE_RANK" || die "--machine-rank: expected an integer >= 0, got '$MACHINE_RANK'"
[[ -z "$MAIN_PORT" ]] || { is_int "$MAIN_PORT" && [[ $MAIN_PORT -ge 1 && $MAIN_PORT -le 65535 ]]; } || die "--main-process-port: expected a port number, got '$MAIN_PORT'"
[[ -z "$MIXED_PRECISION" ]] || [[ "$MIXED_PRECISION" =~ ^(no|fp16|bf16|fp8)$ ]] || die "--mixed-precision: '$MIXED_PRECISION' is not one of no, fp16, bf16, fp8"
[[ -z "$GPUS" ]] || [[ "$GPUS" =~ ^[A-Za-z0-9-]+(,[A-Za-z0-9-]+)*$ ]] || die "--gpus: expected a comma-separated list like 0,1, got '$GPUS'"
[[ $NO_RESUME == 0 || -z "$RESUME_FROM" ]] || die "--no-resume and --resume-from exclude each other"
NUM_MACHINES="${NUM_MACHINES:-1}"
if [[ $NUM_MACHINES -gt 1 ]]; then
    [[ -n "$MACHINE_RANK" ]] || die "--num-machines $NUM_MACHINES needs --machine-rank (0 .. $((NUM_MACHINES - 1)))"
    [[ -n "$MAIN_IP" ]] || die "--num-machines $NUM_MACHINES needs --main-process-ip (the address of machine 0)"
    [[ $MACHINE_RANK -lt $NUM_MACHINES ]] || die "--machine-rank $MACHINE_RANK: must be below --num-machines $NUM_MACHINES"
fi
MACHINE_RANK="${MACHINE_RANK:-0}"

cd "$REPO"

# ---------------------------------------------------------------- environment setup
# scripts/setup_env.sh is a no-op when .venv is up to date; it prints the interpreter.
PY="$("$REPO/scripts/setup_env.sh" --print-python)" || die "environment setup failed (see above)"

# ---------------------------------------------------------------- devices
GPU_LINES=""
if command -v nvidia-smi >/dev/null 2>&1; then
    GPU_LINES="$(nvidia-smi --query-gpu=index,name,memory.total,memory.used --format=csv,noheader 2>/dev/null || true)"
fi
if [[ -n "$GPUS" ]]; then
    [[ -n "$GPU_LINES" ]] || die "--gpus $GPUS: no NVIDIA GPU found (nvidia-smi failed or is missing)"
    export CUDA_VISIBLE_DEVICES="$GPUS"
fi
if [[ -z "$GPU_LINES" ]]; then
    NUM_GPUS=0
elif [[ -n "${CUDA_VISIBLE_DEVICES+x}" ]]; then
    if [[ -z "$CUDA_VISIBLE_DEVICES" || "$CUDA_VISIBLE_DEVICES" == "-1" ]]; then
        NUM_GPUS=0
    else
        IFS=, read -r -a _visible <<<"$CUDA_VISIBLE_DEVICES"
        NUM_GPUS=${#_visible[@]}
    fi
else
    NUM_GPUS=$(grep -c . <<<"$GPU_LINES")
fi
if [[ $NUM_GPUS -gt 0 ]]; then
    ON_CPU=0
    GPU_REPORT="GPUs (nvidia-smi: index, name, memory total, memory used):
$(sed 's/^/  /' <<<"$GPU_LINES")"
    if [[ -n "${CUDA_VISIBLE_DEVICES+x}" ]]; then
        GPU_REPORT+=$'\n'"  visible: CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES ($NUM_GPUS)"
    fi
else
    ON_CPU=1
    GPU_REPORT="no GPU: training on CPU"
fi
NUM_PROCESSES="${NUM_PROCESSES:-$(( ON_CPU ? NUM_MACHINES : NUM_GPUS * NUM_MACHINES ))}"
[[ $((NUM_PROCESSES % NUM_MACHINES)) == 0 ]] || die "--num-processes $NUM_PROCESSES is not a multiple of --num-machines $NUM_MACHINES"
PER_MACHINE=$((NUM_PROCESSES / NUM_MACHINES))
if [[ $ON_CPU == 0 && $PER_MACHINE -gt $NUM_GPUS ]]; then
    die "--num-processes $NUM_PROCESSES means $PER_MACHINE per machine, but only $NUM_GPUS GPU(s) are visible"
fi

# ---------------------------------------------------------------- environment for the run
# Only set what the user has not set. HF_HUB_ENABLE_HF_TRANSFER is left alone. The old name
# NCCL_ASYNC_ERROR_HANDLING is not set: torch >= 2.2 reads TORCH_NCCL_ASYNC_ERROR_HANDLING and
# warns on every rank about the old one.
SET_VARS=()
set_default() {  # name value
    if [[ -z "${!1+x}" ]]; then export "$1=$2"; SET_VARS+=("$1"); fi
}
set_default PYTORCH_CUDA_ALLOC_CONF "expandable_segments:True"
set_default PYTORCH_ALLOC_CONF "${PYTORCH_CUDA_ALLOC_CONF}"
set_default TOKENIZERS_PARALLELISM false
set_default TORCH_NCCL_ASYNC_ERROR_HANDLING 1
# fla's Triton kernels autotune on the first step of a new shape (minutes): keep compiled kernels
# and autotuning results on disk so the next start of the same shapes skips it.
set_default TRITON_CACHE_DIR "${HOME:-/tmp}/.triton/cache"
set_default TRITON_CACHE_AUTOTUNING 1
CORES="$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)"
THREADS=$(( CORES / PER_MACHINE )); [[ $THREADS -ge 1 ]] || THREADS=1
set_default OMP_NUM_THREADS "$THREADS"   # torchrun would set 1, which starves CPU training
if [[ $ON_CPU == 1 ]]; then
    set_default ACCELERATE_USE_CPU 1
fi
EXIT_DIR=""
DASH_PID=""
cleanup() {
    if [[ -n "$DASH_PID" ]] && kill -0 "$DASH_PID" 2>/dev/null; then
        say "stopping the dashboard (pid $DASH_PID)"
        kill -TERM -- "-$DASH_PID" 2>/dev/null || kill -TERM "$DASH_PID" 2>/dev/null || true
        for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$DASH_PID" 2>/dev/null || break; sleep 0.5; done
        kill -KILL -- "-$DASH_PID" 2>/dev/null || true
    fi
    if [[ -n "$EXIT_DIR" ]]; then rm -rf "$EXIT_DIR"; fi
}
trap cleanup EXIT
EXIT_DIR="$(mktemp -d "${TMPDIR:-/tmp}/trainkit-exit.XXXXXX")"
export TRAINKIT_EXIT_DIR="$EXIT_DIR"

# ---------------------------------------------------------------- config, run dir, checkpoint
SHELL_FILE="$EXIT_DIR/info.sh"
INFO_ARGS=(--config "$CONFIG" --shell-file "$SHELL_FILE" --print-config)
[[ -z "$ACC_CONFIG" ]] || INFO_ARGS+=(--accelerate-config "$ACC_CONFIG")
[[ -z "$RESUME_FROM" ]] || INFO_ARGS+=(--resume-from "$RESUME_FROM")
# Validate before printing anything, so a bad config gives exactly one line (stderr).
INFO_OUT="$("$PY" -m trainkit.launcher info "${INFO_ARGS[@]}" -- ${OVERRIDES[@]+"${OVERRIDES[@]}"})" \
    || exit 2  # the helper printed the one-line reason
echo "$GPU_REPORT"
echo "$INFO_OUT"
echo "processes: $NUM_PROCESSES ($PER_MACHINE per machine x $NUM_MACHINES machine(s)); environment set by the launcher: ${SET_VARS[*]:-none}"
# shellcheck disable=SC1090
source "$SHELL_FILE"

# ---------------------------------------------------------------- one writer per run dir
# Lock the run dir (trainkit/runlock.py) before deciding on resume or moving an earlier attempt
# aside, and read its state again under the lock. The shell keeps the lock file open on fd 9 and
# a python child flocks that shared open file, so the lock lasts until this shell exits; the
# script (whose launcher closes inherited fds) accepts it as its ancestor's via TRAINKIT_RUN_LOCK.
# Machine 0 locks for a multi-node run; a dry run only checks.
LOCK_STATE_FILE="$EXIT_DIR/run_dir_state.sh"
if [[ $DRY_RUN == 1 ]]; then
    lock_msg="$("$PY" -m trainkit.launcher lock --probe "$TK_RUN_DIR")" || die "$lock_msg"
elif [[ $MACHINE_RANK == 0 ]]; then
    mkdir -p "$(dirname "$TK_LOCK_FILE")" 2>/dev/null || die "cannot create the output directory $(dirname "$TK_LOCK_FILE")"
    { exec 9>>"$TK_LOCK_FILE"; } 2>/dev/null || die "cannot open the run-dir lock file $TK_LOCK_FILE"
    lock_msg="$("$PY" -m trainkit.launcher lock --fd 9 --holder-pid $$ --shell-file "$LOCK_STATE_FILE" "$TK_RUN_DIR")" \
        || die "$lock_msg"
    export TRAINKIT_RUN_LOCK="$TK_LOCK_FILE"
    # shellcheck disable=SC1090
    source "$LOCK_STATE_FILE"
fi

RESUME_ARGS=()
ARCHIVE=0
if [[ -n "$RESUME_FROM" ]]; then
    RESUME_ARGS=(--resume_from "$RESUME_FROM")
    say "resuming from $RESUME_FROM (--resume-from)"
elif [[ $NO_RESUME == 1 ]]; then
    [[ -z "$TK_RUN_DIR_HAS_DATA" ]] || ARCHIVE=1
    say "starting over (--no-resume)"
elif [[ "$TK_RUN_STATUS" == finished ]]; then
    say "$TK_RUN_DIR already finished: nothing to do (--no-resume starts over and moves it aside; paths.run_name=NAME starts another run; --resume-from PATH continues from a checkpoint)"
    exit 0
elif [[ -n "$TK_LATEST_CHECKPOINT" ]]; then
    RESUME_ARGS=(--resume)
    say "resuming from $TK_LATEST_CHECKPOINT (--no-resume starts over)"
else
    [[ -z "$TK_RUN_DIR_HAS_DATA" ]] || ARCHIVE=1
    if [[ $ARCHIVE == 1 ]]; then
        say "$TK_RUN_DIR has no complete checkpoint: starting over (the earlier attempt is moved aside)"
    else
        say "starting a new run in $TK_RUN_DIR"
    fi
fi
if [[ $MACHINE_RANK != 0 ]]; then
    ARCHIVE=0  # machine 0 moves the old run aside; the others must not race it
    say "machine $MACHINE_RANK of $NUM_MACHINES: machine 0 locks and writes $TK_RUN_DIR (it must be on a file system all machines share); this machine trains"
fi

# ---------------------------------------------------------------- the accelerate command
ACC=("$PY" -m accelerate.commands.launch --quiet)
if [[ -n "$TK_ACCELERATE_CONFIG" ]]; then
    if [[ "$TK_ACCELERATE_USE_CPU" == 1 && $PER_MACHINE -gt 1 ]]; then
        die "--accelerate-config $ACC_CONFIG runs one CPU process; for $PER_MACHINE CPU processes leave --accelerate-config out"
    fi
    ACC+=(--config_file "$TK_ACCELERATE_CONFIG")
    if [[ "$TK_ACCELERATE_DISTRIBUTED_TYPE" != NO ]]; then
        ACC+=(--num_processes "$NUM_PROCESSES")
    elif [[ $NUM_PROCESSES -gt 1 ]]; then
        die "--accelerate-config $ACC_CONFIG runs one process; use ddp, fsdp or deepspeed_* for $NUM_PROCESSES"
    fi
    [[ -z "$MIXED_PRECISION" ]] || ACC+=(--mixed_precision "$MIXED_PRECISION")
    [[ $NUM_MACHINES == 1 ]] || ACC+=(--num_machines "$NUM_MACHINES")
elif [[ $ON_CPU == 1 && $NUM_PROCESSES == 1 ]]; then
    ACC+=(--cpu --num_processes 1 --num_machines 1 --mixed_precision "${MIXED_PRECISION:-no}" --dynamo_backend no)
elif [[ $ON_CPU == 1 ]]; then
    # `--cpu --num_processes 2` starts one process: use --multi_gpu (gloo) with ACCELERATE_USE_CPU=1.
    ACC+=(--multi_gpu --num_processes "$NUM_PROCESSES" --num_machines "$NUM_MACHINES"
          --mixed_precision "${MIXED_PRECISION:-no}" --dynamo_backend no)
elif [[ $NUM_PROCESSES == 1 ]]; then
    ACC+=(--num_processes 1 --num_machines 1 --mixed_precision "${MIXED_PRECISION:-bf16}" --dynamo_backend no)
else
    ACC+=(--multi_gpu --num_processes "$NUM_PROCESSES" --num_machines "$NUM_MACHINES"
          --mixed_precision "${MIXED_PRECISION:-bf16}" --dynamo_backend no)
fi
if [[ $NUM_MACHINES -gt 1 || -n "$MAIN_IP" ]]; then
    ACC+=(--machine_rank "$MACHINE_RANK")
    [[ -z "$MAIN_IP" ]] || ACC+=(--main_process_ip "$MAIN_IP")
    ACC+=(--main_process_port "${MAIN_PORT:-29500}")
elif [[ -n "$MAIN_PORT" ]]; then
    ACC+=(--main_process_port "$MAIN_PORT")
fi
[[ $ALLOW_CONFIG_CHANGE == 0 || ${#RESUME_ARGS[@]} == 0 ]] || RESUME_ARGS+=(--allow_config_change)
SCRIPT_ARGS=("$TK_SCRIPT" --config "$CONFIG" ${RESUME_ARGS[@]+"${RESUME_ARGS[@]}"} ${OVERRIDES[@]+"${OVERRIDES[@]}"})
# The script runs through `python -m trainkit.launcher exec`, which records its exit code
# (accelerate reports every failure as 1).
CMD=("${ACC[@]}" -m trainkit.launcher exec "${SCRIPT_ARGS[@]}")

echo "command:"
echo "  $("$PY" -m trainkit.launcher show-command -- "${CMD[@]}")"

if [[ $DRY_RUN == 1 ]]; then
    if [[ $ARCHIVE == 1 ]]; then say "would move $TK_RUN_DIR aside to $TK_RUN_DIR.old-<timestamp>"; fi
    say "dry run: nothing started"
    exit 0
fi

if [[ $ARCHIVE == 1 ]]; then
    moved="$("$PY" -m trainkit.launcher archive "$TK_RUN_DIR")" || die "could not move $TK_RUN_DIR aside"
    say "moved the earlier run aside: $moved"
fi

# ---------------------------------------------------------------- dashboard beside the run
if [[ $DASHBOARD == 1 ]]; then
    if [[ -x "$REPO/start_dashboard.sh" ]]; then
        # Own process group (setsid), so stopping it also stops its workers; without the lock's fd 9,
        # so a dashboard left running never holds the run dir.
        if command -v setsid >/dev/null; then
            setsid "$REPO/start_dashboard.sh" --logdir "$TK_OUTPUT_DIR" </dev/null 9>&- &
        else
            "$REPO/start_dashboard.sh" --logdir "$TK_OUTPUT_DIR" </dev/null 9>&- &
        fi
        DASH_PID=$!
        say "dashboard started (pid $DASH_PID): ./start_dashboard.sh --logdir $TK_OUTPUT_DIR"
    else
        say "warning: --dashboard: ./start_dashboard.sh not found; training without the dashboard"
    fi
fi

# ---------------------------------------------------------------- train
# accelerate runs in its own session (setsid), so a Ctrl-C in the terminal reaches only this
# script: SIGTERM and SIGINT are delivered to the trainer processes themselves (their pids are in
# $EXIT_DIR/pid-<rank>), which finish the step, save a checkpoint and exit (trainkit/preemption.py).
# Signalling accelerate or torchrun instead would print their tracebacks, and torchrun kills its
# workers ~30 s after it is signalled, whatever training.preemption_grace_seconds says.
PENDING_SIGNAL=""
TRAIN_PID=""
forward_signal() {  # signal name
    PENDING_SIGNAL="$1"
    say "SIG$1: asking the training to save a checkpoint and stop (a second signal stops it at once)"
    deliver_pending_signal
}
deliver_pending_signal() {
    [[ -n "$PENDING_SIGNAL" ]] || return 0
    local f pid delivered=0
    for f in "$EXIT_DIR"/pid-*; do
        [[ -f "$f" ]] || continue
        pid="$(cat "$f" 2>/dev/null)" || continue
        [[ "$pid" =~ ^[0-9]+$ ]] && kill -s "$PENDING_SIGNAL" "$pid" 2>/dev/null && delivered=1
    done
    # No trainer has started yet (accelerate is still importing): deliver when one has.
    [[ $delivered == 0 ]] || PENDING_SIGNAL=""
}
trap 'forward_signal TERM' TERM
trap 'forward_signal INT' INT
trap 'forward_signal TERM' HUP  # the terminal closed: accelerate, in its own session, would not get SIGHUP
set +e
if command -v setsid >/dev/null; then
    setsid "${CMD[@]}" &
else
    "${CMD[@]}" &
fi
TRAIN_PID=$!
# `wait` returns early when a trapped signal arrives: keep waiting until accelerate has exited.
# A signal that found no trainer yet is retried until one has written its pid.
while :; do
    if [[ -n "$PENDING_SIGNAL" ]] && kill -0 "$TRAIN_PID" 2>/dev/null; then
        deliver_pending_signal
        sleep 0.2
        continue
    fi
    wait "$TRAIN_PID"
    rc=$?
    kill -0 "$TRAIN_PID" 2>/dev/null || break
done
set -e
trap - TERM INT HUP
# The trainers' own exit codes (accelerate turns every failure into 1; a trainer stopped by a
# signal exits 0 towards accelerate and records 143 or 130 here).
script_rc=""
for f in "$EXIT_DIR/rank-0" "$EXIT_DIR"/rank-*; do
    [[ -f "$f" ]] || continue
    code="$(cat "$f")"
    if [[ "$code" != 0 ]]; then script_rc="$code"; break; fi
done
if [[ -n "$script_rc" ]]; then rc="$script_rc"; fi
# A trainer killed by SIGKILL (the OOM killer, a dying GPU process) records nothing, and when it
# is rank 0 nothing writes the run dir: record it here (error_log.jsonl, run.json failed), exit 1.
END_ARGS=("$TK_RUN_DIR" --exit-dir "$EXIT_DIR" --exit-code "$rc")
[[ $MACHINE_RANK == 0 ]] || END_ARGS+=(--report-only)
if end_rc="$("$PY" -m trainkit.launcher record-end "${END_ARGS[@]}")" && is_int "$end_rc"; then rc="$end_rc"; fi
if [[ $rc == 0 ]]; then
    say "training finished: $TK_RUN_DIR"
elif [[ $rc == 143 || $rc == 130 ]]; then
    echo "launch_training.sh: training stopped by a signal (exit code $rc); the same command resumes from its latest checkpoint (run dir: $TK_RUN_DIR)" >&2
else
    echo "launch_training.sh: training exited with code $rc (run dir: $TK_RUN_DIR)" >&2
fi
exit "$rc"

"""Helpers for launch_training.sh; nothing here imports torch, so every call is quick.

    python -m trainkit.launcher info --config FILE [--accelerate-config NAME|PATH]
                                     [--resume-from PATH] [--shell-file F] [overrides...]
        Validate the config (exit 2 and one line when it is bad or a model/data path is
        missing), print the script, run dir, latest checkpoint, the environment the
        launch uses and the config, with secrets redacted. --shell-file writes the
        facts as shell assignments for the launcher to `source`.
    python -m trainkit.launcher lock RUN_DIR (--fd N [--holder-pid PID] | --probe) [--shell-file F]
        One writer per run dir (trainkit.runlock): flock the lock file the launcher's shell has
        open on descriptor N, recording PID (the shell) as holder, so the lock lasts until the
        shell exits; --probe only checks. Exit 2 with the one-line reason on stdout when
        another process holds it; --shell-file writes the run-dir facts read under the lock.
    python -m trainkit.launcher archive RUN_DIR
        Move a run directory aside to RUN_DIR.old-<timestamp> (never deletes anything).
    python -m trainkit.launcher show-command -- ARGS...
        Print a command line with secret-looking `key=value` arguments redacted.
    python -m trainkit.launcher exec SCRIPT ARGS...
        Run SCRIPT as __main__ (what `accelerate launch -m trainkit.launcher exec` starts on
        every process) and record its exit code in $TRAINKIT_EXIT_DIR/rank-<RANK>, so the
        launcher can exit with the script's own code (accelerate turns every failure
        into 1), and its pid in $TRAINKIT_EXIT_DIR/pid-<RANK>, so the launcher can send
        SIGTERM/SIGINT to the trainers directly. A run stopped by such a signal exits 0
        towards accelerate (no torchrun failure report); its code (143/130) is recorded.
    python -m trainkit.launcher record-end RUN_DIR --exit-dir D --exit-code N [--report-only]
        After accelerate has exited: the trainers that wrote a pid but no exit code in D died
        where no Python ran (SIGKILL, the OOM killer, a hard crash). Records that, and a run.json
        still saying running, in RUN_DIR (error_log.jsonl, a stop event, status failed), prints
        one line on stderr and the launcher's exit code on stdout (1 when a rank died).
        --report-only (machines other than 0, which do not write the run dir): the line only.

Validation: a config whose `script` is one of the entry points (trainkit.config.scripts.SCRIPT_CONFIGS)
is checked against that script's model, environment overrides (HP_*) included, as the script will
check it; for any other script the shared sections (trainkit.config.base.TrainConfig) are checked
strictly and the sections and keys they do not know are passed through for the script to check.
"""

from __future__ import annotations

import argparse
import os
import runpy
import shlex
import sys
from pathlib import Path

import yaml

from trainkit import runlock
from trainkit.checkpoints import archive_run_dir
from trainkit.config import (REDACTED, ConfigError, apply_overrides, check_paths, is_secret_name, load_raw, load_script_config,
                             name_run, public_config, redact, section_class, validate)
from trainkit.config.base import TrainConfig
from trainkit.config.scripts import SCRIPT_CONFIGS

REPO = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIG_DIR = REPO / "configs" / "accelerate"
DEFAULT_SCRIPT = "train_qlora.py"
# Environment variables worth showing before a launch (values redacted by name).
ENV_PREFIXES = ("CUDA_", "NCCL_", "TORCH_", "PYTORCH_", "ACCELERATE_", "HF_", "HUGGING_FACE_", "TRANSFORMERS_",
                "TOKENIZERS_", "WANDB_", "TRITON_", "OMP_", "MKL_", "DS_", "HP_", "MASTER_", "TRAINKIT_",
                "LR_", "EVAL_GEN", "GLA_", "DATALOADER_")
ENV_NAMES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "GRADIENT_CHECKPOINTING", "NUM_DATA_WORKERS", "EVAL_ACCUMULATION_STEPS",
             "SAVE_OPTIMIZER_STATE", "SAMSUM_LOCAL_DIR", "SPIDER_LOCAL_DIR", "GLUE_LOCAL_DIR", "DART_LOCAL_DIR")


def accelerate_config_names() -> list[str]:
    return sorted(p.stem for p in ACCELERATE_CONFIG_DIR.glob("*.yaml"))


def resolve_accelerate_config(value: str) -> Path:
    """A name from configs/accelerate/ (single_gpu, ddp, ...) or a path to a YAML file."""
    if "/" not in value and not value.endswith((".yaml", ".yml")):
        path = ACCELERATE_CONFIG_DIR / f"{value}.yaml"
        if not path.is_file():
            raise ConfigError(f"--accelerate-config: no config named {value!r} (one of {', '.join(accelerate_config_names())}, or a path)")
        return path
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(f"--accelerate-config: no such file: {value}")
    return path


def read_accelerate_config(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"--accelerate-config: {path} is not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict) or "distributed_type" not in data:
        raise ConfigError(f"--accelerate-config: {path} is not an accelerate config (no distributed_type)")
    return data


def lenient_load(config: str, overrides: list[str]) -> tuple[TrainConfig, dict]:
    """(the shared sections checked strictly, {section: {key: value}} of what they do not know,
    passed through unchecked for the script to check when it starts)."""
    raw = apply_overrides(load_raw(config), overrides, TrainConfig)
    known, unknown = {}, {}
    for section, keys in raw.items():
        model = section_class(TrainConfig, section)
        if model is None and section not in TrainConfig.model_fields:
            unknown[section] = keys
        elif model is not None and isinstance(keys, dict):
            known[section] = {k: v for k, v in keys.items() if k in model.model_fields}
            extra = {k: v for k, v in keys.items() if k not in model.model_fields}
            if extra:
                unknown[section] = extra
        else:
            known[section] = keys
    return name_run(validate(known, TrainConfig), config), unknown


def load_for_launch(config: str, overrides: list[str]) -> tuple[TrainConfig, dict, Path, str]:
    """(validated config, keys passed through unchecked, script path, how it was validated)."""
    raw = load_raw(config)
    name = raw.get("script") or DEFAULT_SCRIPT
    if not isinstance(name, str):
        raise ConfigError(f"script: expected str, got {type(name).__name__} {name!r}")
    script = Path(name) if Path(name).is_absolute() else REPO / name
    if not script.is_file():
        raise ConfigError(f"script: no such entry point: {name}")
    config_class = SCRIPT_CONFIGS.get(script.name)
    if config_class is not None:  # as the script itself will read it
        cfg, _ = load_script_config(config, overrides, config_class, script.name)
        return cfg, {}, script, f"checked against {script.name}'s config model"
    cfg, unchecked = lenient_load(config, overrides)
    check_paths(cfg)
    return cfg, unchecked, script, "base sections checked; the script checks the rest"


def run_dir_facts(run_dir: Path) -> dict:
    """What the launcher decides resume and archive on: the latest complete checkpoint, whether the
    run dir holds anything, run.json's status. Read again under the run-dir lock (`lock`)."""
    from trainkit.checkpoints import find_latest_checkpoint
    from trainkit.fileio import read_json
    from trainkit.runlog import RUN_INFO_FILE

    latest = find_latest_checkpoint(run_dir)
    has_data = run_dir.is_dir() and any(run_dir.iterdir())
    status = (read_json(run_dir / RUN_INFO_FILE) or {}).get("status") if has_data else None
    return {"TK_LATEST_CHECKPOINT": str(latest) if latest else "",
            "TK_RUN_DIR_HAS_DATA": "1" if has_data else "",
            "TK_RUN_STATUS": str(status or "")}


def write_shell_facts(path: str, facts: dict) -> None:
    with open(path, "w") as f:
        f.writelines(f"{k}={shlex.quote(v)}\n" for k, v in facts.items())


def relevant_env(environ=None) -> dict:
    environ = os.environ if environ is None else environ
    return {k: v for k, v in sorted(environ.items())
            if (k.startswith(ENV_PREFIXES) or k in ENV_NAMES) and k != "TRAINKIT_EXIT_DIR"}


def cmd_info(args) -> int:
    from trainkit.checkpoints import read_trainer_state

    cfg, unchecked, script, how = load_for_launch(args.config, args.overrides)
    run_dir = cfg.run_dir
    state = run_dir_facts(run_dir)
    latest = Path(state["TK_LATEST_CHECKPOINT"]) if state["TK_LATEST_CHECKPOINT"] else None
    if args.resume_from:
        try:
            read_trainer_state(args.resume_from)
        except FileNotFoundError:
            raise ConfigError(f"--resume-from: {args.resume_from} is not a complete checkpoint directory (no trainer_state.json)")
    acc_path, acc = None, {}
    if args.accelerate_config:
        acc_path = resolve_accelerate_config(args.accelerate_config)
        acc = read_accelerate_config(acc_path)
    status = state["TK_RUN_STATUS"]

    facts = {
        "TK_SCRIPT": str(script.relative_to(REPO) if script.is_relative_to(REPO) else script),
        "TK_RUN_DIR": str(run_dir),
        "TK_OUTPUT_DIR": cfg.paths.output_dir,
        "TK_LOCK_FILE": str(runlock.lock_path(run_dir)),
        **state,
        "TK_ACCELERATE_CONFIG": str(acc_path or ""),
        "TK_ACCELERATE_DISTRIBUTED_TYPE": str(acc.get("distributed_type", "")),
        "TK_ACCELERATE_USE_CPU": "1" if acc.get("use_cpu") else "",
    }
    if args.shell_file:
        write_shell_facts(args.shell_file, facts)

    step = ""
    if latest:
        try:
            step = f" (step {read_trainer_state(latest)['step']})"
        except FileNotFoundError:
            pass
    print(f"config:      {args.config} ({how})")
    print(f"script:      {script.relative_to(REPO) if script.is_relative_to(REPO) else script}")
    print(f"run dir:     {run_dir}" + (f" (status: {status})" if status else ""))
    print(f"checkpoint:  {latest}{step}" if latest else "checkpoint:  none")
    if acc_path:
        print(f"accelerate:  {acc_path} (distributed_type {acc.get('distributed_type')})")
    if args.print_config:
        print("environment (secrets redacted):")
        for k, v in redact(relevant_env()).items():
            print(f"  {k}={v}")
        print("validated config (secrets redacted):")
        shown = public_config(cfg)
        for section, keys in redact(unchecked).items():
            shown[section] = {**shown[section], **keys} if isinstance(shown.get(section), dict) else keys
        text = yaml.safe_dump(shown, sort_keys=False, default_flow_style=False, width=100)
        print("".join(f"  {line}\n" for line in text.splitlines()), end="")
    return 0


def cmd_lock(args) -> int:
    """Lock RUN_DIR on the launcher's descriptor --fd for --holder-pid (or, with --probe, only check
    that no one else holds it), then write the run-dir facts read under the lock to --shell-file.
    When another process holds it: the one-line reason on stdout (the launcher prints it), exit 2."""
    run_dir = Path(args.run_dir)
    try:
        if args.probe:
            runlock.probe(run_dir)
        else:
            runlock.lock_fd(args.fd, run_dir, args.holder_pid, "launch_training.sh")
    except runlock.RunDirInUse as e:
        print(e)
        return 2
    if args.shell_file:
        write_shell_facts(args.shell_file, run_dir_facts(run_dir))
    return 0


def cmd_archive(args) -> int:
    target = archive_run_dir(args.run_dir)
    if target is not None:
        print(target)
    return 0


def redact_args(argv: list[str]) -> list[str]:
    out = []
    for arg in argv:
        name, sep, _ = arg.partition("=")
        if sep and not name.startswith("-") and is_secret_name(name.rsplit(".", 1)[-1]):
            arg = f"{name}={REDACTED}"
        out.append(arg)
    return out


def cmd_show_command(args) -> int:
    print(shlex.join(redact_args(args.argv)))
    return 0


def _write_rank_file(prefix: str, value: int) -> None:
    """Under launch_training.sh: $TRAINKIT_EXIT_DIR/<prefix><RANK> holds `value` (best effort)."""
    exit_dir = os.environ.get("TRAINKIT_EXIT_DIR")
    if not exit_dir:
        return
    try:
        with open(os.path.join(exit_dir, f"{prefix}{os.environ.get('RANK', '0')}"), "w") as f:
            f.write(f"{value}\n")
    except OSError:
        pass


def record_exit_code(code: int) -> None:
    """Under launch_training.sh: this rank's exit code, for the launcher to exit with."""
    _write_rank_file("rank-", code)


def exit_towards_parent(code: int) -> int:
    """The code a trainer exits with towards accelerate. A run preempted by SIGTERM/SIGINT exits 0
    under launch_training.sh (its real code is recorded in $TRAINKIT_EXIT_DIR), so torchrun does not
    print its failure report over a clean stop; the launcher exits with the recorded code."""
    from trainkit.preemption import PREEMPTED_EXIT_CODES

    return 0 if os.environ.get("TRAINKIT_EXIT_DIR") and code in PREEMPTED_EXIT_CODES else code


def record_pid() -> None:
    """Under launch_training.sh: $TRAINKIT_EXIT_DIR/pid-<RANK> holds this trainer's pid, so the launcher
    can deliver SIGTERM/SIGINT to the trainers themselves rather than to accelerate or torchrun."""
    _write_rank_file("pid-", os.getpid())


def ranks_without_exit_code(exit_dir: Path) -> dict[int, int]:
    """{rank: pid} of the trainers that recorded a pid (pid-<RANK>, at start) but no exit code
    (rank-<RANK>, written on every way out that runs Python): they were killed by a signal no
    process can catch (SIGKILL, the OOM killer) or crashed hard (a segfault)."""
    lost = {}
    for pid_file in exit_dir.glob("pid-*"):
        rank = pid_file.name.removeprefix("pid-")
        if rank.isdigit() and not (exit_dir / f"rank-{rank}").is_file():
            try:
                lost[int(rank)] = int(pid_file.read_text().strip())
            except (OSError, ValueError):
                lost[int(rank)] = 0
    return dict(sorted(lost.items()))


def last_logged_step(run_dir: Path) -> int:
    """The step of the latest training log line or event (the current attempt's lines come last)."""
    from trainkit.fileio import iter_jsonl
    from trainkit.runlog import LOGS_DIR, STREAMS

    step = 0
    for stream in ("training", "events"):
        path = run_dir / LOGS_DIR / STREAMS[stream]
        last = None
        if path.is_file():
            for last in iter_jsonl(path):
                pass
        if isinstance(last, dict) and isinstance(last.get("step"), int):
            step = max(step, last["step"])
    return step


def cmd_record_end(args) -> int:
    """Record what the trainers could not: ranks that died without an exit code, and a run.json
    left `running` (rank 0 itself was killed). Prints the launcher's exit code on stdout."""
    import socket
    import time

    from trainkit.fileio import read_json
    from trainkit.preemption import PREEMPTED_EXIT_CODES
    from trainkit.runlog import RUN_INFO_FILE, RunLog

    run_dir = Path(args.run_dir)
    lost = ranks_without_exit_code(Path(args.exit_dir))
    code = args.exit_code
    if lost and (code == 0 or code in PREEMPTED_EXIT_CODES):
        code = 1  # a rank died: a failure, whatever the others recorded while torchrun stopped them
    info = {} if args.report_only else (read_json(run_dir / RUN_INFO_FILE) or {})
    status = info.get("status")
    # `preempted` with a dead rank: torchrun's SIGTERM to the survivors, not a scheduler's stop.
    stale = (status == "running" and code != 0) or (lost and status == "preempted")
    if lost:
        which = ", ".join(f"{rank} (pid {pid})" for rank, pid in lost.items())
        message = (f"rank{'s' if len(lost) > 1 else ''} {which} on {socket.gethostname()} ended without an exit code "
                   f"of {'their' if len(lost) > 1 else 'its'} own: killed by a signal (SIGKILL, the OOM killer) or a "
                   f"hard crash; torchrun stopped the other ranks and launch_training.sh exited with code {code}")
    elif stale:
        message = (f"the training processes ended (accelerate launch exit code {code}) and left run.json "
                   "saying running: no rank recorded how the run ended")
    else:
        print(code)
        return 0
    recorded = ""
    if not args.report_only and run_dir.is_dir():
        runlog, step = RunLog(run_dir), last_logged_step(run_dir)
        runlog.error(step, "RankDied" if lost else "RunEnded", message, fatal=status != "finished",
                     ranks=list(lost), exit_code=code)
        if stale:
            runlog.event(step, "stop", f"run failed: {message}", reason="failed")
            runlog.update_run_info(status="failed", end_time=time.time(), exit_code=code, error=message)
        recorded = f" (recorded in {runlog.path('errors')})"
    print(f"launch_training.sh: {message}{recorded}", file=sys.stderr)
    print(code)
    return 0


def cmd_exec(argv: list[str]) -> int:
    """Run a script as __main__ and record its exit code (and pid) for the launcher."""
    from trainkit.cli import exit_code_for_exception
    from trainkit.preemption import PREEMPTION, Preempted

    if not argv:
        print("usage: python -m trainkit.launcher exec SCRIPT [ARGS...]", file=sys.stderr)
        return 2
    PREEMPTION.install()  # before the script's imports: a signal while they run ends it with one line
    record_pid()
    script = os.path.abspath(argv[0])
    sys.argv = [argv[0], *argv[1:]]
    sys.path[0] = os.path.dirname(script)  # as `python SCRIPT` would
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except BaseException as e:
        code = exit_code_for_exception(e)  # the code run_main exits with, recorded for the launcher
        if isinstance(e, Preempted):  # a signal before the script's own handling started
            e.report()
        elif isinstance(e, SystemExit):
            if e.code is not None and not isinstance(e.code, int):
                print(e.code, file=sys.stderr)  # what SystemExit("message") prints
        else:
            raise
    finally:
        record_exit_code(code)
    return exit_towards_parent(code)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["exec"]:
        return cmd_exec(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m trainkit.launcher", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="validate a config and print what a launch would do")
    p.add_argument("--config", default="training_config.yaml")
    p.add_argument("--accelerate-config")
    p.add_argument("--resume-from")
    p.add_argument("--shell-file")
    p.add_argument("--print-config", action="store_true", help="also print the environment and the config (redacted)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    p = sub.add_parser("lock", help="lock a run directory on the launcher's descriptor (one writer per run dir)")
    p.add_argument("run_dir")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--fd", type=int, help="the open lock file descriptor the launcher's shell keeps")
    mode.add_argument("--probe", action="store_true", help="only check that no other process holds the lock")
    p.add_argument("--holder-pid", type=int, default=os.getppid(), help="the pid recorded as holder (default: parent)")
    p.add_argument("--shell-file")
    p = sub.add_parser("archive", help="move a run directory aside to RUN_DIR.old-<timestamp>")
    p.add_argument("run_dir")
    p = sub.add_parser("show-command", help="print a command with secret-looking key=value arguments redacted")
    p.add_argument("argv", nargs=argparse.REMAINDER)
    sub.add_parser("exec", help="run SCRIPT ARGS... as __main__, recording its exit code")
    p = sub.add_parser("record-end", help="after the trainers ended: record ranks that died without an exit code")
    p.add_argument("run_dir")
    p.add_argument("--exit-dir", required=True, help="the launcher's $TRAINKIT_EXIT_DIR")
    p.add_argument("--exit-code", type=int, required=True, help="the exit code the launcher has so far")
    p.add_argument("--report-only", action="store_true", help="print the line, write nothing (machines other than 0)")
    args = parser.parse_args(argv)
    if args.command == "show-command" and args.argv[:1] == ["--"]:
        args.argv = args.argv[1:]
    try:
        return {"info": cmd_info, "lock": cmd_lock, "archive": cmd_archive, "show-command": cmd_show_command,
                "record-end": cmd_record_end}[args.command](args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

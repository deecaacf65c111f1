"""Command line shared by the entry points: `--config FILE [--resume | --resume_from PATH] key=value ...`."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from trainkit.config import ConfigError
from trainkit.runlock import RunDirInUse
from trainkit.runlog import RunWriteError


def build_parser(description: str, default_config: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description,
        epilog="Overrides: any number of section.key=value, e.g. training.max_steps=50 optimization.learning_rate=1e-4",
    )
    parser.add_argument("--config", default=default_config, help=f"YAML config (default: {default_config})")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="resume from the latest checkpoint-* of the run")
    group.add_argument("--resume_from", metavar="PATH", help="resume from this checkpoint directory")
    parser.add_argument("--allow_config_change", "--allow-config-change", action="store_true",
                        help="resume even when keys that cannot change on resume (model, adapter shape, data, seed, "
                             "sequence length, batch and accumulation, ...) differ from the checkpoint's config")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    return parser


def exit_code_for_exception(exc: BaseException) -> int:
    """The exit code run_main ends with for an exception (recorded in run.json as exit_code)."""
    from trainkit.preemption import Preempted

    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    if isinstance(exc, (ConfigError, RunDirInUse)):
        return 2
    if isinstance(exc, Preempted):
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return 130
    return 1


def one_line(exc: BaseException, limit: int = 300) -> str:
    """The exception as one line (messages of ConfigError stay one line), capped in length."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def one_line_message(exc: BaseException) -> str:
    """What run_main prints, alone, for the errors it ends a run on without a traceback."""
    if isinstance(exc, ConfigError):
        return f"config error: {exc}"
    if isinstance(exc, RunDirInUse):
        return f"error: {exc}"
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    return str(exc)  # RunWriteError: already one line naming what and where


def run_main(main: Callable[[], int | None]) -> None:
    """Run `main`; a ConfigError, or a run directory another process holds, becomes one line on
    stderr and exit code 2; a file of the run that could not be written (disk full, permission) one
    line and exit code 1; a stop signal before the training loop one line and 128 + signal
    (trainkit.preemption); no traceback."""
    from trainkit.preemption import Preempted

    try:
        code = main()
    except (ConfigError, RunDirInUse, RunWriteError, Preempted, KeyboardInterrupt) as e:
        if isinstance(e, Preempted):
            e.report()
        else:
            print(one_line_message(e), file=sys.stderr)
        sys.exit(exit_code_for_exception(e))
    sys.exit(code or 0)

"""Command line shared by the entry points: `--config FILE [--resume | --resume_from PATH] key=value ...`."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from trainkit.config import ConfigError
from trainkit.runlock import RunDirInUse


def build_parser(description: str, default_config: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description,
        epilog="Overrides: any number of section.key=value, e.g. training.max_steps=50 optimization.learning_rate=1e-4",
    )
    parser.add_argument("--config", default=default_config, help=f"YAML config (default: {default_config})")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="resume from the latest checkpoint-* of the run")
    group.add_argument("--resume_from", metavar="PATH", help="resume from this checkpoint directory")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    return parser


def run_main(main: Callable[[], int | None]) -> None:
    """Run `main`; a ConfigError, or a run directory another process holds, becomes one line on
    stderr and exit code 2, no traceback."""
    try:
        code = main()
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    except RunDirInUse as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)

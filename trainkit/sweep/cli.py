"""Sweeps: run every (config, dataset, seed) combination on one node, or as a SLURM job array.

The command line of `python -m trainkit.sweep run | status | slurm` (see trainkit/sweep/__init__.py
for the usage and the modules). Errors in the selection (missing config or script, bad --gpu-plan,
plan length neither 1 nor the number of GPUs, nothing to run, ...) print one line
`sweep: error: ...` and exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from trainkit.sweep.plan import (DEFAULT_SCRIPT, SweepError, build_plan, detect_gpus, format_plan, plan_states,
                                 split_list)
from trainkit.sweep.scheduler import Scheduler, detach, scheduler_alive
from trainkit.sweep.slurm import cmd_slurm
from trainkit.sweep.status import cmd_status


def cmd_run(args) -> int:
    plan = build_plan(args)
    states = plan_states(plan)
    if not args.quiet_plan:
        print(format_plan(plan, states), flush=True)
    if not any(s in ("todo", "resume") for s, _ in states):
        raise SweepError(f"nothing to run: all {len(plan.jobs)} runs are finished or running elsewhere")
    if args.dry_run:
        print("dry run: nothing started")
        return 0
    live = scheduler_alive(plan.sweep_dir)
    if live is not None and live != os.getpid():
        raise SweepError(f"a scheduler (pid {live}) is already running {plan.sweep_dir}: "
                         f"see python -m trainkit.sweep status --sweep-dir {plan.sweep_dir}")
    if args.foreground:
        return Scheduler(plan, states, args.poll_interval, args.grace, detached=args.detached_child).run()
    return detach(args, plan)


def _add_selection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--configs", nargs="+", required=True, metavar="YAML", help="config files")
    p.add_argument("--seeds", nargs="+", type=int, required=True, metavar="S", help="training.seed values")
    p.add_argument("--datasets", nargs="+", required=True, metavar="TASK", help="task.name values (sst2, mrpc, ...)")
    p.add_argument("--sweep-dir", help="where state.json, sweep.log and the job logs go (default: sweeps/sweep-<time>)")
    p.add_argument("--output-dir", default="outputs", help="paths.output_dir of every job (default: outputs)")
    p.add_argument("--script", default=DEFAULT_SCRIPT, help=f"training script (default: {DEFAULT_SCRIPT})")
    p.add_argument("--python", default=None,
                   help="command that runs the script (default: this Python; e.g. 'accelerate launch --num_processes 2')")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainkit.sweep",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Extra overrides for every job go after --, e.g. -- training.max_steps=500")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the sweep on this node (detached unless --foreground)")
    _add_selection(run)
    run.add_argument("--gpus", nargs="*", default=None, metavar="IDS",
                     help='GPU ids, e.g. "0 1 3"; "" for CPU (default: CUDA_VISIBLE_DEVICES or nvidia-smi)')
    run.add_argument("--gpu-plan", default=None, help='concurrent jobs per GPU, e.g. "2,2,1" or "2" (default 1)')
    run.add_argument("--cpu-slots", type=int, default=1, help="concurrent jobs without GPUs (default 1)")
    run.add_argument("--dry-run", action="store_true", help="print the plan only")
    run.add_argument("--foreground", action="store_true", help="run the scheduler in this process")
    run.add_argument("--poll-interval", type=float, default=1.0, help="seconds between polls (default 1)")
    run.add_argument("--grace", type=float, default=30.0, help="seconds between SIGTERM and SIGKILL on stop (default 30)")
    run.add_argument("--detached-child", action="store_true", help=argparse.SUPPRESS)
    run.add_argument("--quiet-plan", action="store_true", help=argparse.SUPPRESS)
    status = sub.add_parser("status", help="show the jobs of a sweep")
    status.add_argument("--sweep-dir", help="default: the newest sweeps/*/state.json")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    slurm = sub.add_parser("slurm", help="write a SLURM job-array script instead of running")
    _add_selection(slurm)
    slurm.add_argument("--partition", required=True)
    slurm.add_argument("--gpus-per-job", type=int, default=1)
    slurm.add_argument("--time", default="04:00:00", help="per-task time limit (default 04:00:00)")
    slurm.add_argument("--max-concurrent", type=int, default=None, help="at most this many tasks at once (%%M)")
    slurm.add_argument("--cpus-per-task", type=int, default=None)
    slurm.add_argument("--mem", default=None)
    slurm.add_argument("--account", default=None)
    slurm.add_argument("--job-name", default=None, help="default: the sweep dir's name")
    slurm.add_argument("--out", default=None, help="script path (default: <sweep dir>/sweep.sbatch)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    args.extra = extra
    try:
        if args.command == "status":
            if extra:
                raise SweepError("status takes no overrides")
            return cmd_status(args)
        if args.command == "run":
            args.gpus = detect_gpus() if args.gpus is None else [g for t in args.gpus for g in split_list(t)]
        else:
            args.gpus = []
        if args.command == "slurm" and args.gpus_per_job < 0:
            raise SweepError("--gpus-per-job must be >= 0")
        if args.command == "slurm" and args.max_concurrent is not None and args.max_concurrent < 1:
            raise SweepError("--max-concurrent must be >= 1")
        return cmd_run(args) if args.command == "run" else cmd_slurm(args)
    except SweepError as e:
        print(f"sweep: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

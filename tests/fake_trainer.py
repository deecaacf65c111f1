"""A stub trainer for the sweep and aggregate tests: the CLI and run directory of a real one, no torch.

    python tests/fake_trainer.py --config C.yaml [--resume | --resume_from PATH] \\
        task.name=mrpc training.seed=1 paths.run_name=a__mrpc__seed1 paths.output_dir=outputs \\
        [training.max_steps=6] [fake.step_sleep=0.1] [fake.fail_at_step=3] [fake.fail_once=true] ...

It writes <output_dir>/<run_name>/ like train_lora.py: run.json (status running -> finished |
failed), logs/training_log.jsonl (every step), logs/eval_log.jsonl (every `fake.eval_every`
steps: eval_loss, the task's official metrics from trainkit.tasks.official, task_score via
selection_score), logs/events.jsonl, and checkpoint-<step>/trainer_state.json every
`fake.save_every` steps (atomic). Without --resume an existing run directory is archived
(<run>.old-<time>), as the real trainers do; --resume without a complete checkpoint is an error
(exit 2).

Like the real scripts it first locks the run directory (trainkit.runlock.acquire: exit 2 with one
line when another process holds it; the lock of the launcher that started it is accepted).

Knobs (config section `fake`, overridable as fake.key=value; the environment variables win):
    step_sleep    seconds per step (FAKE_TRAINER_STEP_SLEEP)                      default 0
    fail_at_step  exit 1 with status failed after this step (FAKE_TRAINER_FAIL_AT;    default none
                  FAKE_TRAINER_FAIL_RUNS="run_a=3,run_b=1" picks the failing runs by name)
    fail_once     fail only when not resumed                                       default true
    eval_every / save_every                                                        default 2 / 2
    peak_step     step where task_score peaks (eval_loss keeps falling)            default max_steps // 2
    test_split    also write a split "test" line for the best step at the end       default false
    hold_file     after the last step, wait until this file exists (a test releases   default none
                  the run when it has looked at it running; FAKE_TRAINER_HOLD_FILE)
    start_hold_file  after taking the run directory (lock, archive, logs/) and before    default none
                  run.json, wait until this file exists: a run still loading its data and model
                  (FAKE_TRAINER_START_HOLD_FILE)

run.json gets extra fields for the tests: cuda_visible_devices (this process's
CUDA_VISIBLE_DEVICES, null when unset), argv, and attempts: one {start, end, resume,
cuda_visible_devices, exit} per start.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainkit.checkpoints import archive_run_dir, atomic_directory, find_latest_checkpoint, read_trainer_state  # noqa: E402
from trainkit.cli import build_parser  # noqa: E402
from trainkit.config import ConfigError, load_raw, parse_override  # noqa: E402
from trainkit.runlock import RunDirInUse  # noqa: E402
from trainkit.runlock import acquire as acquire_run_lock  # noqa: E402
from trainkit.fileio import iter_jsonl, read_json  # noqa: E402
from trainkit.runlog import RUN_INFO_FILE, RunLog  # noqa: E402
from trainkit.tasks.official import TASK_SCORE, official_metrics, selection_score  # noqa: E402


class Terminated(Exception):
    pass


def _on_term(signum, frame):
    raise Terminated(signal.Signals(signum).name)


def fake_metrics(task: str, seed: int, step: int, peak: int) -> dict:
    """Deterministic official metrics that peak at `peak` and differ by seed."""
    out = {}
    for k, name in enumerate(official_metrics(task)):
        out[name] = round(70.0 + 0.5 * seed + 2.0 * k - 1.5 * abs(step - peak), 4)
    return out


def main() -> int:
    args = build_parser("fake trainer", "config.yaml").parse_args()
    try:
        raw = load_raw(args.config)
        for text in args.overrides:
            (section, key), value = parse_override(text)
            raw.setdefault(section, {})[key] = value
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    paths, train, task_cfg, fake = (raw.setdefault(s, {}) for s in ("paths", "training", "task", "fake"))
    run_dir = Path(paths.get("output_dir") or "outputs") / (paths.get("run_name") or Path(args.config).stem)
    task = task_cfg.get("name") or "sst2"
    seed = int(train.get("seed", 0))
    total = int(train.get("max_steps") or 6)
    sleep = float(os.environ.get("FAKE_TRAINER_STEP_SLEEP", fake.get("step_sleep") or 0))
    fail_at = os.environ.get("FAKE_TRAINER_FAIL_AT", fake.get("fail_at_step"))
    fail_at = int(fail_at) if fail_at not in (None, "") else None
    for item in filter(None, os.environ.get("FAKE_TRAINER_FAIL_RUNS", "").split(",")):
        name, _, at = item.partition("=")  # RUN_NAME=STEP: only that run fails
        if name == (paths.get("run_name") or Path(args.config).stem):
            fail_at = int(at)
    fail_once = bool(fake.get("fail_once", True))
    eval_every, save_every = int(fake.get("eval_every", 2)), int(fake.get("save_every", 2))
    peak = int(fake.get("peak_step", max(1, total // 2)))
    hold = os.environ.get("FAKE_TRAINER_HOLD_FILE", fake.get("hold_file"))
    start_hold = os.environ.get("FAKE_TRAINER_START_HOLD_FILE", fake.get("start_hold_file"))

    try:
        acquire_run_lock(run_dir)  # as trainkit.training_run.TrainingRun does: before anything is read, written or moved
    except RunDirInUse as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    resume_from = None
    if args.resume or args.resume_from:
        resume_from = Path(args.resume_from) if args.resume_from else find_latest_checkpoint(run_dir)
        if resume_from is None:
            print(f"config error: --resume: no complete checkpoint-* in {run_dir}", file=sys.stderr)
            return 2
    elif run_dir.exists() and any(run_dir.iterdir()):
        print(f"{run_dir} held an earlier run without --resume: moved it to {archive_run_dir(run_dir)}")

    signal.signal(signal.SIGTERM, _on_term)
    log = RunLog(run_dir)
    while start_hold and not Path(start_hold).exists():  # "loading data and model"
        time.sleep(0.02)
    start = time.time()
    info = read_json(run_dir / RUN_INFO_FILE, default={}) or {}
    attempts = list(info.get("attempts") or [])
    attempt = {"start": start, "end": None, "resume": resume_from is not None,
               "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "exit": None}
    attempts.append(attempt)
    step = 0
    if resume_from is not None:
        step = int(read_trainer_state(resume_from)["step"])
        log.truncate_after(step)
        log.event(step, "resume", f"resumed from {resume_from}", path=str(resume_from))
    else:
        log.event(0, "start", "fake run started", total_steps=total, world_size=1)
    log.update_run_info(run_name=run_dir.name, script="fake_trainer.py", status="running",
                        start_time=info.get("start_time", start) if resume_from else start, last_start_time=start,
                        end_time=None, total_steps=total, world_size=1, num_machines=1, pid=os.getpid(),
                        resumed_from=str(resume_from) if resume_from else None, config=raw, task=task,
                        cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"), argv=sys.argv[1:],
                        attempts=attempts, error=None)
    print(f"fake trainer: {run_dir} task {task} seed {seed} steps {step}->{total} "
          f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}", flush=True)
    best = (None, None)
    for rec in iter_jsonl(log.path("eval")):  # evaluations kept from before a resume
        if rec.get(TASK_SCORE) is not None and (best[0] is None or rec[TASK_SCORE] > best[0]):
            best = (rec[TASK_SCORE], rec["step"])
    try:
        while step < total:
            time.sleep(sleep)
            step += 1
            log.write("training", {"step": step, "loss": 2.0 / step, "lr": 1e-4, "total_steps": total,
                                   "epoch": step / total})
            if step % eval_every == 0 or step == total:
                metrics = fake_metrics(task, seed, step, peak)
                score = selection_score(task, metrics)
                is_best = best[0] is None or score > best[0]
                if is_best:
                    best = (score, step)
                log.write("eval", {"step": step, "eval_loss": round(2.0 - 0.1 * step, 4), "task": task,
                                   "split": "validation", **metrics, TASK_SCORE: score, "metric": TASK_SCORE,
                                   "metric_value": score, "is_best": is_best})
            if step % save_every == 0 or step == total:
                with atomic_directory(run_dir / f"checkpoint-{step}") as tmp:
                    (tmp / "trainer_state.json").write_text(f'{{"step": {step}}}\n')
            if fail_at is not None and step == fail_at and not (fail_once and resume_from is not None):
                raise RuntimeError(f"fake failure at step {step}")
        while hold and not Path(hold).exists():
            time.sleep(0.02)
        if fake.get("test_split") and best[1] is not None:
            metrics = fake_metrics(task, seed + 1, best[1], peak)
            log.write("eval", {"step": step, "task": task, "split": "test", "evaluated_step": best[1], **metrics,
                               TASK_SCORE: selection_score(task, metrics), "metric": TASK_SCORE,
                               "metric_value": None, "is_best": False})
    except (Exception, Terminated) as e:
        code = 143 if isinstance(e, Terminated) else 1
        attempt.update(end=time.time(), exit=code)
        log.error(step, type(e).__name__, str(e), traceback.format_exc(), fatal=True)
        log.event(step, "stop", f"failed: {e}", reason="failed")
        log.update_run_info(status="failed", end_time=time.time(), error=str(e), attempts=attempts)
        print(f"fake trainer failed: {e}", file=sys.stderr, flush=True)
        return code
    attempt.update(end=time.time(), exit=0)
    log.event(step, "stop", "finished", reason="finished")
    log.update_run_info(status="finished", end_time=time.time(), attempts=attempts)
    print("fake trainer: finished", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The lifecycle of one training run, shared by train_qlora.py, train_lora.py and distill.py.

    with TrainingRun(accelerator, cfg, "train_qlora.py", resume_from) as run:
        ...build data, model, optimizer, scheduler...
        run.make_checkpointer(save_weights, load_weights, trainable_params)
        run.resume(state, scheduler)                        # restores state when resume_from is set
        run.begin(state, total_steps, model=..., data=...)  # run.json, start event, trackers, progress bar
        while ...:                                          # the script's own loop
            ...forward, backward...
            sums, stop_requested = run.reduce_step(local_values)
            result = run.end_step(state, optimizer, scheduler, params, loss, tokens, seconds, stop_requested, ...)
            ...log (run.write_training), evaluate (run.record_evaluation), checkpoint (run.save_checkpoint)...
            if run.should_stop(result): break
        if result.stop_reason == "finished":
            run.save_final(state, evaluate)
        return run.finish(state, result.stop_reason)

Entering locks and prepares the run directory (trainkit.runlock) and starts watching for stop
signals (trainkit.preemption); an exception that leaves the block is recorded (error_log.jsonl,
a stop event, status failed in run.json) and re-raised. The loop itself stays in each script.
"""

from __future__ import annotations

import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from trainkit.checkpoints import archive_run_dir, final_checkpoint_dir, remove_partial_saves
from trainkit import runlock
from trainkit.config import ConfigError, public_config
from trainkit.loop import (Checkpointer, is_better, is_sharded, optimizer_step, register_weight_hooks,
                           resume_training_state)
from trainkit.runlog import CHECKPOINT_PREFIX, TRAINER_STATE_FILE, RunLog, RunWriteError
from trainkit.train_state import TrainState


@dataclass
class StepResult:
    """What one optimizer step left behind for logging and for the loop's exit."""

    step: int
    grad_norm: float | None
    lr: float
    stop_reason: str  # "finished" (go on), "nan_limit" or "preempted" (checkpoint this step, then stop)


class TrainingRun:
    def __init__(self, accelerator, cfg, script: str, resume_from: Path | None):
        self.accelerator, self.cfg, self.script, self.resume_from = accelerator, cfg, script, resume_from
        self.run_dir = cfg.run_dir
        self.is_main = accelerator.is_main_process
        self.log_cfg = cfg.logging
        self.state: TrainState | None = None   # set by resume()/begin(); the failure record reads its step
        self.checkpointer = None               # make_checkpointer()
        self.load_weights = None               # make_checkpointer(); resume() loads through it
        self.total_steps = 0
        self.progress = None

    def say(self, message: str) -> None:
        self.accelerator.print(f"[{Path(self.script).stem}] {message}")

    # ------------------------------------------------------------ start and end of the block
    def __enter__(self) -> "TrainingRun":
        from trainkit.preemption import PREEMPTION

        check_same_start(self.accelerator, self.resume_from)  # before the run dir is locked, moved or written
        if self.is_main:
            runlock.acquire(self.run_dir)  # before anything in the run dir is written or moved
            if self.resume_from is None and self.run_dir.exists() and any(self.run_dir.iterdir()):
                archived = archive_run_dir(self.run_dir)  # a fresh start never overwrites an earlier attempt
                self.say(f"{self.run_dir} held an earlier run without --resume: moved it to {archived}")
            self.run_dir.mkdir(parents=True, exist_ok=True)
            remove_partial_saves(self.run_dir)  # half-written checkpoints of a killed run
        self.accelerator.wait_for_everyone()
        self.runlog = RunLog(self.run_dir, self.is_main)
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not is_sharded(self.accelerator):
            # accelerate turns an FSDP config on CPU processes into plain data parallelism without a word
            self.say(f"warning: the accelerate config asks for FSDP, but accelerate runs FSDP on GPUs only: these "
                     f"{self.accelerator.num_processes} process(es) run {self.accelerator.distributed_type.value} "
                     "(every process holds the whole model)")
        # SIGTERM/SIGINT from here on are recorded as `preempted`; the loop reads the flag once armed.
        self.preemption = PREEMPTION.watch(self.runlog, self.cfg.training.preemption_grace_seconds,
                                           lambda: self.step)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is not None:
            self.record_failure(exc)
        return False  # re-raise: trainkit.cli.run_main turns it into one line and an exit code

    @property
    def step(self) -> int:
        return self.state.step if self.state is not None else 0

    def record_failure(self, exc: BaseException) -> None:
        """Fatal error: traceback to error_log.jsonl, a stop event, status failed and the exit code in
        run.json. A stop signal before the loop is recorded as preempted instead. A clean SystemExit
        (code 0 or None) is not a failure and records nothing."""
        from trainkit.cli import exit_code_for_exception
        from trainkit.preemption import PREEMPTION, Preempted

        if isinstance(exc, SystemExit) and not exc.code:
            return
        PREEMPTION.settle()
        step, runlog = self.step, self.runlog
        if isinstance(exc, Preempted):
            PREEMPTION.record(runlog, step, checkpoint=None, detail="stopped before the training loop")
            return
        if isinstance(exc, RunWriteError):
            message = str(exc)  # already one line naming what and where
        else:
            message = f"{type(exc).__name__}: {exc}".splitlines()[0] if str(exc) else type(exc).__name__
        # run.json first: its status is what readers trust, and after a write failure (full disk) the
        # later records may not fit. Each record is best effort: the error itself is what gets raised.
        records = (lambda: runlog.update_run_info(status="failed", end_time=time.time(), error=message,
                                                  exit_code=exit_code_for_exception(exc)),
                   lambda: runlog.error(step, type(exc).__name__, message, traceback=traceback.format_exc(), fatal=True),
                   lambda: runlog.event(step, "stop", f"run failed: {message}", reason="failed"))
        for record in records:
            try:
                record()
            except OSError:
                pass

    # ------------------------------------------------------------ before the loop
    def make_checkpointer(self, save_weights, load_weights, params_to_check, model=None, optimizer=None,
                          saved_module=None):
        """The run's Checkpointer (trainkit.loop): checkpoints hold the model as `save_weights(dir)`
        writes it (an adapter, a student) besides accelerate's optimizer/scheduler/RNG state, and
        load back through `load_weights(dir)` (trainkit.loop.register_weight_hooks). `model`, `optimizer`:
        the prepared ones, whose shards an FSDP checkpoint gathers: the trainable weights, or every weight
        of `saved_module` (a submodule of model: distill's student)."""
        register_weight_hooks(self.accelerator, load_weights)
        self.load_weights = load_weights
        self.checkpointer = Checkpointer(self.accelerator, self.run_dir, self.runlog, self.log_cfg,
                                         self.cfg.memory.save_optimizer_state, save_weights,
                                         params_to_check=params_to_check, run_config=self.cfg,
                                         model=model, optimizer=optimizer, saved_module=saved_module)
        return self.checkpointer

    def resume(self, state: TrainState, scheduler) -> None:
        """With resume_from: restore optimizer/scheduler/RNG/model state and `state` from the checkpoint
        (trainkit.loop.resume_training_state; a checkpoint without optimizer state loads the weights only)."""
        self.state = state
        if self.resume_from is not None:
            resume_training_state(self.accelerator, self.resume_from, state, self.runlog, self.load_weights,
                                  self.say, self.checkpointer, scheduler)

    def begin(self, state: TrainState, total_steps: int, start_message: str | None = None, progress_desc: str = "train",
              **run_info) -> None:
        """run.json at (re)start, the start event of a fresh run, trackers, progress bar; stop signals
        from here on end the loop after the current optimizer step."""
        from tqdm.auto import tqdm

        from trainkit.patches import applied
        from trainkit.runtime import library_versions

        acc, cfg, public = self.accelerator, self.cfg, public_config(self.cfg)
        self.state, self.total_steps = state, total_steps
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", acc.num_processes))
        info = dict(script=self.script, status="running", last_start_time=time.time(), end_time=None,
                    total_steps=total_steps, world_size=acc.num_processes,
                    num_machines=max(1, acc.num_processes // max(local_world, 1)),
                    distributed_type=acc.distributed_type.value, mixed_precision=acc.mixed_precision, pid=os.getpid(), versions=library_versions(),
                    patches=applied(), config=public, config_path=cfg.config_path, error=None,
                    exit_code=None, resumed_from=str(self.resume_from) if self.resume_from else None, **run_info)
        if self.resume_from is None:
            info["start_time"] = time.time()
        self.runlog.update_run_info(**info)
        if self.resume_from is None:
            what = start_message or f"training {total_steps} steps"
            self.runlog.event(0, "start", f"{what} on {acc.num_processes} process(es)",
                              total_steps=total_steps, world_size=acc.num_processes)
        acc.init_trackers(cfg.paths.run_name, config=tracker_config(public))
        self.progress = tqdm(total=total_steps, initial=state.step, disable=not (self.is_main and self.log_cfg.progress_bar),
                             desc=progress_desc, unit="step", dynamic_ncols=True)
        self.preemption.arm()

    # ------------------------------------------------------------ each optimizer step
    def reduce_step(self, values: list) -> tuple[list[float], bool]:
        """One all-reduce and one host sync per optimizer step: the sums over processes of the step's
        `values` (0-d tensors on the device) and of the stop-signal flags, so that every rank agrees on
        stopping after the same step. Returns (sums, stop requested)."""
        import torch

        local = torch.stack([*values, self.preemption.flag(self.accelerator.device)])
        *sums, stop_votes = self.accelerator.reduce(local, "sum").tolist()
        return sums, bool(stop_votes)

    def end_step(self, state: TrainState, optimizer, scheduler, params, step_loss: float, tokens: int,
                 seconds: float, stop_requested: bool, **interval_values: float) -> StepResult:
        """Clip and step (skipped when the loss or gradients are not finite: error line, nan_skip event),
        advance `state`, the interval and the progress bar; decide whether the loop stops here."""
        finite, grad_norm, lr = optimizer_step(self.accelerator, optimizer, scheduler, params,
                                               self.cfg.optimization.max_grad_norm, step_loss)
        state.nonfinite_streak = 0 if finite else state.nonfinite_streak + 1
        state.step += 1
        state.tokens_seen += tokens
        self.progress.update(1)
        state.interval.add(finite, tokens, seconds, loss=step_loss, **interval_values)
        stop_reason = "finished"
        if not finite:
            message = (f"non-finite loss ({step_loss}) or gradient norm ({grad_norm}) at step {state.step}: "
                       f"optimizer step skipped ({state.nonfinite_streak} in a row)")
            self.runlog.error(state.step, "NonFiniteLoss", message)
            self.runlog.event(state.step, "nan_skip", message, consecutive=state.nonfinite_streak)
            self.say(message)
            if state.nonfinite_streak >= self.cfg.training.max_consecutive_nonfinite:
                stop_reason = "nan_limit"
        if stop_requested and stop_reason == "finished" and state.step < self.total_steps:
            stop_reason = "preempted"  # SIGTERM/SIGINT: checkpoint this step, then stop
        return StepResult(state.step, grad_norm, lr, stop_reason)

    def should_stop(self, result: StepResult) -> bool:
        """The loop ends after this step: the last step, or a stop (nan_limit, preempted)."""
        return result.stop_reason != "finished" or result.step >= self.total_steps

    def log_due(self, step: int) -> bool:
        return step % self.log_cfg.log_interval == 0 or step == self.total_steps

    def eval_due(self, step: int) -> bool:
        return step % self.log_cfg.eval_interval == 0

    def checkpoint_due(self, result: StepResult) -> bool:
        due = result.step % self.log_cfg.checkpoint_interval == 0 or result.stop_reason == "preempted"
        return due and result.step < self.total_steps  # the last step gets the final checkpoint instead

    def training_record(self, state: TrainState, result: StepResult, steps_per_epoch: float) -> dict:
        """The common fields of a training_log line (trainkit.runlog.TRAINING_FIELDS) for this step."""
        from trainkit.runtime import memory_gb

        interval = state.interval
        seconds = max(interval.seconds, 1e-9)
        step_time = seconds / max(interval.all_steps, 1)
        mem_now, mem_peak = memory_gb(self.accelerator.device)
        return {"step": state.step, "epoch": round(state.step / max(steps_per_epoch, 1e-9), 4),
                "loss": interval.means()["loss"], "lr": result.lr, "grad_norm": result.grad_norm,
                "tokens": state.tokens_seen, "tokens_per_sec": round(interval.tokens / seconds, 1),
                "step_time": round(step_time, 4), "eta_seconds": round(step_time * (self.total_steps - state.step), 1),
                "total_steps": self.total_steps, "memory_allocated_gb": round(mem_now, 3),
                "memory_peak_gb": round(mem_peak, 3), "router_aux_loss": None}  # train_qlora.py fills it in for MoE

    def write_training(self, state: TrainState, record: dict, **postfix_formats: str) -> None:
        """training_log line, trackers, and the progress bar's postfix: the record's fields named in
        `postfix_formats` (name=format spec), shown when the interval had a finite step. Then the next
        interval starts."""
        self.runlog.write("training", record)
        self.accelerator.log({f"train/{k}": v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"},
                             step=record["step"])
        if record["loss"] is not None:
            self.progress.set_postfix({name: format(record[name], spec) for name, spec in postfix_formats.items()})
        state.interval.reset()

    def record_evaluation(self, state: TrainState, result: dict, summary: str, best_dir: Path,
                          tracker_values: dict | None = None) -> None:
        """eval_log line and eval event; a new best (by logging.metric_for_best, finite values only)
        saves the weights to `best_dir` and is announced. `tracker_values`: what goes to the
        trackers (default: every number of `result` as eval/<name>)."""
        metric = self.log_cfg.metric_for_best
        value = result.get(metric)
        best = is_better(value, state.best_metric, self.log_cfg.greater_is_better)
        state.metric_value, state.metric_step = value, state.step
        self.runlog.write("eval", {"step": state.step, **result, "metric": metric, "metric_value": value, "is_best": best})
        self.runlog.event(state.step, "eval", summary, eval_loss=result.get("eval_loss"), metric=metric, metric_value=value)
        if tracker_values is None:
            tracker_values = {f"eval/{k}": v for k, v in result.items() if isinstance(v, (int, float))}
        self.accelerator.log(tracker_values, step=state.step)
        self.say(f"step {state.step}: {summary}")
        if best:
            state.best_metric, state.best_step = value, state.step
            self.checkpointer.save_best(best_dir)
            self.runlog.event(state.step, "new_best", f"new best {metric} {state.best_metric:.4f}",
                              metric=metric, metric_value=state.best_metric, path=str(best_dir))

    def save_checkpoint(self, state: TrainState) -> None:
        """checkpoint-<step>/, then top-K retention."""
        self.checkpointer.save(self.run_dir / f"{CHECKPOINT_PREFIX}{state.step}", state, total_steps=self.total_steps)
        self.checkpointer.apply_retention(state.step)

    # ------------------------------------------------------------ after the loop
    def save_final(self, state: TrainState, evaluate=None, what: str = "adapter") -> Path:
        """After the last step: evaluate (when `evaluate` is given and the last evaluation was at an
        earlier step), then save final-checkpoint-<step>/."""
        if evaluate is not None and state.metric_step != state.step:
            evaluate()
        final = final_checkpoint_dir(self.run_dir, state.step)
        self.checkpointer.save(final, state, total_steps=self.total_steps)
        self.say(f"done: {state.step} steps; final {what} in {final}")
        return final

    def finish(self, state: TrainState, stop_reason: str) -> int:
        """End records of a run that left its loop (finished, nan_limit or preempted); returns the exit code."""
        from trainkit.patches import applied
        from trainkit.preemption import PREEMPTION

        self.progress.close()
        PREEMPTION.settle()
        runlog, step = self.runlog, state.step
        if stop_reason == "preempted":
            saved = self.run_dir / f"{CHECKPOINT_PREFIX}{step}"
            checkpoint = str(saved) if (saved / TRAINER_STATE_FILE).is_file() else None
            code = PREEMPTION.record(runlog, step, checkpoint)
            if self.is_main:
                PREEMPTION.say(f"preempted at step {step}: {checkpoint or 'no checkpoint'} saved; exit code {code} "
                               "(launch_training.sh, or the script with --resume, continues from it)")
        else:
            if stop_reason == "nan_limit":
                self.say(f"stopped after {state.nonfinite_streak} consecutive non-finite steps "
                         "(training.max_consecutive_nonfinite)")
            code = 0 if stop_reason == "finished" else 1
            runlog.event(step, "stop", f"run ended: {stop_reason}", reason=stop_reason)
            status = "finished" if stop_reason == "finished" else "failed"
            runlog.update_run_info(status=status, end_time=time.time(), patches=applied(), exit_code=code,
                                   error=None if status == "finished" else f"stopped: {stop_reason}")
        self.accelerator.end_training()
        return code


def check_same_start(accelerator, resume_from: Path | None) -> None:
    """Every process starts from the same checkpoint, or every process starts fresh. Each machine of a
    multi-node run decides on resuming from what it sees in the run directory: machines that do not
    share it (or were started with other flags) would train from different steps, out of step in every
    collective. A ConfigError (one line, exit 2) names what each machine decided."""
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import gather_object

    starts = gather_object([os.path.abspath(resume_from) if resume_from else None])
    if len(set(starts)) > 1:
        decided = "; ".join(f"rank {rank}: {start or 'a fresh start'}" for rank, start in enumerate(starts))
        raise ConfigError(f"--resume: the processes disagree on where to start ({decided}): run the same command on "
                          "every machine, with paths.output_dir on a file system they all share")


def tracker_config(public: dict) -> dict:
    """Flat scalar config for accelerate's trackers, from the redacted config (public_config)."""
    return {f"{s}.{k}": v for s, sec in public.items() if isinstance(sec, dict)
            for k, v in sec.items() if isinstance(v, (int, float, str, bool))}

"""Pieces of the training loop that train_qlora.py, train_lora.py and distill.py share.

Each script keeps its own loop, readable top to bottom; what would otherwise be written three
times lives here as plain functions: resume discovery, the run directory at start, the optimizer
step with non-finite skipping, the logging interval, checkpoint save/retention, evaluation
bookkeeping and the failure record. Nothing here owns the loop or calls back into it except
`Checkpointer`, which takes a function that writes the model's files.
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import time
import traceback
import uuid
from pathlib import Path
from typing import Callable

from trainkit.checkpoints import (archive_run_dir, atomic_directory, checkpoint_dirs, checkpoints_to_delete,
                                  commit_directory, continue_lineage, directory_size, find_latest_checkpoint,
                                  read_trainer_state, remove_partial_saves, staging_dir)
from trainkit import runlock
from trainkit.config import ConfigError, public_config
from trainkit.resume_check import config_changes, describe_changes, immutable_changes, stored_config
from trainkit.runlog import CHECKPOINT_PREFIX, TRAINER_STATE_FILE, RunLog, RunWriteError, release_frames, write_json_atomic, writing

TRACKER_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml",
                   "aim": "aim", "clearml": "clearml", "dvclive": "dvclive"}
# Fault injection for tests and drills: comma-separated optimizer steps whose loss is made NaN.
FAULT_ENV = "TRAINKIT_FAULT_NONFINITE_STEPS"


# ---------------------------------------------------------------- before the model loads
def resolve_resume(args, run_dir: Path, cfg: dict | None = None, mutable=()) -> Path | None:
    """The checkpoint to resume from: --resume_from PATH, --resume (the newest complete one on the
    latest attempt's line), or None. With `cfg`: the keys outside `mutable` must equal the config
    stored in the checkpoint, unless --allow-config-change (trainkit.resume_check)."""
    if args.resume_from:
        path = Path(args.resume_from)
        try:
            read_trainer_state(path)
        except FileNotFoundError:
            raise ConfigError(f"--resume_from: {path} is not a complete checkpoint directory (no trainer_state.json)")
        flag = "--resume_from"
    elif args.resume:
        path = find_latest_checkpoint(run_dir)
        if path is None:
            raise ConfigError(f"--resume: no complete checkpoint-* in {run_dir}")
        flag = "--resume"
    else:
        return None
    if cfg is not None and not getattr(args, "allow_config_change", False):
        changed = immutable_changes(read_trainer_state(path).get("config"), cfg, mutable)
        if changed:
            raise ConfigError(f"{flag}: {path} was trained with another config; these keys cannot change on resume: "
                              f"{describe_changes(changed)} (--allow-config-change resumes anyway)")
    return path


def check_trackers(report_to: list[str]) -> None:
    for tracker in report_to:
        module = TRACKER_MODULES.get(tracker)
        if module is None:
            raise ConfigError(f"logging.report_to: unknown tracker {tracker!r} ({', '.join(TRACKER_MODULES)})")
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"logging.report_to: {tracker} is not installed (pip install {module})")


def fault_steps() -> set[int]:
    return {int(s) for s in os.environ.get(FAULT_ENV, "").split(",") if s.strip()}


# ---------------------------------------------------------------- run directory
def prepare_run_dir(run_dir: Path, resume_from: Path | None, is_main: bool, say: Callable[[str], None]) -> None:
    """Main process: lock the run directory for this run (trainkit.runlock; RunDirInUse when another
    live process has it), then a fresh start never overwrites an earlier attempt (it is moved aside)
    and half-written checkpoints of a killed run are removed."""
    if not is_main:
        return
    runlock.acquire(run_dir)  # before anything in the run dir is written or moved
    if resume_from is None and run_dir.exists() and any(run_dir.iterdir()):
        archived = archive_run_dir(run_dir)
        say(f"{run_dir} held an earlier run without --resume: moved it to {archived}")
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_partial_saves(run_dir)


def watch_preemption(runlog: RunLog, train_cfg: dict, current_step: Callable[[], int]):
    """SIGTERM/SIGINT from here on: recorded as `preempted` (trainkit.preemption). Returns the process's
    Preemption, whose `flag` the loop adds to its per-step all-reduce once `arm()` is called."""
    from trainkit.preemption import PREEMPTION

    return PREEMPTION.watch(runlog, train_cfg["preemption_grace_seconds"], current_step)


def base_run_info(accelerator, script: str, cfg: dict, total_steps: int, resume_from, **fields) -> dict:
    """run.json fields every script writes at (re)start."""
    from trainkit.patches import applied
    from trainkit.runtime import library_versions

    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    info = dict(script=script, status="running", last_start_time=time.time(), end_time=None,
                total_steps=total_steps, world_size=accelerator.num_processes,
                num_machines=max(1, accelerator.num_processes // max(local_world, 1)),
                mixed_precision=accelerator.mixed_precision, pid=os.getpid(), versions=library_versions(), patches=applied(),
                config=public_config(cfg), config_path=cfg.get("_config_path"), error=None, exit_code=None, resumed_from=str(resume_from) if resume_from else None, **fields)
    if resume_from is None:
        info["start_time"] = time.time()
    return info


def tracker_config(cfg: dict) -> dict:
    """Flat scalar config for accelerate's trackers (secrets redacted)."""
    return {f"{s}.{k}": v for s, sec in public_config(cfg).items() if isinstance(sec, dict)
            for k, v in sec.items() if isinstance(v, (int, float, str, bool))}


def record_failure(runlog: RunLog, step: int, exc: BaseException) -> None:
    """Fatal error: traceback to error_log.jsonl, a stop event, status failed and the exit code in
    run.json. A stop signal before the loop is recorded as preempted instead. A clean SystemExit
    (code 0 or None) is not a failure and records nothing."""
    from trainkit.cli import exit_code_for_exception
    from trainkit.preemption import PREEMPTION, Preempted

    if isinstance(exc, SystemExit) and not exc.code:
        return
    PREEMPTION.settle()
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


def finish_run(runlog: RunLog, step: int, stop_reason: str) -> int:
    """End records of a run that left its loop (finished, nan_limit or preempted); returns the exit code."""
    from trainkit.patches import applied
    from trainkit.preemption import PREEMPTION

    PREEMPTION.settle()
    if stop_reason == "preempted":
        saved = runlog.run_dir / f"{CHECKPOINT_PREFIX}{step}"
        checkpoint = str(saved) if (saved / TRAINER_STATE_FILE).is_file() else None
        code = PREEMPTION.record(runlog, step, checkpoint)
        if runlog.is_main:
            PREEMPTION.say(f"preempted at step {step}: {checkpoint or 'no checkpoint'} saved; exit code {code} "
                            "(launch_training.sh, or the script with --resume, continues from it)")
        return code
    code = 0 if stop_reason == "finished" else 1
    runlog.event(step, "stop", f"run ended: {stop_reason}", reason=stop_reason)
    status = "finished" if stop_reason == "finished" else "failed"
    runlog.update_run_info(status=status, end_time=time.time(), patches=applied(), exit_code=code,
                           error=None if status == "finished" else f"stopped: {stop_reason}")
    return code


# ---------------------------------------------------------------- the optimizer step
def optimizer_step(accelerator, optimizer, scheduler, params, max_grad_norm: float, step_loss: float):
    """Clip, then step unless the loss or the gradient norm is not finite. The scheduler advances
    either way (one call per optimizer step, on every process). Returns (finite, grad_norm, lr)."""
    grad_norm = accelerator.clip_grad_norm_(params, max_grad_norm or float("inf"))  # None under DeepSpeed before its first step
    grad_norm = None if grad_norm is None else float(grad_norm)
    finite = math.isfinite(step_loss) and (grad_norm is None or math.isfinite(grad_norm))
    lr = optimizer.param_groups[0]["lr"]  # the lr this step uses (set by the scheduler, or by a resume's new config)
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return finite, grad_norm, lr


def report_nonfinite(runlog: RunLog, state: dict, step_loss, grad_norm, say) -> None:
    msg = (f"non-finite loss ({step_loss}) or gradient norm ({grad_norm}) at step {state['step']}: "
           f"optimizer step skipped ({state['nonfinite_streak']} in a row)")
    runlog.error(state["step"], "NonFiniteLoss", msg)
    runlog.event(state["step"], "nan_skip", msg, consecutive=state["nonfinite_streak"])
    say(msg)


# ---------------------------------------------------------------- the logging interval
def new_interval(*names: str) -> dict:
    """Accumulators of the current logging interval (kept in checkpoints so a resume logs the same
    lines). `sums` holds per-step means summed over the finite steps: loss and script-specific ones."""
    return {"steps": 0, "all_steps": 0, "tokens": 0, "seconds": 0.0, "sums": {n: 0.0 for n in ("loss", *names)}}


def add_to_interval(interval: dict, finite: bool, tokens: int, seconds: float, **values: float) -> None:
    interval["all_steps"] += 1
    interval["tokens"] += tokens
    interval["seconds"] += seconds
    if finite:
        interval["steps"] += 1
        for name, value in values.items():
            interval["sums"][name] = interval["sums"].get(name, 0.0) + value


def interval_means(interval: dict) -> dict:
    """Mean of each summed value over the finite steps of the interval (None when there were none)."""
    return {k: (v / interval["steps"] if interval["steps"] else None) for k, v in interval["sums"].items()}


def training_record(state: dict, interval: dict, *, total_steps: int, steps_per_epoch: float, lr: float,
                    grad_norm, device) -> dict:
    """The common fields of a training_log line (trainkit.runlog.TRAINING_FIELDS)."""
    from trainkit.runtime import memory_gb

    step = state["step"]
    seconds = max(interval["seconds"], 1e-9)
    step_time = seconds / max(interval["all_steps"], 1)
    mem_now, mem_peak = memory_gb(device)
    return {"step": step, "epoch": round(step / max(steps_per_epoch, 1e-9), 4),
            "loss": interval_means(interval)["loss"], "lr": lr, "grad_norm": grad_norm,
            "tokens": state["tokens_seen"], "tokens_per_sec": round(interval["tokens"] / seconds, 1),
            "step_time": round(step_time, 4), "eta_seconds": round(step_time * (total_steps - step), 1),
            "total_steps": total_steps, "memory_allocated_gb": round(mem_now, 3), "memory_peak_gb": round(mem_peak, 3),
            "router_aux_loss": None}  # train_qlora.py fills it in for MoE models


def is_due(step: int, interval: int, total_steps: int | None = None) -> bool:
    return step % interval == 0 or (total_steps is not None and step == total_steps)


# ---------------------------------------------------------------- evaluation
def evaluate_loss(model, loader, accelerator, max_batches: int | None = None) -> dict:
    """Token-level LM loss on a labelled loader (labels -100 are ignored), summed over processes.
    Computed from the logits, not the model's loss, which may include a MoE router aux loss."""
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    tokens = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    started = time.time()
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if max_batches and i >= max_batches:
                break
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            loss_sum += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                        ignore_index=-100, reduction="sum")
            tokens += (labels != -100).sum()
    model.train(was_training)
    loss_sum, tokens = accelerator.reduce(torch.stack([loss_sum, tokens]), "sum").tolist()
    eval_loss = loss_sum / max(tokens, 1)
    return {"eval_loss": eval_loss, "perplexity": math.exp(min(eval_loss, 50)), "eval_tokens": int(tokens),
            "eval_seconds": round(time.time() - started, 3)}


# ---------------------------------------------------------------- evaluation bookkeeping
def is_better(value, best, greater_is_better: bool) -> bool:
    """True when `value` beats `best`. A missing or non-finite value (a NaN eval after a divergence)
    never ranks: it would otherwise become a best that no later evaluation can beat."""
    if value is None or not math.isfinite(value):
        return False
    if best is None or not math.isfinite(best):
        return True
    return value > best if greater_is_better else value < best


def record_evaluation(runlog: RunLog, state: dict, result: dict, log_cfg: dict, summary: str) -> bool:
    """Write the eval_log line and the eval event; update the best metric in `state`.
    Returns True when this evaluation is the new best (the caller saves the best adapter)."""
    metric = log_cfg["metric_for_best"]
    value = result.get(metric)
    best = is_better(value, state["best_metric"], log_cfg["greater_is_better"])
    state["metric_value"], state["metric_step"] = value, state["step"]
    runlog.write("eval", {"step": state["step"], **result, "metric": metric, "metric_value": value, "is_best": best})
    runlog.event(state["step"], "eval", summary, eval_loss=result.get("eval_loss"), metric=metric, metric_value=value)
    if best:
        state["best_metric"], state["best_step"] = value, state["step"]
    return best


def announce_best(runlog: RunLog, state: dict, metric: str, path: Path) -> None:
    runlog.event(state["step"], "new_best", f"new best {metric} {state['best_metric']:.4f}",
                 metric=metric, metric_value=state["best_metric"], path=str(path))


# ---------------------------------------------------------------- checkpoints
def register_adapter_state_hooks(accelerator):
    """Checkpoints hold the PEFT adapter, not the (4-bit or frozen) base: accelerate's model weights
    are replaced by these hooks (the pattern of diffusers' LoRA scripts). Returns the load function,
    also used to load an adapter-only checkpoint."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    def save_adapter_hook(models, weights, output_dir):
        weights.clear()  # Checkpointer.save writes the adapter through the script's save_weights

    def load_adapter_hook(models, input_dir):
        for m in models:
            state = load_file(os.path.join(input_dir, "adapter_model.safetensors"), device=str(accelerator.device))
            set_peft_model_state_dict(accelerator.unwrap_model(m), state)
        models.clear()

    accelerator.register_save_state_pre_hook(save_adapter_hook)
    accelerator.register_load_state_pre_hook(load_adapter_hook)
    return load_adapter_hook


def resume_training_state(accelerator, resume_from: Path, state: dict, runlog: RunLog, load_weights_only, say,
                          checkpointer: "Checkpointer", scheduler) -> None:
    """Load optimizer/scheduler/RNG/model state (or only the weights when the checkpoint has no
    optimizer state), restore the loop state, and drop log lines of steps after the checkpoint.
    Keys of the config that changed since the checkpoint (the mutable ones, or any with
    --allow-config-change) take effect and are recorded as one config_changed event."""
    saved = read_trainer_state(resume_from)
    new_settings = schedule_settings(scheduler)  # what the new config built, before the checkpoint's replace it
    if (Path(resume_from) / "optimizer.bin").exists():
        accelerator.load_state(str(resume_from))
    else:
        say(f"warning: {resume_from} has no optimizer state: loading the weights only")
        load_weights_only(str(resume_from))
    state.update({k: saved[k] for k in state if k in saved})
    changes = config_changes(saved["config"], checkpointer.run_config) if saved.get("config") else {}
    if changes:
        # load_state restored the old base lr and optimizer hyperparameters: the new ones apply.
        apply_schedule_settings(scheduler, new_settings)
    # The attempt's line is recorded before any log line is dropped, so a kill from here on
    # resumes this same checkpoint again, never a checkpoint of the abandoned line.
    checkpointer.lineage = continue_lineage(checkpointer.attempt, saved)
    runlog.update_run_info(attempt=checkpointer.attempt, lineage=checkpointer.lineage)
    runlog.truncate_after(state["step"])
    runlog.event(state["step"], "resume", f"resumed from {resume_from}", path=str(resume_from))
    if not saved.get("config"):
        say(f"warning: {resume_from} stores no config (written by an earlier version): config changes not checked")
    if changes:
        message = f"config changed since {Path(resume_from).name}: {describe_changes(changes)}"
        runlog.event(state["step"], "config_changed", message, changes=changes, path=str(resume_from))
        say(message)
    say(f"resumed from {resume_from} at step {state['step']}")


def schedule_settings(scheduler) -> dict:
    """The learning rates and optimizer hyperparameters of a freshly built scheduler/optimizer."""
    return {"base_lrs": list(scheduler.base_lrs),
            "groups": [{k: v for k, v in group.items() if k not in ("params", "lr", "initial_lr")}
                       for group in scheduler.optimizer.param_groups]}


def apply_schedule_settings(scheduler, settings: dict) -> None:
    """Put a new config's lr and optimizer hyperparameters over restored optimizer/scheduler state:
    the lr of the next step is the new base lr times the (new) schedule at the restored step."""
    scheduler.base_lrs = list(settings["base_lrs"])
    for group, base_lr, lr_lambda, fresh in zip(scheduler.optimizer.param_groups, scheduler.base_lrs,
                                                scheduler.lr_lambdas, settings["groups"]):
        group.update(fresh)
        group["initial_lr"] = base_lr
        group["lr"] = base_lr * lr_lambda(scheduler.last_epoch)


class Checkpointer:
    """Writes checkpoint-<step>/ and final-checkpoint-<step>/ atomically, keeps the top-K, saves the best.

    `save_weights(directory)` writes the model's own files (adapter, tokenizer, student config...) on
    the main process. A checkpoint is complete once trainer_state.json, written last, exists; it
    becomes visible under its name only then (staging directory + rename).
    """

    def __init__(self, accelerator, run_dir: Path, runlog: RunLog, log_cfg: dict, save_optimizer_state: bool,
                 save_weights: Callable[[Path], None], params_to_check=(), run_config: dict | None = None):
        self.accelerator, self.run_dir, self.runlog, self.log_cfg = accelerator, Path(run_dir), runlog, log_cfg
        self.save_optimizer_state = save_optimizer_state
        self.save_weights = save_weights
        self.params_to_check = list(params_to_check)
        self.is_main = accelerator.is_main_process
        # Stored in every checkpoint: the config that produced it (checked on resume), and the
        # attempt that wrote it with the attempts its line continues (checkpoints.continue_lineage).
        self.run_config = stored_config(run_config) if run_config is not None else None
        self.attempt = uuid.uuid4().hex[:12]
        self.lineage = continue_lineage(self.attempt, None)  # resume_training_state extends it

    def check_finite_weights(self, what: str) -> None:
        import torch

        if not all(torch.isfinite(p).all() for p in self.params_to_check):
            raise FloatingPointError(f"non-finite trained weights: refusing to save {what}")

    def save(self, target: Path, state: dict, **extra_state) -> None:
        self.check_finite_weights("a checkpoint")
        acc = self.accelerator
        staging = staging_dir(target)
        try:
            with writing(target.name, target):
                if self.is_main:
                    shutil.rmtree(staging, ignore_errors=True)
                    staging.mkdir(parents=True)
                acc.wait_for_everyone()
                if self.save_optimizer_state:
                    acc.save_state(str(staging))  # the model part goes through the script's save hooks
                if self.is_main:
                    self.save_weights(staging)
                    write_json_atomic(staging / TRAINER_STATE_FILE, {
                        **state, **extra_state, "time": time.time(), "metric_name": self.log_cfg["metric_for_best"],
                        "attempt": self.attempt, "lineage": self.lineage, "config": self.run_config})
                acc.wait_for_everyone()
                if self.is_main:
                    self.runlog.update_run_info(attempt=self.attempt, lineage=self.lineage)  # before the checkpoint is visible
                    commit_directory(staging, target)
        except BaseException as exc:
            if self.is_main:
                release_frames(exc)  # closes a file the failed save left open, so removing it frees the space
                shutil.rmtree(staging, ignore_errors=True)  # a partial save only holds space (resume never picks it)
            raise
        if self.is_main:
            self.runlog.event(state["step"], "checkpoint_saved", f"saved {target.name}", path=str(target),
                              size_bytes=directory_size(target), metric=self.log_cfg["metric_for_best"],
                              metric_value=state["metric_value"])
        acc.wait_for_everyone()

    def apply_retention(self, step: int) -> None:
        if not self.is_main:
            return
        keep = self.log_cfg["keep_top_k"]
        scored = [(s, read_trainer_state(p).get("metric_value")) for s, p in checkpoint_dirs(self.run_dir)]
        # The checkpoint just saved is the newest of this attempt's line; it stays whatever its
        # metric, even when an abandoned line holds higher steps.
        for s in checkpoints_to_delete(scored, keep, self.log_cfg["greater_is_better"], latest=step):
            path = self.run_dir / f"checkpoint-{s}"
            shutil.rmtree(path, ignore_errors=True)
            self.runlog.event(step, "checkpoint_deleted", f"deleted {path.name} (top-{keep} retention)", path=str(path))

    def save_best(self, directory: Path) -> None:
        self.check_finite_weights("the best adapter")
        if self.is_main:
            with writing(directory.name, directory), atomic_directory(directory) as staging:
                self.save_weights(staging)

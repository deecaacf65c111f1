"""Pieces of the training loop that train_qlora.py, train_lora.py and distill.py share.

Each script keeps its own loop, readable top to bottom; what would otherwise be written three
times lives here as plain functions: resume discovery and the config check on resume, gradient
accumulation, the optimizer step with non-finite skipping, the checkpoint hooks and
`Checkpointer` (atomic save, top-K retention, best weights). The run's
lifecycle (run directory, start and end records, logging) is trainkit.training_run.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable

from trainkit.checkpoints import (atomic_directory, checkpoint_dirs, checkpoints_to_delete, commit_directory,
                                  continue_lineage, directory_size, find_latest_checkpoint, read_trainer_state,
                                  staging_dir)
from trainkit.config import ConfigError
from trainkit.config.base import TrainConfig
from trainkit.resume_check import config_changes, describe_changes, immutable_changes, stored_config
from trainkit.fileio import write_json_atomic
from trainkit.runlog import TRAINER_STATE_FILE, RunLog, release_frames, writing
from trainkit.train_state import TrainState


# ---------------------------------------------------------------- before the model loads
def resolve_resume(args, cfg: TrainConfig) -> Path | None:
    """The checkpoint to resume from: --resume_from PATH, --resume (the newest complete one on the
    latest attempt's line in cfg.run_dir), or None. The keys outside the config's RESUME_MUTABLE must
    equal the config stored in the checkpoint, unless --allow-config-change (trainkit.resume_check)."""
    run_dir = cfg.run_dir
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
    if not getattr(args, "allow_config_change", False):
        changed = immutable_changes(read_trainer_state(path).get("config"), cfg, cfg.RESUME_MUTABLE)
        if changed:
            raise ConfigError(f"{flag}: {path} was trained with another config; these keys cannot change on resume: "
                              f"{describe_changes(changed)} (--allow-config-change resumes anyway)")
    return path


# ---------------------------------------------------------------- micro batches and the optimizer step
def accumulation_position(batch_index: int, accum: int, batches_per_epoch: int) -> tuple[int, bool]:
    """(micro batches in this batch's optimizer step, whether this batch ends the step). The last
    optimizer step of an epoch takes fewer micro batches when the epoch does not divide evenly."""
    group_start = (batch_index // accum) * accum
    micro_in_step = min(accum, batches_per_epoch - group_start)
    return micro_in_step, batch_index + 1 == group_start + micro_in_step


def training_length(batches_per_epoch: int, accum: int, training) -> tuple[int, int]:
    """(optimizer steps per epoch, optimizer steps to train): training.max_steps, or training.epochs
    passes over the data when max_steps is -1."""
    steps_per_epoch = math.ceil(batches_per_epoch / accum)
    total = training.max_steps if training.max_steps > 0 else math.ceil(training.epochs * steps_per_epoch)
    return steps_per_epoch, total


def deepspeed_accumulates(accelerator, micro_batch_size: int, accum: int, max_grad_norm: float) -> bool:
    """Under DeepSpeed, which accumulates and clips inside backward(), give it our numbers; True then
    (the loss is not divided by the micro batches: DeepSpeed divides by its own count)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return False
    accelerator.state.deepspeed_plugin.deepspeed_config.update(
        gradient_accumulation_steps=accum, train_micro_batch_size_per_gpu=micro_batch_size,
        gradient_clipping=max_grad_norm)
    return True


def gradient_sync(accelerator, model, sync: bool):
    """Context of one micro batch's forward and backward: gradients are all-reduced only on the
    micro batch that ends an optimizer step (DDP's no_sync on the others)."""
    return contextlib.nullcontext() if sync else accelerator.no_sync(model)


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


# ---------------------------------------------------------------- evaluation bookkeeping
def is_better(value, best, greater_is_better: bool) -> bool:
    """True when `value` beats `best`. A missing or non-finite value (a NaN eval after a divergence)
    never ranks: it would otherwise become a best that no later evaluation can beat."""
    if value is None or not math.isfinite(value):
        return False
    if best is None or not math.isfinite(best):
        return True
    return value > best if greater_is_better else value < best


# ---------------------------------------------------------------- checkpoints
def register_weight_hooks(accelerator, load_weights: Callable[[str], None]) -> None:
    """Checkpoints hold the model in its own save_pretrained form (the PEFT adapter, not the 4-bit or
    frozen base; distill's student), written by Checkpointer's `save_weights`. These hooks drop
    accelerate's copy of the model weights from save_state and make load_state call
    `load_weights(directory)` instead (the pattern of diffusers' LoRA scripts)."""
    def save_hook(models, weights, output_dir):
        weights.clear()

    def load_hook(models, input_dir):
        load_weights(input_dir)
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def adapter_loader(accelerator, model) -> Callable[[str], None]:
    """Loads a checkpoint's (or best-adapter's) adapter_model.safetensors into the PEFT `model`."""
    from safetensors.torch import load_file

    from trainkit.adapters import load_adapter_weights

    def load_adapter(directory: str) -> None:
        # straight onto the GPU; safetensors refuses the CPU device of several CPU processes ("cpu:0")
        device = accelerator.device
        state = load_file(os.path.join(directory, "adapter_model.safetensors"),
                          device="cpu" if device.type == "cpu" else str(device))
        load_adapter_weights(accelerator.unwrap_model(model), state, directory)

    return load_adapter


def pretrained_saver(model, tokenizer) -> Callable[[Path], None]:
    """Writes `model` (an adapter, a student) and the tokenizer with save_pretrained."""
    def save(directory: Path) -> None:
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)

    return save


def seeded_loader(dataset, batch_size: int, seed: int, shuffle: bool, **kwargs):
    """A DataLoader with its own generator: creating an iterator draws a base seed, which must not come
    from the global RNG (restored on resume, then consumed again by the first iterator: drift)."""
    import torch
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(seed), **kwargs)


def resume_training_state(accelerator, resume_from: Path, state: TrainState, runlog: RunLog, load_weights_only, say,
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
    state.load_dict(saved)
    changes = config_changes(saved["config"], checkpointer.run_config) if saved.get("config") else {}
    if changes:
        # load_state restored the old base lr and optimizer hyperparameters: the new ones apply.
        apply_schedule_settings(scheduler, new_settings)
    # The attempt's line is recorded before any log line is dropped, so a kill from here on
    # resumes this same checkpoint again, never a checkpoint of the abandoned line.
    checkpointer.lineage = continue_lineage(checkpointer.attempt, saved)
    runlog.update_run_info(attempt=checkpointer.attempt, lineage=checkpointer.lineage)
    runlog.truncate_after(state.step)
    runlog.event(state.step, "resume", f"resumed from {resume_from}", path=str(resume_from))
    if not saved.get("config"):
        say(f"warning: {resume_from} stores no config (written by an earlier version): config changes not checked")
    if changes:
        message = f"config changed since {Path(resume_from).name}: {describe_changes(changes)}"
        runlog.event(state.step, "config_changed", message, changes=changes, path=str(resume_from))
        say(message)
    say(f"resumed from {resume_from} at step {state.step}")


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

    def save(self, target: Path, state: TrainState, **extra_state) -> None:
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
                        **state.to_dict(), **extra_state, "time": time.time(), "metric_name": self.log_cfg.metric_for_best,
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
            self.runlog.event(state.step, "checkpoint_saved", f"saved {target.name}", path=str(target),
                              size_bytes=directory_size(target), metric=self.log_cfg.metric_for_best,
                              metric_value=state.metric_value)
        acc.wait_for_everyone()

    def apply_retention(self, step: int) -> None:
        if not self.is_main:
            return
        keep = self.log_cfg.keep_top_k
        scored = [(s, read_trainer_state(p).get("metric_value")) for s, p in checkpoint_dirs(self.run_dir)]
        # The checkpoint just saved is the newest of this attempt's line; it stays whatever its
        # metric, even when an abandoned line holds higher steps.
        for s in checkpoints_to_delete(scored, keep, self.log_cfg.greater_is_better, latest=step):
            path = self.run_dir / f"checkpoint-{s}"
            shutil.rmtree(path, ignore_errors=True)
            self.runlog.event(step, "checkpoint_deleted", f"deleted {path.name} (top-{keep} retention)", path=str(path))

    def save_best(self, directory: Path) -> None:
        self.check_finite_weights("the best adapter")
        if self.is_main:
            with writing(directory.name, directory), atomic_directory(directory) as staging:
                self.save_weights(staging)

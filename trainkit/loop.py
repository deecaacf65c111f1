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
    """Loads a checkpoint's (or best-adapter's) adapter_model.safetensors into the PEFT `model` (under FSDP
    collectively: see load_sharded_adapter)."""
    from safetensors.torch import load_file

    from trainkit.adapters import load_adapter_weights

    def load_adapter(directory: str) -> None:
        if is_sharded(accelerator):
            load_sharded_adapter(accelerator, model, directory)
            return
        # straight onto the GPU; safetensors refuses the CPU device of several CPU processes ("cpu:0")
        device = accelerator.device
        state = load_file(os.path.join(directory, "adapter_model.safetensors"),
                          device="cpu" if device.type == "cpu" else str(device))
        load_adapter_weights(accelerator.unwrap_model(model), state, directory)

    return load_adapter


def pretrained_saver(model, tokenizer) -> Callable[..., None]:
    """Writes `model` (an adapter, a student) and the tokenizer with save_pretrained; `state_dict`: the
    weights to write when the model's own are shards (FSDP: full_trainable_state)."""
    def save(directory: Path, state_dict: dict | None = None) -> None:
        if state_dict is None:
            model.save_pretrained(directory)
        else:
            model.save_pretrained(directory, state_dict=state_dict)
        tokenizer.save_pretrained(directory)

    return save


# ---------------------------------------------------------------- sharded models (FSDP)
# Under FSDP every process holds a shard of each weight (DTensors). Checkpoints still hold what they hold under
# DDP: the trainable weights only (the adapter; never the 4-bit or frozen base, which accelerate's own FSDP save
# would write whole), gathered whole onto the main process, and the optimizer state as one full state dict: the
# adapter loads with PEFT on one GPU or a CPU, and the files do not depend on how the weights were sharded. torch.distributed.checkpoint's
# state_dict functions do the gathering and the scattering back.
OPTIMIZER_FULL_STATE_FILE = "optimizer_full_state.pt"  # FSDP checkpoints; accelerate's optimizer.bin otherwise


def is_sharded(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def is_zero3(accelerator) -> bool:
    """DeepSpeed ZeRO stage 3: parameters partitioned into DeepSpeed's own flat buffers."""
    from accelerate.utils import DistributedType

    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return accelerator.distributed_type == DistributedType.DEEPSPEED and getattr(plugin, "zero_stage", 0) == 3


def describe_sharding(model, accelerator, base_bytes_whole: int) -> dict:
    """What this process holds under FSDP: its shards of the frozen base (4-bit data and statistics included)
    and of the trainable weights, against `base_bytes_whole` (base_weight_bytes of the model before sharding);
    `summary` is the line the run prints."""
    import torch

    from trainkit.quantization import base_weight_bytes

    base = torch.tensor([base_weight_bytes(model)], dtype=torch.float64, device=accelerator.device)
    largest = base.clone()
    torch.distributed.all_reduce(largest, op=torch.distributed.ReduceOp.MAX)
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable_here = sum(getattr(p, "_local_tensor", p).numel() * p.element_size() for p in trainable)
    trainable_whole = sum(p.numel() * p.element_size() for p in trainable)  # a DTensor's numel is the whole one's
    share = largest.item() / max(base_bytes_whole, 1)
    return {"processes": accelerator.num_processes, "base_bytes_whole": base_bytes_whole,
            "base_bytes_this_process": int(base.item()), "base_bytes_largest_process": int(largest.item()),
            "base_share_largest_process": round(share, 4), "trainable_bytes_this_process": trainable_here,
            "trainable_bytes_whole": trainable_whole,
            "summary": f"FSDP over {accelerator.num_processes} processes: base weights {_size(largest.item())} on the "
                       f"largest process, {share:.3f}x the whole base's {_size(base_bytes_whole)} (4-bit data and "
                       f"statistics); trainable {_size(trainable_here)} of {_size(trainable_whole)}"}


def describe_weight_sharding(model, accelerator) -> dict:
    """What this process holds of all the weights of `model` under FSDP (its shards, frozen weights included)
    against the whole model's, and its FSDP units: run.json's model.sharding for a model without a 4-bit base
    (distill's student)."""
    import torch
    from torch.distributed.fsdp import FSDPModule

    whole = sum(p.numel() * p.element_size() for p in model.parameters())  # a DTensor's numel is the whole one's
    here = sum(getattr(p, "_local_tensor", p).numel() * p.element_size() for p in model.parameters())
    largest = torch.tensor([here], dtype=torch.float64, device=accelerator.device)
    torch.distributed.all_reduce(largest, op=torch.distributed.ReduceOp.MAX)
    share = largest.item() / max(whole, 1)
    return {"processes": accelerator.num_processes, "weight_bytes_whole": whole, "weight_bytes_this_process": here,
            "weight_bytes_largest_process": int(largest.item()), "weight_share_largest_process": round(share, 4),
            "units": sum(isinstance(m, FSDPModule) for m in model.modules()),  # each gathered whole while it runs
            "summary": f"FSDP over {accelerator.num_processes} processes: weights {_size(largest.item())} on the "
                       f"largest process, {share:.3f}x the whole model's {_size(whole)}"}


def shard_frozen_model(model) -> None:
    """torch's fully_shard over a frozen model that only runs forward (distill's teacher, whose forward is
    model.base_model): each decoder layer one unit and the base model (embeddings, final norm) the root, every unit
    resharded after its forward, so each process keeps 1/N of them and gathers one layer at a time. The output head
    stays whole, outside FSDP (the KD loss reads its weight directly)."""
    from torch.distributed.fsdp import fully_shard

    from trainkit.models import decoder_layers

    for layer in decoder_layers(model):
        fully_shard(layer, reshard_after_forward=True)
    fully_shard(model.base_model, reshard_after_forward=True)


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def reshard(model) -> None:
    """Put every FSDP2 unit of `model` back into its sharded parameters. An evaluation (forward without backward)
    leaves the root unit's parameters unsharded (FSDP2 reshards the root only after backward): its modules then
    hold other Parameter objects than the optimizer, and the state-dict functions cannot match them."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def full_trainable_state(model) -> dict:
    """Collective: the trainable weights, whole, on the CPU of the main process, keyed as model.state_dict()
    (an empty dict on the other processes)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    reshard(model)
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                ignore_frozen_params=True))


def full_module_state(model, module) -> dict:
    """Collective: every weight of `module` (the prepared `model` or one of its submodules: distill's student in
    its StudentKD), frozen ones included, whole, on the CPU of the main process, keyed as module.state_dict()
    (an empty dict on the other processes)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    reshard(model)
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_sharded_weights(accelerator, model, module, directory: str) -> None:
    """Collective: a save_pretrained directory (full_module_state's weights), read on the main process, checked
    against `module` (trainkit.models.weights_mismatch) and scattered into the shards of the prepared `model`."""
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from trainkit.models import read_pretrained_weights, weights_mismatch

    state, error = {}, None
    if accelerator.is_main_process:
        state = read_pretrained_weights(directory)
        expected = module.state_dict().keys()  # the keys only: no gathering
        error = weights_mismatch(module, directory, sorted(expected - state.keys()), sorted(state.keys() - expected))
    failed = torch.tensor([error is not None], dtype=torch.int32, device=accelerator.device)
    if accelerator.reduce(failed, reduction="sum").item():  # every process stops, not only the one that read it
        raise RuntimeError(error or f"{directory}: weights do not match the model (see the main process's error)")
    reshard(model)
    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                                 strict=False))


def load_sharded_adapter(accelerator, model, directory: str) -> None:
    """Collective: the adapter file, read on the main process, mapped onto the model's keys with PEFT's own naming
    (get_peft_model_state_dict), checked for missing and unexpected keys, and scattered into the shards."""
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from trainkit.adapters import adapter_mismatch

    full = full_trainable_state(model)
    state, error = {}, None
    if accelerator.is_main_process:
        saved = load_file(os.path.join(directory, "adapter_model.safetensors"), device="cpu")
        names = {id(tensor): key for key, tensor in full.items()}
        peft_keys = {key: names[id(tensor)] for key, tensor in
                     get_peft_model_state_dict(accelerator.unwrap_model(model), state_dict=full).items()}
        error = adapter_mismatch(directory, sorted(peft_keys.keys() - saved.keys()), sorted(saved.keys() - peft_keys.keys()))
        state = {peft_keys[key]: tensor.to(full[peft_keys[key]].dtype) for key, tensor in saved.items()
                 if key in peft_keys}
    failed = torch.tensor([error is not None], dtype=torch.int32, device=accelerator.device)
    if accelerator.reduce(failed, reduction="sum").item():  # every process stops, not only the one that read it
        raise ValueError(error or f"adapter {directory} does not match the model (see the main process's error)")
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                                strict=False))


def save_sharded_optimizer(model, optimizer, path: Path, is_main: bool) -> None:
    """Collective: the optimizer state gathered whole (keyed by parameter name) and written by the main process."""
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    reshard(model)
    state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if is_main:
        torch.save(state, path)


def load_sharded_optimizer(model, optimizer, path: Path, is_main: bool) -> None:
    """Collective: a full optimizer state read on the main process and scattered into every process's shards."""
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state = torch.load(path, map_location="cpu", weights_only=False) if is_main else {}
    reshard(model)
    set_optimizer_state_dict(model, optimizer, state,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


@contextlib.contextmanager
def accelerate_state_only(accelerator):
    """save_state / load_state for the RNG, scheduler and data position only: under FSDP accelerate would save the
    whole sharded model (the 4-bit base included) before any save hook runs; the model and optimizer are written
    by the Checkpointer instead (trainkit.patches.accelerate.hide_models_and_optimizers)."""
    from trainkit.patches.accelerate import hide_models_and_optimizers

    with hide_models_and_optimizers(accelerator):
        yield


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
    if checkpointer.has_optimizer_state(Path(resume_from)):
        checkpointer.load_state(Path(resume_from))
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
                 save_weights: Callable[..., None], params_to_check=(), run_config: dict | None = None,
                 model=None, optimizer=None, saved_module=None):
        self.accelerator, self.run_dir, self.runlog, self.log_cfg = accelerator, Path(run_dir), runlog, log_cfg
        self.save_optimizer_state = save_optimizer_state
        self.save_weights = save_weights
        self.params_to_check = list(params_to_check)
        self.is_main = accelerator.is_main_process
        # FSDP: the prepared model and optimizer, whose shards the checkpoint gathers (see is_sharded)
        self.sharded = is_sharded(accelerator)
        if self.sharded and (model is None or optimizer is None):
            raise ValueError("Checkpointer under FSDP needs the prepared model and optimizer")
        self.model, self.optimizer = model, optimizer
        # what save_weights writes under FSDP: every weight of saved_module (distill's student, frozen parts
        # included), else the trainable weights of model (an adapter)
        self.saved_module = saved_module
        # Stored in every checkpoint: the config that produced it (checked on resume), and the
        # attempt that wrote it with the attempts its line continues (checkpoints.continue_lineage).
        self.run_config = stored_config(run_config) if run_config is not None else None
        self.attempt = uuid.uuid4().hex[:12]
        self.lineage = continue_lineage(self.attempt, None)  # resume_training_state extends it

    def check_finite_weights(self, what: str) -> None:
        import torch

        # FSDP: each process checks its shards, and all of them agree (a collective, like the save after it)
        finite = all(torch.isfinite(getattr(p, "_local_tensor", p)).all() for p in self.params_to_check)
        if self.sharded:
            flag = torch.tensor([0 if finite else 1], dtype=torch.int32, device=self.accelerator.device)
            finite = self.accelerator.reduce(flag, reduction="sum").item() == 0
        if not finite:
            raise FloatingPointError(f"non-finite trained weights: refusing to save {what}")

    def has_optimizer_state(self, directory: Path) -> bool:
        """Whether `directory` holds optimizer state this run can load (a checkpoint of the same kind: FSDP or not;
        ConfigError for the other kind, whose optimizer state is laid out differently)."""
        full, per_process = (directory / OPTIMIZER_FULL_STATE_FILE).exists(), (directory / "optimizer.bin").exists()
        if (full and not self.sharded) or (per_process and self.sharded):
            written, now = ("with", "without") if full else ("without", "with")
            raise ConfigError(f"--resume_from: {directory} was written {written} FSDP and this run is {now} it: resume "
                              "with the accelerate config that wrote it (the weights alone load anywhere: "
                              "python -m trainkit.generate, trainkit.export, PEFT's or the student's from_pretrained)")
        return full or per_process

    def load_state(self, directory: Path) -> None:
        """Optimizer, scheduler, RNG and data position, and the weights (through the load hook); collective."""
        if not self.sharded:
            self.accelerator.load_state(str(directory))
            return
        with accelerate_state_only(self.accelerator):
            self.accelerator.load_state(str(directory))  # the load hook reads the adapter into the shards
        load_sharded_optimizer(self.model, self.optimizer, directory / OPTIMIZER_FULL_STATE_FILE, self.is_main)

    def gather_weights(self) -> dict | None:
        """Collective under FSDP: the weights save_weights writes, gathered whole; None otherwise."""
        if not self.sharded:
            return None
        if self.saved_module is not None:
            return full_module_state(self.model, self.saved_module)
        return full_trainable_state(self.model)

    def write_weights(self, directory: Path, state: dict | None) -> None:
        """The model's own files (save_weights), on the main process."""
        if state is None:
            self.save_weights(directory)
        else:
            self.save_weights(directory, state_dict=state)

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
                if self.save_optimizer_state and self.sharded:
                    with accelerate_state_only(acc):
                        acc.save_state(str(staging))
                    save_sharded_optimizer(self.model, self.optimizer, staging / OPTIMIZER_FULL_STATE_FILE, self.is_main)
                elif self.save_optimizer_state:
                    acc.save_state(str(staging))  # the model part goes through the script's save hooks
                weights = self.gather_weights()
                if self.is_main:
                    self.write_weights(staging, weights)
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
        weights = self.gather_weights()
        if self.is_main:
            with writing(directory.name, directory), atomic_directory(directory) as staging:
                self.write_weights(staging, weights)

#!/usr/bin/env python
"""QLoRA fine-tuning of dense and Mixture-of-Experts causal LMs.

    accelerate launch train_qlora.py --config training_config.yaml [--resume | --resume_from PATH] [section.key=value ...]
    python train_qlora.py ...            # one process, the same code
    ./launch_training.sh                 # what users type: setup, GPUs, auto-resume, then this

Reads top to bottom: config -> tokenizer and data -> 4-bit base model + LoRA ->
accelerate.prepare -> loop (forward, backward, step; log, evaluate, checkpoint every N
steps) -> final save. Everything it writes lands in the run directory described in
trainkit/runlog.py.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import time
import traceback
from pathlib import Path

from trainkit.cli import build_parser, run_main
from trainkit.config import (BASE_SCHEMA, ConfigError, Key, check_paths, load_config, merge_schema,
                             positive, public_config)

QLORA_SCHEMA = merge_schema(BASE_SCHEMA, {
    "lora": {
        "r": Key(int, 16, "LoRA rank", check=positive),
        "alpha": Key(float, 32.0, "LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) for rslora)", check=positive),
        "dropout": Key(float, 0.05, "dropout on the LoRA input", check=lambda v: None if 0 <= v < 1 else "must be in [0, 1)"),
        "target_modules": Key((str, list), "auto", "'auto' (preset by model family), a preset name, or a list of module names"),
        "variant": Key(str, "lora", "adapter variant", choices=("lora", "dora", "rslora")),
        "bias": Key(str, "none", "train biases", choices=("none", "all", "lora_only")),
        "modules_to_save": Key(list, [], "modules trained in full and saved with the adapter (e.g. [embed_tokens, lm_head] for a random-init base or new tokens)"),
    },
    "quantization": {
        "load_in_4bit": Key(bool, True, "quantize the base model's linear layers with bitsandbytes"),
        "quant_type": Key(str, "nf4", "4-bit data type", choices=("nf4", "fp4")),
        "double_quant": Key(bool, True, "quantize the quantization constants too (saves ~0.4 bit/param)"),
        "compute_dtype": Key(str, "bfloat16", "dtype of matmuls and of the non-quantized weights", choices=("bfloat16", "float16", "float32")),
        "quantize_moe_experts": Key(bool, True, "quantize fused 3-D MoE expert tensors too (bitsandbytes leaves them in bf16)"),
        "quantize_experts_on_load": Key(bool, True, "quantize experts tensor by tensor while the checkpoint loads, so a 100B MoE never sits on the GPU in bf16 (false: after loading)"),
    },
    "logging": {
        "expert_stats_interval": Key(int, 10, "optimizer steps between MoE router statistics snapshots", check=positive),
    },
})
SCHEMA = QLORA_SCHEMA  # launch_training.sh validates configs against it before launching
EVAL_METRICS = ("eval_loss", "perplexity")
# Fault injection for tests and drills: comma-separated optimizer steps whose loss is made NaN.
FAULT_ENV = "TRAINKIT_FAULT_NONFINITE_STEPS"


def resolve_resume(args, run_dir: Path) -> Path | None:
    from trainkit.checkpoints import find_latest_checkpoint, read_trainer_state

    if args.resume_from:
        path = Path(args.resume_from)
        try:
            read_trainer_state(path)
        except FileNotFoundError:
            raise ConfigError(f"--resume_from: {path} is not a complete checkpoint directory (no trainer_state.json)")
        return path
    if args.resume:
        latest = find_latest_checkpoint(run_dir)
        if latest is None:
            raise ConfigError(f"--resume: no complete checkpoint-* in {run_dir}")
        return latest
    return None


def check_qlora_config(cfg: dict) -> None:
    if cfg["logging"]["metric_for_best"] not in EVAL_METRICS:
        raise ConfigError(f"logging.metric_for_best: {cfg['logging']['metric_for_best']!r} is not one of {', '.join(EVAL_METRICS)}")
    for tracker in cfg["logging"]["report_to"]:
        module = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml",
                  "aim": "aim", "clearml": "clearml", "dvclive": "dvclive"}.get(tracker)
        if module is None:
            raise ConfigError(f"logging.report_to: unknown tracker {tracker!r} (tensorboard, wandb, mlflow, comet_ml, aim, clearml, dvclive)")
        import importlib.util
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"logging.report_to: {tracker} is not installed (pip install {module})")


def new_interval() -> dict:
    """Accumulators of the current logging interval (kept in checkpoints so a resume logs the same lines)."""
    return {"loss_sum": 0.0, "steps": 0, "all_steps": 0, "tokens": 0, "seconds": 0.0, "aux_sum": 0.0}


def main() -> int:
    # ---------------------------------------------------------------- config (no heavy imports yet)
    args = build_parser(__doc__.splitlines()[0], "training_config.yaml").parse_args()
    cfg = load_config(args.config, args.overrides, QLORA_SCHEMA)
    check_paths(cfg)
    check_qlora_config(cfg)
    run_dir = Path(cfg["run_dir"])
    resume_from = resolve_resume(args, run_dir)

    import warnings

    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedType, set_seed
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from trainkit.adapters import apply_lora
    from trainkit.checkpoints import (archive_run_dir, atomic_directory, checkpoint_dirs, checkpoints_to_delete,
                                      commit_directory, directory_size, final_checkpoint_dir, read_trainer_state,
                                      remove_partial_saves, staging_dir)
    from trainkit.data import build_datasets, make_collator
    from trainkit.models import load_model
    from trainkit.moe import RouterStats
    from trainkit.runlog import TRAINER_STATE_FILE, RunLog, write_json_atomic
    from trainkit.runtime import library_versions, memory_gb
    from trainkit.schedules import build_scheduler
    from trainkit.tokenizer import load_tokenizer

    # PEFT still reads a transformers property renamed in 5.x: noise on every run, no action for users.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    paths, train_cfg, opt_cfg, log_cfg = cfg["paths"], cfg["training"], cfg["optimization"], cfg["logging"]
    accelerator = Accelerator(
        log_with=log_cfg["report_to"] or None,
        project_dir=str(run_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=train_cfg["seed"]),
    )
    is_main = accelerator.is_main_process
    if is_main:
        if resume_from is None and run_dir.exists() and any(run_dir.iterdir()):
            # A fresh start never overwrites an earlier attempt: move it aside.
            archived = archive_run_dir(run_dir)
            print(f"[train_qlora] {run_dir} held an earlier run without --resume: moved it to {archived}")
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_partial_saves(run_dir)
    accelerator.wait_for_everyone()
    runlog = RunLog(run_dir, is_main)
    say = accelerator.print
    step = 0  # optimizer steps done; read by the error handler below

    # SIGTERM (scheduler preemption, `accelerate launch` tearing down) becomes an exception so it is logged.
    def on_sigterm(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_sigterm)

    try:
        # ------------------------------------------------------------ tokenizer, data
        set_seed(train_cfg["seed"])
        tokenizer = load_tokenizer(cfg)
        with accelerator.main_process_first():
            train_ds, val_ds, data_info = build_datasets(cfg, tokenizer)
        say(f"[train_qlora] data: {data_info}")
        collate = make_collator(tokenizer)
        micro_bs, accum = opt_cfg["micro_batch_size"], opt_cfg["gradient_accumulation_steps"]
        # Own generators: creating a DataLoader iterator draws a base seed, which must not come from
        # the global RNG (restored on resume, then consumed again by the first iterator: drift).
        train_loader = DataLoader(train_ds, batch_size=micro_bs, shuffle=True, collate_fn=collate,
                                  num_workers=cfg["memory"]["dataloader_num_workers"],
                                  generator=torch.Generator().manual_seed(train_cfg["seed"]))
        val_loader = DataLoader(val_ds, batch_size=micro_bs, shuffle=False, collate_fn=collate,
                                generator=torch.Generator().manual_seed(train_cfg["seed"])) if len(val_ds) else None

        # ------------------------------------------------------------ model: 4-bit base + LoRA
        model, model_info = load_model(cfg, accelerator.device, tokenizer)
        say(f"[train_qlora] {model_info.get('summary', model_info)}")
        set_seed(train_cfg["seed"])  # LoRA init independent of how much randomness loading used
        model = apply_lora(model, cfg["lora"])
        trainable = [p for p in model.parameters() if p.requires_grad]
        say(f"[train_qlora] trainable parameters: {sum(p.numel() for p in trainable):,}")
        router_stats = RouterStats(model) if model_info.get("is_moe") else None
        aux_coef = float(getattr(model.config, "router_aux_loss_coef", 0.0) or 0.0) if router_stats else 0.0

        optimizer = torch.optim.AdamW(
            trainable, lr=opt_cfg["learning_rate"], betas=(opt_cfg["adam_beta1"], opt_cfg["adam_beta2"]),
            eps=opt_cfg["adam_epsilon"], weight_decay=opt_cfg["weight_decay"],
            fused=accelerator.device.type == "cuda")
        uses_deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        if uses_deepspeed:
            # DeepSpeed accumulates and steps inside backward(); give it our numbers.
            ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
            ds_config["gradient_accumulation_steps"] = accum
            ds_config["train_micro_batch_size_per_gpu"] = micro_bs
            ds_config["gradient_clipping"] = opt_cfg["max_grad_norm"]
        model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
        if val_loader is not None:
            val_loader = accelerator.prepare(val_loader)

        batches_per_epoch = len(train_loader)
        if batches_per_epoch == 0:
            raise ConfigError(f"paths.data_path: no training batches (train examples: {len(train_ds)})")
        steps_per_epoch = math.ceil(batches_per_epoch / accum)
        total_steps = train_cfg["max_steps"] if train_cfg["max_steps"] > 0 else math.ceil(train_cfg["epochs"] * steps_per_epoch)
        # The scheduler is stepped by hand once per optimizer step (not prepared: accelerate would
        # step it once per process) and saved through register_for_checkpointing.
        scheduler = build_scheduler(optimizer, opt_cfg, total_steps)
        accelerator.register_for_checkpointing(scheduler)

        # Checkpoints hold the adapter in PEFT format, not the 4-bit base: accelerate's model
        # weights are replaced by these hooks (the pattern of diffusers' LoRA scripts).
        def save_adapter_hook(models, weights, output_dir):
            if is_main:
                for m in models:
                    accelerator.unwrap_model(m).save_pretrained(output_dir)
            weights.clear()

        def load_adapter_hook(models, input_dir):
            for m in models:
                state = load_file(os.path.join(input_dir, "adapter_model.safetensors"), device=str(accelerator.device))
                set_peft_model_state_dict(accelerator.unwrap_model(m), state)
            models.clear()

        accelerator.register_save_state_pre_hook(save_adapter_hook)
        accelerator.register_load_state_pre_hook(load_adapter_hook)

        # ------------------------------------------------------------ state of the loop
        state = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "tokens_seen": 0, "best_metric": None,
                 "best_step": None, "metric_value": None, "metric_step": None, "nonfinite_streak": 0,
                 "interval": new_interval()}
        if resume_from is not None:
            saved = read_trainer_state(resume_from)
            if (Path(resume_from) / "optimizer.bin").exists():
                accelerator.load_state(str(resume_from))
            else:
                say(f"[train_qlora] warning: {resume_from} has no optimizer state: loading the adapter only")
                load_adapter_hook([model], str(resume_from))
            state.update({k: saved[k] for k in state if k in saved})
            runlog.truncate_after(state["step"])
            runlog.event(state["step"], "resume", f"resumed from {resume_from}", path=str(resume_from))
            say(f"[train_qlora] resumed from {resume_from} at step {state['step']}")
        step = state["step"]

        run_info = dict(script="train_qlora.py", status="running", last_start_time=time.time(), end_time=None,
                        total_steps=total_steps, world_size=accelerator.num_processes,
                        num_machines=max(1, accelerator.num_processes // int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))),
                        mixed_precision=accelerator.mixed_precision, pid=os.getpid(), versions=library_versions(),
                        model=model_info, data=data_info, config=public_config(cfg), error=None,
                        resumed_from=str(resume_from) if resume_from else None)
        if resume_from is None:
            run_info["start_time"] = time.time()
            runlog.event(0, "start", f"training {total_steps} steps on {accelerator.num_processes} process(es)",
                         total_steps=total_steps, world_size=accelerator.num_processes)
        runlog.update_run_info(**run_info)
        accelerator.init_trackers(paths["run_name"], config={f"{s}.{k}": v for s, sec in public_config(cfg).items()
                                                            if isinstance(sec, dict) for k, v in sec.items()
                                                            if isinstance(v, (int, float, str, bool))})

        # ------------------------------------------------------------ helpers used by the loop
        def evaluate() -> dict:
            model.eval()
            loss_sum = torch.zeros((), device=accelerator.device, dtype=torch.float64)
            tokens = torch.zeros((), device=accelerator.device, dtype=torch.float64)
            started = time.time()
            with torch.no_grad():
                for i, batch in enumerate(val_loader):
                    if train_cfg["max_eval_batches"] and i >= train_cfg["max_eval_batches"]:
                        break
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                    # LM loss only: the model's own loss would include the router aux loss.
                    labels = batch["labels"][:, 1:]
                    loss_sum += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                                ignore_index=-100, reduction="sum")
                    tokens += (labels != -100).sum()
            model.train()
            loss_sum, tokens = accelerator.reduce(torch.stack([loss_sum, tokens]), "sum").tolist()
            eval_loss = loss_sum / max(tokens, 1)
            return {"eval_loss": eval_loss, "perplexity": math.exp(min(eval_loss, 50)), "eval_tokens": int(tokens),
                    "eval_seconds": round(time.time() - started, 3)}

        def is_better(value, best) -> bool:
            if best is None:
                return True
            return value > best if log_cfg["greater_is_better"] else value < best

        def save_adapter_to(directory: Path) -> None:
            with atomic_directory(directory) as staging:
                accelerator.unwrap_model(model).save_pretrained(staging)
                tokenizer.save_pretrained(staging)

        def save_checkpoint(target: Path) -> None:
            if not all(torch.isfinite(p).all() for p in trainable):
                raise FloatingPointError("non-finite adapter weights: refusing to save a checkpoint")
            staging = staging_dir(target)
            if is_main:
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir(parents=True)
            accelerator.wait_for_everyone()
            if cfg["memory"]["save_optimizer_state"]:
                accelerator.save_state(str(staging))
            elif is_main:
                accelerator.unwrap_model(model).save_pretrained(staging)
            if is_main:
                tokenizer.save_pretrained(staging)
                write_json_atomic(staging / TRAINER_STATE_FILE, {
                    **state, "total_steps": total_steps, "time": time.time(),
                    "metric_name": log_cfg["metric_for_best"]})  # written last: marks the checkpoint complete
            accelerator.wait_for_everyone()
            if is_main:
                commit_directory(staging, target)
                runlog.event(state["step"], "checkpoint_saved", f"saved {target.name}", path=str(target),
                             size_bytes=directory_size(target), metric=log_cfg["metric_for_best"],
                             metric_value=state["metric_value"])
            accelerator.wait_for_everyone()

        def apply_retention() -> None:
            if not is_main:
                return
            scored = [(s, read_trainer_state(p).get("metric_value")) for s, p in checkpoint_dirs(run_dir)]
            for s in checkpoints_to_delete(scored, log_cfg["keep_top_k"], log_cfg["greater_is_better"]):
                path = run_dir / f"checkpoint-{s}"
                shutil.rmtree(path, ignore_errors=True)
                runlog.event(state["step"], "checkpoint_deleted", f"deleted {path.name} (top-{log_cfg['keep_top_k']} retention)", path=str(path))

        def run_evaluation() -> None:
            result = evaluate()
            value = result[log_cfg["metric_for_best"]]
            best = is_better(value, state["best_metric"])
            state["metric_value"], state["metric_step"] = value, state["step"]
            runlog.write("eval", {"step": state["step"], **result, "metric": log_cfg["metric_for_best"],
                                  "metric_value": value, "is_best": best})
            runlog.event(state["step"], "eval", f"eval_loss {result['eval_loss']:.4f}", eval_loss=result["eval_loss"],
                         metric=log_cfg["metric_for_best"], metric_value=value)
            accelerator.log({"eval/loss": result["eval_loss"], "eval/perplexity": result["perplexity"]}, step=state["step"])
            say(f"[train_qlora] step {state['step']}: eval_loss {result['eval_loss']:.4f} perplexity {result['perplexity']:.2f}")
            if best:
                state["best_metric"], state["best_step"] = value, state["step"]
                best_dir = Path(paths["best_adapter_dir"] or run_dir / "best-adapter")
                if is_main:
                    save_adapter_to(best_dir)
                runlog.event(state["step"], "new_best", f"new best {log_cfg['metric_for_best']} {value:.4f}",
                             metric=log_cfg["metric_for_best"], metric_value=value, path=str(best_dir))

        fault_steps = {int(s) for s in os.environ.get(FAULT_ENV, "").split(",") if s.strip()}

        # ------------------------------------------------------------ the loop
        model.train()
        progress = tqdm(total=total_steps, initial=state["step"], disable=not (is_main and log_cfg["progress_bar"]),
                        desc="train", unit="step", dynamic_ncols=True)
        stop_reason = "finished"
        device = accelerator.device
        while state["step"] < total_steps and stop_reason == "finished":
            train_loader.set_epoch(state["epoch"])
            skip = state["batches_in_epoch"]
            loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
            micro_losses, micro_aux, step_tokens = [], [], torch.zeros((), device=device, dtype=torch.long)
            step_started = time.time()
            for batch_index, batch in enumerate(loader, start=skip):
                # The last optimizer step of an epoch may take fewer micro batches.
                group_start = (batch_index // accum) * accum
                micro_in_step = min(accum, batches_per_epoch - group_start)
                is_step_end = batch_index + 1 == group_start + micro_in_step
                with accelerator.no_sync(model) if not is_step_end else contextlib.nullcontext():
                    outputs = model(**batch)
                    loss = outputs.loss
                    if state["step"] + 1 in fault_steps:
                        loss = loss * float("nan")
                    # DeepSpeed divides by its gradient_accumulation_steps itself.
                    accelerator.backward(loss if uses_deepspeed else loss / micro_in_step)
                aux = getattr(outputs, "aux_loss", None)
                micro_losses.append((loss - aux_coef * aux).detach() if aux is not None else loss.detach())
                if aux is not None:
                    micro_aux.append(aux.detach().float())
                step_tokens += batch["attention_mask"].sum()  # stays on device: no sync per micro batch
                state["batches_in_epoch"] = batch_index + 1
                if not is_step_end:
                    continue

                # ---- optimizer step (skipped when the loss or gradients are not finite)
                # One all-reduce and one host sync per optimizer step: sums of [loss, tokens, aux loss].
                aux_mean = torch.stack(micro_aux).mean() if micro_aux else torch.zeros((), device=device)
                local = torch.stack([torch.stack(micro_losses).double().mean(), step_tokens.double(), aux_mean.double()])
                loss_sum, tokens_all, aux_sum = accelerator.reduce(local, "sum").tolist()
                step_loss, step_aux = loss_sum / accelerator.num_processes, aux_sum / accelerator.num_processes
                tokens_all = int(tokens_all)
                max_norm = opt_cfg["max_grad_norm"] or float("inf")
                grad_norm = accelerator.clip_grad_norm_(trainable, max_norm)  # None under DeepSpeed before its first step
                grad_norm = None if grad_norm is None else float(grad_norm)
                finite = math.isfinite(step_loss) and (grad_norm is None or math.isfinite(grad_norm))
                lr = scheduler.get_last_lr()[0]
                if finite:
                    optimizer.step()
                    state["nonfinite_streak"] = 0
                else:
                    state["nonfinite_streak"] += 1
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                state["step"] += 1
                step = state["step"]
                state["tokens_seen"] += tokens_all
                progress.update(1)

                if not finite:
                    msg = (f"non-finite loss ({step_loss}) or gradient norm ({grad_norm}) at step {step}: "
                           f"optimizer step skipped ({state['nonfinite_streak']} in a row)")
                    runlog.error(step, "NonFiniteLoss", msg)
                    runlog.event(step, "nan_skip", msg, consecutive=state["nonfinite_streak"])
                    say(f"[train_qlora] {msg}")
                    if state["nonfinite_streak"] >= train_cfg["max_consecutive_nonfinite"]:
                        stop_reason = "nan_limit"
                else:
                    interval = state["interval"]
                    interval["loss_sum"] += step_loss
                    interval["steps"] += 1
                    interval["aux_sum"] += step_aux
                interval = state["interval"]
                interval["all_steps"] += 1
                interval["tokens"] += tokens_all
                interval["seconds"] += time.time() - step_started

                # ---- log
                if step % log_cfg["log_interval"] == 0 or step == total_steps:
                    n = max(interval["steps"], 1)
                    seconds = max(interval["seconds"], 1e-9)
                    step_time = seconds / max(interval["all_steps"], 1)
                    mem_now, mem_peak = memory_gb(device)
                    record = {"step": step, "epoch": round(step / steps_per_epoch, 4),
                              "loss": interval["loss_sum"] / n if interval["steps"] else None,
                              "lr": lr, "grad_norm": grad_norm, "tokens": state["tokens_seen"],
                              "tokens_per_sec": round(interval["tokens"] / seconds, 1), "step_time": round(step_time, 4),
                              "eta_seconds": round(step_time * (total_steps - step), 1), "total_steps": total_steps,
                              "memory_allocated_gb": round(mem_now, 3), "memory_peak_gb": round(mem_peak, 3),
                              "router_aux_loss": interval["aux_sum"] / n if router_stats else None}
                    runlog.write("training", record)
                    accelerator.log({f"train/{k}": v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}, step=step)
                    if record["loss"] is not None:
                        progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_sec']:.0f}")
                    state["interval"] = new_interval()

                if router_stats is not None and step % log_cfg["expert_stats_interval"] == 0:
                    router_stats.load_counts(accelerator.reduce(router_stats.counts_tensor(), "sum"))
                    runlog.write("experts", {"step": step, **router_stats.snapshot(reset=True)})

                # ---- evaluate, checkpoint
                if val_loader is not None and step % log_cfg["eval_interval"] == 0:
                    run_evaluation()
                if step % log_cfg["checkpoint_interval"] == 0 and step < total_steps:
                    save_checkpoint(run_dir / f"checkpoint-{step}")
                    apply_retention()

                micro_losses, micro_aux, step_tokens = [], [], torch.zeros((), device=device, dtype=torch.long)
                step_started = time.time()
                if state["step"] >= total_steps or stop_reason != "finished":
                    break
            else:  # the epoch ran out
                state["epoch"] += 1
                state["batches_in_epoch"] = 0
        progress.close()

        # ------------------------------------------------------------ final save
        if stop_reason == "finished":
            if val_loader is not None and state["metric_step"] != state["step"]:
                run_evaluation()
            final = final_checkpoint_dir(run_dir, state["step"])
            save_checkpoint(final)
            say(f"[train_qlora] done: {state['step']} steps, final adapter in {final}")
        else:
            say(f"[train_qlora] stopped after {state['nonfinite_streak']} consecutive non-finite steps (training.max_consecutive_nonfinite)")
        runlog.event(state["step"], "stop", f"run ended: {stop_reason}", reason=stop_reason)
        status = "finished" if stop_reason == "finished" else "failed"
        runlog.update_run_info(status=status, end_time=time.time(),
                               error=None if status == "finished" else f"stopped: {stop_reason}")
        accelerator.end_training()
        return 0 if status == "finished" else 1

    except BaseException as exc:
        if isinstance(exc, SystemExit) and not exc.code:
            raise
        message = f"{type(exc).__name__}: {exc}".splitlines()[0] if str(exc) else type(exc).__name__
        runlog.error(step, type(exc).__name__, message, traceback=traceback.format_exc(), fatal=True)
        runlog.event(step, "stop", f"run failed: {message}", reason="failed")
        runlog.update_run_info(status="failed", end_time=time.time(), error=message)
        raise


if __name__ == "__main__":
    run_main(main)

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
import time
from pathlib import Path

from trainkit.cli import build_parser, run_main
from trainkit.config import BASE_SCHEMA, ConfigError, Key, check_paths, load_config, merge_schema, positive
from trainkit.loop import check_trackers, resolve_resume
from trainkit.preflight import check_model_config
from trainkit.resume_check import COMMON_MUTABLE
from trainkit.runtime import DTYPE_CHOICES

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
        "compute_dtype": Key(str, "auto", "dtype of matmuls and of the non-quantized weights; auto: bfloat16 on GPUs with native bf16, float16 on older GPUs, float32 on CPUs (bf16 is emulated, several times slower, on most)", choices=DTYPE_CHOICES),
        "quantize_moe_experts": Key(bool, True, "quantize fused 3-D MoE expert tensors too (bitsandbytes leaves them in bf16)"),
        "quantize_experts_on_load": Key(bool, True, "quantize experts tensor by tensor while the checkpoint loads, so a 100B MoE never sits on the GPU in bf16 (false: after loading)"),
    },
    "logging": {
        "expert_stats_interval": Key(int, 10, "optimizer steps between MoE router statistics snapshots", check=positive),
    },
})
SCHEMA = QLORA_SCHEMA  # launch_training.sh validates configs against it before launching
# Keys that may change on resume (README, "Resume and config changes"); the others must match the checkpoint's.
RESUME_MUTABLE = COMMON_MUTABLE | {"lora.dropout", "logging.expert_stats_interval",
                                   "quantization.compute_dtype", "quantization.quantize_experts_on_load"}
EVAL_METRICS = ("eval_loss", "perplexity")


def check_qlora_config(cfg: dict) -> None:
    if cfg["logging"]["metric_for_best"] not in EVAL_METRICS:
        raise ConfigError(f"logging.metric_for_best: {cfg['logging']['metric_for_best']!r} is not one of {', '.join(EVAL_METRICS)}")
    check_trackers(cfg["logging"]["report_to"])


def check_config(cfg: dict) -> None:
    """Everything about the config that can be checked before any model loads (the launcher calls it too)."""
    check_paths(cfg)
    check_qlora_config(cfg)


def env_config_overrides() -> tuple[list[str], dict]:
    """HP_* and friends from the environment (trainkit.env_overrides; launch_training.sh applies them too)."""
    from trainkit.env_overrides import env_overrides
    return env_overrides(schema=QLORA_SCHEMA, script="train_qlora.py")


def main() -> int:
    # ---------------------------------------------------------------- config (no heavy imports yet)
    args = build_parser(__doc__.splitlines()[0], "training_config.yaml").parse_args()
    env_overrides, env_applied = env_config_overrides()
    cfg = load_config(args.config, env_overrides + args.overrides, QLORA_SCHEMA)  # YAML < environment < command line
    check_config(cfg)
    run_dir = Path(cfg["run_dir"])
    resume_from = resolve_resume(args, run_dir, cfg, RESUME_MUTABLE)
    # hub id, positions, adapter targets: from the model's config, before data or weights load
    check_model_config(cfg, lengths={"training.max_seq_length": cfg["training"]["max_seq_length"]},
                       target_modules=cfg["lora"]["target_modules"])

    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedType, set_seed
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from trainkit.adapters import apply_lora
    from trainkit.checkpoints import final_checkpoint_dir
    from trainkit.data import build_datasets, make_collator
    from trainkit.env_overrides import describe
    from trainkit.loop import (Checkpointer, add_to_interval, announce_best, base_run_info, evaluate_loss, fault_steps, finish_run,
                               interval_means, is_due, new_interval, optimizer_step, prepare_run_dir,
                               record_evaluation, record_failure, register_adapter_state_hooks, report_nonfinite,
                               resume_training_state, tracker_config, training_record, watch_preemption)
    from trainkit.models import load_model
    from trainkit.moe import RouterStats
    from trainkit.patches.peft import quiet_known_warnings
    from trainkit.runlog import RunLog
    from trainkit.schedules import build_scheduler
    from trainkit.tokenizer import load_tokenizer

    quiet_known_warnings()  # the one warning users cannot act on (trainkit.patches.peft)
    paths, train_cfg, opt_cfg, log_cfg = cfg["paths"], cfg["training"], cfg["optimization"], cfg["logging"]
    accelerator = Accelerator(
        log_with=log_cfg["report_to"] or None,
        project_dir=str(run_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=train_cfg["seed"]),
    )
    is_main = accelerator.is_main_process

    def say(msg: str) -> None:
        accelerator.print(f"[train_qlora] {msg}")

    prepare_run_dir(run_dir, resume_from, is_main, say)
    accelerator.wait_for_everyone()
    runlog = RunLog(run_dir, is_main)
    if env_applied:
        say(describe(env_applied))
    step = 0  # optimizer steps done; read by the error handler below
    preemption = watch_preemption(runlog, train_cfg, lambda: step)

    try:
        # ------------------------------------------------------------ tokenizer, data
        set_seed(train_cfg["seed"])
        tokenizer = load_tokenizer(cfg)
        with accelerator.main_process_first():
            train_ds, val_ds, data_info = build_datasets(cfg, tokenizer)
        say(f"data: {data_info}")
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
        say(f"{model_info.get('summary', model_info)}")
        set_seed(train_cfg["seed"])  # LoRA init independent of how much randomness loading used
        model = apply_lora(model, cfg["lora"])
        trainable = [p for p in model.parameters() if p.requires_grad]
        say(f"trainable parameters: {sum(p.numel() for p in trainable):,}")
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
        load_adapter = register_adapter_state_hooks(accelerator)

        def save_adapter(directory: Path) -> None:
            accelerator.unwrap_model(model).save_pretrained(directory)
            tokenizer.save_pretrained(directory)

        checkpointer = Checkpointer(accelerator, run_dir, runlog, log_cfg, cfg["memory"]["save_optimizer_state"],
                                    save_adapter, params_to_check=trainable, run_config=cfg)
        best_dir = Path(paths["best_adapter_dir"] or run_dir / "best-adapter")

        # ------------------------------------------------------------ state of the loop
        state = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "tokens_seen": 0, "best_metric": None,
                 "best_step": None, "metric_value": None, "metric_step": None, "nonfinite_streak": 0,
                 "interval": new_interval("aux"), "router_counts": None}
        if resume_from is not None:
            resume_training_state(accelerator, resume_from, state, runlog, lambda d: load_adapter([model], d), say,
                                  checkpointer, scheduler)
            if router_stats is not None:  # counts since the last snapshot before the checkpoint
                router_stats.restore_pending_counts(state["router_counts"], accelerator.device, is_main)
        step = state["step"]

        runlog.update_run_info(**base_run_info(accelerator, "train_qlora.py", cfg, total_steps, resume_from,
                                               model=model_info, data=data_info, env_overrides=env_applied))
        if resume_from is None:
            runlog.event(0, "start", f"training {total_steps} steps on {accelerator.num_processes} process(es)",
                         total_steps=total_steps, world_size=accelerator.num_processes)
        accelerator.init_trackers(paths["run_name"], config=tracker_config(cfg))

        # ------------------------------------------------------------ evaluation
        def run_evaluation() -> None:
            result = evaluate_loss(model, val_loader, accelerator, train_cfg["max_eval_batches"])
            is_best = record_evaluation(runlog, state, result, log_cfg, f"eval_loss {result['eval_loss']:.4f}")
            accelerator.log({"eval/loss": result["eval_loss"], "eval/perplexity": result["perplexity"]}, step=state["step"])
            say(f"step {state['step']}: eval_loss {result['eval_loss']:.4f} perplexity {result['perplexity']:.2f}")
            if is_best:
                checkpointer.save_best(best_dir)
                announce_best(runlog, state, log_cfg["metric_for_best"], best_dir)

        nan_steps = fault_steps()

        # ------------------------------------------------------------ the loop
        model.train()
        progress = tqdm(total=total_steps, initial=state["step"], disable=not (is_main and log_cfg["progress_bar"]),
                        desc="train", unit="step", dynamic_ncols=True)
        stop_reason = "finished"
        device = accelerator.device
        preemption.arm()
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
                    if state["step"] + 1 in nan_steps:
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
                # One all-reduce and one host sync per optimizer step: sums of [loss, tokens, aux loss,
                # stop-signal flags], so every rank agrees on stopping after the same step.
                aux_mean = torch.stack(micro_aux).mean() if micro_aux else torch.zeros((), device=device)
                local = torch.stack([torch.stack(micro_losses).double().mean(), step_tokens.double(), aux_mean.double(),
                                     preemption.flag(device)])
                loss_sum, tokens_all, aux_sum, stop_votes = accelerator.reduce(local, "sum").tolist()
                step_loss, step_aux = loss_sum / accelerator.num_processes, aux_sum / accelerator.num_processes
                tokens_all = int(tokens_all)
                finite, grad_norm, lr = optimizer_step(accelerator, optimizer, scheduler, trainable,
                                                       opt_cfg["max_grad_norm"], step_loss)
                state["nonfinite_streak"] = 0 if finite else state["nonfinite_streak"] + 1
                state["step"] += 1
                step = state["step"]
                state["tokens_seen"] += tokens_all
                progress.update(1)
                add_to_interval(state["interval"], finite, tokens_all, time.time() - step_started,
                                loss=step_loss, aux=step_aux)
                if not finite:
                    report_nonfinite(runlog, state, step_loss, grad_norm, say)
                    if state["nonfinite_streak"] >= train_cfg["max_consecutive_nonfinite"]:
                        stop_reason = "nan_limit"
                if stop_votes and stop_reason == "finished" and step < total_steps:
                    stop_reason = "preempted"  # SIGTERM/SIGINT: checkpoint this step below, then stop

                # ---- log
                if is_due(step, log_cfg["log_interval"], total_steps):
                    record = training_record(state, state["interval"], total_steps=total_steps,
                                             steps_per_epoch=steps_per_epoch, lr=lr, grad_norm=grad_norm, device=device)
                    record["router_aux_loss"] = interval_means(state["interval"])["aux"] if router_stats else None
                    runlog.write("training", record)
                    accelerator.log({f"train/{k}": v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}, step=step)
                    if record["loss"] is not None:
                        progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_sec']:.0f}")
                    state["interval"] = new_interval("aux")

                if router_stats is not None and step % log_cfg["expert_stats_interval"] == 0:
                    router_stats.load_counts(accelerator.reduce(router_stats.counts_tensor(), "sum"))
                    runlog.write("experts", {"step": step, **router_stats.snapshot(reset=True)})

                # ---- evaluate, checkpoint
                if val_loader is not None and step % log_cfg["eval_interval"] == 0:
                    run_evaluation()
                if (step % log_cfg["checkpoint_interval"] == 0 or stop_reason == "preempted") and step < total_steps:
                    if router_stats is not None:
                        state["router_counts"] = router_stats.pending_counts(lambda t: accelerator.reduce(t, "sum"), device)
                    checkpointer.save(run_dir / f"checkpoint-{step}", state, total_steps=total_steps)
                    checkpointer.apply_retention(step)

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
            checkpointer.save(final, state, total_steps=total_steps)
            say(f"done: {state['step']} steps, final adapter in {final}")
        elif stop_reason == "nan_limit":
            say(f"stopped after {state['nonfinite_streak']} consecutive non-finite steps (training.max_consecutive_nonfinite)")
        code = finish_run(runlog, state["step"], stop_reason)
        accelerator.end_training()
        return code

    except BaseException as exc:
        record_failure(runlog, step, exc)
        raise


if __name__ == "__main__":
    run_main(main)

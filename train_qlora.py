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

import time
from pathlib import Path

from trainkit.cli import build_parser, run_main
from trainkit.config import ConfigError, load_script_config
from trainkit.config.qlora import QLoRAConfig
from trainkit.loop import resolve_resume
from trainkit.preflight import check_model_config


def main() -> int:
    # ---------------------------------------------------------------- config (no heavy imports yet)
    args = build_parser(__doc__.splitlines()[0], "training_config.yaml").parse_args()
    cfg, env_applied = load_script_config(args.config, args.overrides, QLoRAConfig, "train_qlora.py")
    resume_from = resolve_resume(args, cfg)
    # hub id, positions, adapter targets: from the model's config, before data or weights load
    check_model_config(cfg, lengths={"training.max_seq_length": cfg.training.max_seq_length},
                       target_modules=cfg.lora.target_modules)

    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed

    from trainkit.adapters import apply_lora
    from trainkit.expert_lora import describe_expert_lora, refuse_sharded_experts
    from trainkit.data import build_datasets, make_collator
    from trainkit.env_overrides import describe
    from trainkit.evaluation import eval_loader, evaluate_loss
    from trainkit.loop import (accumulation_position, adapter_loader, deepspeed_accumulates, describe_sharding, gradient_sync,
                               is_sharded, pretrained_saver, seeded_loader, training_length)
    from trainkit.models import apply_activation_checkpointing, describe_activation_checkpointing, load_model
    from trainkit.moe import RouterStats
    from trainkit.quantization import base_weight_bytes, refuse_4bit_under_zero3
    from trainkit.patches.bitsandbytes import shardable_4bit_weights
    from trainkit.patches.peft import quiet_known_warnings
    from trainkit.patches.torch import allow_frozen_integer_params_in_fsdp2
    from trainkit.schedules import build_optimizer, build_scheduler
    from trainkit.tokenizer import load_tokenizer
    from trainkit.train_state import EpochTrainState, Interval
    from trainkit.training_run import TrainingRun

    quiet_known_warnings()  # the one warning users cannot act on (trainkit.patches.peft)
    train_cfg, opt_cfg, log_cfg = cfg.training, cfg.optimization, cfg.logging
    seed, micro_bs, accum = train_cfg.seed, opt_cfg.micro_batch_size, opt_cfg.gradient_accumulation_steps
    accelerator = Accelerator(log_with=log_cfg.report_to or None, project_dir=str(cfg.run_dir),
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed))
    device = accelerator.device
    refuse_4bit_under_zero3(accelerator, cfg.quantization.load_in_4bit)

    with TrainingRun(accelerator, cfg, "train_qlora.py", resume_from) as run:
        if env_applied:
            run.say(describe(env_applied))
        # ------------------------------------------------------------ tokenizer, data
        set_seed(seed)
        tokenizer = load_tokenizer(cfg)
        with accelerator.main_process_first():
            train_ds, val_ds, data_info = build_datasets(cfg, tokenizer)
        run.say(f"data: {data_info}")
        collate = make_collator(tokenizer)
        train_loader = seeded_loader(train_ds, micro_bs, seed, shuffle=True, collate_fn=collate,
                                     num_workers=cfg.memory.dataloader_num_workers)
        # this process's share of the validation rows, not padded with repeated rows (eval_loader)
        val_loader = (eval_loader(val_ds, micro_bs, accelerator, train_cfg.max_eval_batches, collate_fn=collate)
                      if len(val_ds) else None)

        # ------------------------------------------------------------ model: 4-bit base + LoRA
        model, model_info = load_model(cfg, device, tokenizer, cfg.quantization.compute_dtype, cfg.quantization)
        for note in [model_info["summary"], *model_info.get("notes", [])]:
            run.say(note)
        set_seed(seed)  # LoRA init independent of how much randomness loading used
        model = apply_lora(model, cfg.lora)
        refuse_sharded_experts(accelerator, model.trainkit_lora_info)
        if (note := describe_expert_lora(model.trainkit_lora_info)) is not None:
            run.say(note)
        trainable = [p for p in model.parameters() if p.requires_grad]
        run.say(f"trainable parameters: {sum(p.numel() for p in trainable):,}")
        # before RouterStats: the probe forward of `auto` must not count as routed tokens
        model_info["activation_checkpointing"] = apply_activation_checkpointing(
            model, cfg.memory.gradient_checkpointing, device=device, tokens=micro_bs * train_cfg.max_seq_length,
            trainable=trainable, budget_gib=cfg.memory.activation_memory_budget_gib)
        run.say(describe_activation_checkpointing(model_info["activation_checkpointing"]))
        router_stats = RouterStats(model) if model_info.get("is_moe") else None
        aux_coef = float(getattr(model.config, "router_aux_loss_coef", 0.0) or 0.0) if router_stats else 0.0

        optimizer = build_optimizer(trainable, opt_cfg, device)
        uses_deepspeed = deepspeed_accumulates(accelerator, micro_bs, accum, opt_cfg.max_grad_norm)
        model_info["base_weight_bytes"] = base_bytes_whole = base_weight_bytes(model)
        if is_sharded(accelerator):  # FSDP shards the 4-bit base too (trainkit.patches.bitsandbytes, .torch)
            shardable_4bit_weights(model)
            allow_frozen_integer_params_in_fsdp2()
        model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
        trainable = [p for p in model.parameters() if p.requires_grad]  # FSDP replaced them with its shards
        if is_sharded(accelerator):
            model_info["sharding"] = describe_sharding(model, accelerator, base_bytes_whole)
            run.say(model_info["sharding"]["summary"])

        batches_per_epoch = len(train_loader)
        if batches_per_epoch == 0:
            raise ConfigError(f"paths.data_path: no training batches (train examples: {len(train_ds)})")
        steps_per_epoch, total_steps = training_length(batches_per_epoch, accum, train_cfg)
        # Stepped by hand once per optimizer step (prepared, accelerate would step it once per
        # process) and saved through register_for_checkpointing.
        scheduler = build_scheduler(optimizer, opt_cfg, total_steps)
        accelerator.register_for_checkpointing(scheduler)
        run.make_checkpointer(pretrained_saver(accelerator.unwrap_model(model), tokenizer),
                              adapter_loader(accelerator, model), trainable, model=model, optimizer=optimizer)
        best_dir = Path(cfg.paths.best_adapter_dir or run.run_dir / "best-adapter")

        state = EpochTrainState(interval=Interval(("aux",)))
        run.resume(state, scheduler)
        if router_stats is not None and resume_from is not None:  # counts since the last snapshot before the checkpoint
            router_stats.restore_pending_counts(state.router_counts, device, run.is_main)
        run.begin(state, total_steps, model=model_info, data=data_info, env_overrides=env_applied)

        def evaluate() -> None:
            result = evaluate_loss(model, val_loader, accelerator)
            run.record_evaluation(state, result, f"eval_loss {result['eval_loss']:.4f} perplexity {result['perplexity']:.2f}",
                                  best_dir, {"eval/loss": result["eval_loss"], "eval/perplexity": result["perplexity"]})

        # ------------------------------------------------------------ the loop
        model.train()
        stop_reason = "finished"
        while state.step < total_steps and stop_reason == "finished":
            train_loader.set_epoch(state.epoch)
            skip = state.batches_in_epoch
            micro_losses, micro_aux, step_tokens = [], [], torch.zeros((), device=device, dtype=torch.long)
            step_started = time.time()
            for batch_index, batch in enumerate(accelerator.skip_first_batches(train_loader, skip) if skip else train_loader,
                                                start=skip):
                micro_in_step, is_step_end = accumulation_position(batch_index, accum, batches_per_epoch)
                with gradient_sync(accelerator, model, is_step_end):
                    outputs = model(**batch)
                    # DeepSpeed divides by its gradient_accumulation_steps itself.
                    accelerator.backward(outputs.loss if uses_deepspeed else outputs.loss / micro_in_step)
                aux = getattr(outputs, "aux_loss", None)  # MoE: reported apart from the LM loss
                micro_losses.append((outputs.loss - aux_coef * aux).detach() if aux is not None else outputs.loss.detach())
                if aux is not None:
                    micro_aux.append(aux.detach().float())
                step_tokens += batch["attention_mask"].sum()  # stays on device: no sync per micro batch
                state.batches_in_epoch = batch_index + 1
                if not is_step_end:
                    continue

                # ---- optimizer step (skipped when the loss or gradients are not finite)
                aux_mean = torch.stack(micro_aux).mean() if micro_aux else torch.zeros((), device=device)
                (loss_sum, tokens, aux_sum), stop_requested = run.reduce_step(
                    [torch.stack(micro_losses).double().mean(), step_tokens.double(), aux_mean.double()])
                n = accelerator.num_processes
                result = run.end_step(state, optimizer, scheduler, trainable, loss_sum / n, int(tokens),
                                      time.time() - step_started, stop_requested, aux=aux_sum / n)
                stop_reason, step = result.stop_reason, result.step

                # ---- log, router statistics, evaluate, checkpoint
                if run.log_due(step):
                    record = run.training_record(state, result, steps_per_epoch)
                    record["router_aux_loss"] = state.interval.means()["aux"] if router_stats else None
                    run.write_training(state, record, loss=".4f", lr=".2e", tokens_per_sec=".0f")
                if router_stats is not None and step % log_cfg.expert_stats_interval == 0:
                    router_stats.load_counts(accelerator.reduce(router_stats.counts_tensor(), "sum"))
                    run.runlog.write("experts", {"step": step, **router_stats.snapshot(reset=True)})
                if val_loader is not None and run.eval_due(step):
                    evaluate()
                if run.checkpoint_due(result):
                    if router_stats is not None:
                        state.router_counts = router_stats.pending_counts(lambda t: accelerator.reduce(t, "sum"), device)
                    run.save_checkpoint(state)
                if run.should_stop(result):
                    break
                micro_losses, micro_aux, step_tokens = [], [], torch.zeros((), device=device, dtype=torch.long)
                step_started = time.time()
            else:  # the epoch ran out
                state.next_epoch()

        if stop_reason == "finished":
            run.save_final(state, evaluate if val_loader is not None else None)
        return run.finish(state, stop_reason)


if __name__ == "__main__":
    run_main(main)

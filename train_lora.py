#!/usr/bin/env python
"""LoRA / DoRA / rsLoRA / PiSSA fine-tuning of GLA and HF causal LMs on tasks, evaluated by generation.

    accelerate launch train_lora.py --config configs/gla_lora_sst2.yaml [--resume | --resume_from PATH] [section.key=value ...]
    HP_PEFT_R=16 HP_LR=3e-4 HP_DATA=glue-tvt_mrpc python train_lora.py --config ...   # env overrides still work
    ./launch_training.sh --config configs/gla_lora_sst2.yaml

Reads top to bottom: config (+ HP_* environment overrides) -> task data (GLUE, SAMSum, Spider, DART)
-> tokenizer -> model (GLA from flash-linear-attention, with a pure-PyTorch backend on CPU, or any HF
causal LM) + adapters -> accelerate.prepare -> loop (forward, backward, step; log, evaluate by
`.generate()`, checkpoint) -> test-split evaluation of the best adapter -> final save. The run
directory is the one train_qlora.py writes (trainkit/runlog.py), so the dashboard shows these runs.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import NamedTuple

from trainkit.cli import build_parser, run_main
from trainkit.config import ConfigError, load_script_config
from trainkit.config.lora import LoRAConfig
from trainkit.env_overrides import describe
from trainkit.loop import resolve_resume
from trainkit.preflight import check_model_config, position_limit
from trainkit.tasks import get_task
from trainkit.runtime import resolve_dtype



class TaskData(NamedTuple):
    tokenizer: object
    splits: dict          # split name -> [trainkit.tasks.Example]
    eval_splits: list     # the validation splits evaluated during training
    test_splits: list     # the test splits scored at the end (none when they are the validation again)
    train_rows: list      # tokenized prompt + target rows (trainkit.data.tokenize_prompt_target)
    val_rows: list
    max_new_tokens: int   # generation.max_length, or derived from the training targets when unset
    info: dict            # run.json `data`


def load_task_data(cfg, task, say, position_limit: int | None) -> TaskData:
    """The task's splits (trainkit.tasks: local folder or HF datasets), the tokenizer, the training
    and validation rows tokenized as prompt + target, and the number of new tokens to generate
    (generation.max_length, else from the training targets, capped by the model's `position_limit`).
    task.max_eval_samples caps the validation splits only; the test splits keep every example unless
    task.max_test_samples says otherwise."""
    from trainkit.data import IGNORE_INDEX, target_token_ids, tokenize_prompt_target
    from trainkit.generation import max_new_tokens_from_data
    from trainkit.tasks import TaskDataError
    from trainkit.tasks.base import cap_splits, distinct_test_splits
    from trainkit.tokenizer import load_tokenizer

    task_cfg = cfg.task
    try:
        splits = task.load(local_dir=task_cfg.local_dir, seed=cfg.training.seed, cache_dir=cfg.paths.cache_dir,
                           local_files_only=cfg.model.local_files_only, max_train=task_cfg.max_train_samples)
    except TaskDataError as e:
        raise ConfigError(f"task.local_dir: {e}") from None
    test_splits = distinct_test_splits(splits)  # before the caps: compared with the whole validation split
    splits = cap_splits(splits, max_eval=task_cfg.max_eval_samples, max_test=task_cfg.max_test_samples)
    tokenizer = load_tokenizer(cfg)
    if tokenizer.pad_token_id is None:  # generation pads with eos when the tokenizer has no pad token
        tokenizer.pad_token = tokenizer.eos_token

    def rows(examples):
        return tokenize_prompt_target([e.prompt for e in examples], [e.target for e in examples], tokenizer,
                                      task_cfg.max_source_length, task_cfg.max_target_length,
                                      cuts=[e.cut for e in examples])

    train_rows = rows(splits["train"])
    if not train_rows:
        raise ConfigError(f"task.name: {task.name} has no training examples")
    cut_targets = sum(r["_truncated_target"] for r in train_rows)
    if cut_targets:  # the model never sees the end of those answers (nor learns to stop)
        say(f"warning: {cut_targets} of {len(train_rows)} training targets (+ eos) are longer than "
            f"task.max_target_length={task_cfg.max_target_length} tokens and were cut")
    cut_prompts = sum(r["_truncated_prompt"] for r in train_rows)
    if cut_prompts:  # cut as the evaluation cuts them (trainkit.data.fit_prompt)
        say(f"warning: {cut_prompts} of {len(train_rows)} training prompts are longer than "
            f"task.max_source_length={task_cfg.max_source_length} tokens and were cut (from the part of the prompt "
            f"{task.name} lets go)")
    gen_cfg = cfg.generation
    if gen_cfg.max_length is not None:
        max_new_tokens, how = gen_cfg.max_length, "generation.max_length"
    else:
        # as trained: target tokens + eos within max_target_length (the loss-carrying labels)
        trained = [sum(x != IGNORE_INDEX for x in r["labels"]) for r in train_rows]
        labels = ([min(len(ids), task_cfg.max_target_length) for ids in target_token_ids(tokenizer, task.label_targets)]
                  if task.kind == "classification" else None)
        room = position_limit - task_cfg.max_source_length if position_limit else None
        max_new_tokens, how = max_new_tokens_from_data(trained, labels, room)
        if gen_cfg.min_length > max_new_tokens:
            max_new_tokens, how = gen_cfg.min_length, how + f", raised to generation.min_length={gen_cfg.min_length}"
    if gen_cfg.enabled:
        say(f"generation: up to {max_new_tokens} new tokens ({how})")
    eval_splits = [s for s in task.eval_splits if splits.get(s)]
    info = {"task": task.name, "kind": task.kind, **{f"{k}_examples": len(v) for k, v in splits.items()},
            "eval_splits": eval_splits, "test_splits": test_splits, "truncated_train_prompts": cut_prompts,
            "truncated_train_targets": cut_targets, "max_new_tokens": max_new_tokens, "max_new_tokens_from": how}
    say(f"data: {info}")
    return TaskData(tokenizer, splits, eval_splits, test_splits, train_rows,
                    [r for s in eval_splits for r in rows(splits[s])], max_new_tokens, info)


def dataloader_options(memory, collate) -> dict:
    """DataLoader arguments from the memory section (workers, pinned memory on GPU, prefetch)."""
    import torch

    options = dict(num_workers=memory.dataloader_num_workers, collate_fn=collate,
                   pin_memory=memory.dataloader_pin_memory and torch.cuda.is_available())
    if memory.dataloader_num_workers:
        options.update(persistent_workers=memory.dataloader_persistent_workers,
                       prefetch_factor=memory.dataloader_prefetch_factor)
    return options


def main() -> int:
    # ---------------------------------------------------------------- config (no heavy imports yet)
    args = build_parser(__doc__.splitlines()[0], "configs/gla_lora_sst2.yaml").parse_args()
    cfg, env_applied = load_script_config(args.config, args.overrides, LoRAConfig, "train_lora.py")
    task = get_task(cfg.task.name)  # a known task (checked with the config)
    resume_from = resolve_resume(args, cfg)
    # hub id, positions, adapter targets: from the model's config, before data or weights load
    model_config = check_model_config(cfg, lengths={"task.max_source_length + task.max_target_length":
                                                    cfg.task.max_source_length + cfg.task.max_target_length},
                                      target_modules=cfg.lora.target_modules)

    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed

    from trainkit.adapters import apply_lora
    from trainkit.expert_lora import describe_expert_lora, refuse_sharded_experts
    from trainkit.data import make_collator
    from trainkit.evaluation import TaskEvaluator, eval_loader, evaluate_loss
    from trainkit.generation import GenerationSettings, check_generate_support
    from trainkit.gla import guard_adapter_paths
    from trainkit.loop import (accumulation_position, adapter_loader, gradient_sync, pretrained_saver, seeded_loader,
                               training_length)
    from trainkit.models import apply_activation_checkpointing, describe_activation_checkpointing, load_model
    from trainkit.patches.peft import quiet_known_warnings
    from trainkit.fileio import write_json_atomic
    from trainkit.schedules import build_optimizer, build_scheduler
    from trainkit.tasks.official import TASK_SCORE
    from trainkit.train_state import EpochTrainState
    from trainkit.training_run import TrainingRun

    quiet_known_warnings()  # the one warning users cannot act on (trainkit.patches.peft)
    train_cfg, opt_cfg, log_cfg, task_cfg, gen_cfg = cfg.training, cfg.optimization, cfg.logging, cfg.task, cfg.generation
    seed, micro_bs, accum = train_cfg.seed, opt_cfg.micro_batch_size, opt_cfg.gradient_accumulation_steps
    # fp16 base weights need loss scaling: accelerate's fp16 mixed precision brings the GradScaler.
    base_dtype, _ = resolve_dtype(cfg.model.dtype, "cuda" if torch.cuda.is_available() else "cpu")
    accelerator = Accelerator(
        log_with=log_cfg.report_to or None, project_dir=str(cfg.run_dir),
        mixed_precision="fp16" if base_dtype == "float16" and torch.cuda.is_available() else None,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed))
    device = accelerator.device

    with TrainingRun(accelerator, cfg, "train_lora.py", resume_from) as run:
        run.say(describe(env_applied))
        # ------------------------------------------------------------ task data, tokenizer
        set_seed(seed)
        data = load_task_data(cfg, task, run.say, position_limit(model_config)[0])
        tokenizer, splits, eval_splits = data.tokenizer, data.splits, data.eval_splits
        loader_options = dataloader_options(cfg.memory, make_collator(tokenizer))
        train_loader = seeded_loader(data.train_rows, micro_bs, seed, shuffle=True, **loader_options)
        # this process's share of the validation rows, not padded with repeated rows (eval_loader)
        val_loader = (eval_loader(data.val_rows, micro_bs, accelerator, train_cfg.max_eval_batches, **loader_options)
                      if data.val_rows else None)

        # ------------------------------------------------------------ model + adapters
        model, model_info = load_model(cfg, device, tokenizer, cfg.model.dtype)
        for note in [model_info["summary"], *model_info.get("notes", [])]:
            run.say(note)
        set_seed(seed)  # adapter init independent of how much randomness loading used
        model = apply_lora(model, cfg.lora)
        refuse_sharded_experts(accelerator, model.trainkit_lora_info)
        if (note := describe_expert_lora(model.trainkit_lora_info)) is not None:
            run.say(note)
        if model_info["family"] == "gla":  # fused fla paths that would bypass an adapter get unfused ones
            for note in guard_adapter_paths(model):
                run.say(note)
        trainable = [p for p in model.parameters() if p.requires_grad]
        init = cfg.lora.init_lora_weights
        run.say(f"adapters: {cfg.lora.variant} init {init if isinstance(init, str) else 'default'} on {model.trainkit_lora_info['target_modules']}, "
                f"trainable parameters: {sum(p.numel() for p in trainable):,}")
        model_info["activation_checkpointing"] = apply_activation_checkpointing(
            model, cfg.memory.gradient_checkpointing, device=device,
            tokens=micro_bs * (task_cfg.max_source_length + task_cfg.max_target_length), trainable=trainable,
            budget_gib=cfg.memory.activation_memory_budget_gib)
        run.say(describe_activation_checkpointing(model_info["activation_checkpointing"]))
        generation = GenerationSettings.from_config(gen_cfg, task_cfg.max_source_length, data.max_new_tokens)
        if gen_cfg.enabled:
            check_generate_support(model, generation)  # fail now, not at the first evaluation

        optimizer = build_optimizer(trainable, opt_cfg, device)
        model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
        trainable = [p for p in model.parameters() if p.requires_grad]  # FSDP replaced them with its shards
        batches_per_epoch = len(train_loader)
        steps_per_epoch, total_steps = training_length(batches_per_epoch, accum, train_cfg)
        scheduler = build_scheduler(optimizer, opt_cfg, total_steps)  # stepped by hand, once per optimizer step
        accelerator.register_for_checkpointing(scheduler)
        load_adapter = adapter_loader(accelerator, model)
        run.make_checkpointer(pretrained_saver(accelerator.unwrap_model(model), tokenizer), load_adapter, trainable,
                              model=model, optimizer=optimizer)
        best_dir = Path(cfg.paths.best_adapter_dir or run.run_dir / "best-adapter")

        state = EpochTrainState()
        run.resume(state, scheduler)
        run.begin(state, total_steps, model=model_info, data=data.info, task=task.name, env_overrides=env_applied)
        evaluator = TaskEvaluator(accelerator, model, tokenizer, task, splits, generation,
                                  label_likelihood=task_cfg.label_likelihood,
                                  label_normalization=task_cfg.label_likelihood_normalization, test_splits=data.test_splits,
                                  batch_size=gen_cfg.batch_size,
                                  run_dir=run.run_dir, progress=log_cfg.progress_bar, say=run.say, verbose=log_cfg.verbose)
        scores_by_generation = gen_cfg.enabled or task_cfg.label_likelihood

        def evaluate() -> None:
            result = {"task": task.name, "split": "validation"}
            if val_loader is not None:
                result.update(evaluate_loss(model, val_loader, accelerator))
            if scores_by_generation:
                result.update(evaluator.score(eval_splits, f"step-{state.step}"))
            summary = " ".join(f"{k} {result[k]:.4f}" for k in ("eval_loss", TASK_SCORE) if result.get(k) is not None)
            run.record_evaluation(state, result, summary, best_dir)

        # ------------------------------------------------------------ the loop
        model.train()
        stop_reason = "finished"
        while state.step < total_steps and stop_reason == "finished":
            train_loader.set_epoch(state.epoch)
            skip = state.batches_in_epoch
            micro_losses, step_tokens = [], torch.zeros((), device=device, dtype=torch.long)
            step_started = time.time()
            for batch_index, batch in enumerate(accelerator.skip_first_batches(train_loader, skip) if skip else train_loader,
                                                start=skip):
                micro_in_step, is_step_end = accumulation_position(batch_index, accum, batches_per_epoch)
                with gradient_sync(accelerator, model, is_step_end):
                    with accelerator.autocast():
                        loss = model(**batch).loss
                    accelerator.backward(loss / micro_in_step)
                micro_losses.append(loss.detach())
                step_tokens += batch["attention_mask"].sum()
                state.batches_in_epoch = batch_index + 1
                if not is_step_end:
                    continue

                # ---- optimizer step (skipped when the loss or gradients are not finite)
                (loss_sum, tokens), stop_requested = run.reduce_step([torch.stack(micro_losses).double().mean(),
                                                                      step_tokens.double()])
                result = run.end_step(state, optimizer, scheduler, trainable, loss_sum / accelerator.num_processes,
                                      int(tokens), time.time() - step_started, stop_requested)
                stop_reason, step = result.stop_reason, result.step

                # ---- log, evaluate, checkpoint
                if run.log_due(step):
                    run.write_training(state, run.training_record(state, result, steps_per_epoch), loss=".4f", lr=".2e")
                if run.eval_due(step):
                    evaluate()
                if run.checkpoint_due(result):
                    run.save_checkpoint(state)
                if run.should_stop(result):
                    break
                micro_losses, step_tokens, step_started = [], torch.zeros((), device=device, dtype=torch.long), time.time()
            else:  # the epoch ran out
                state.next_epoch()

        # ------------------------------------------------------------ final evaluation and save, then the test split
        if stop_reason == "finished":
            final = run.save_final(state, evaluate)
            if task_cfg.evaluate_test and scores_by_generation:
                evaluator.evaluate_test(run, state, load_adapter, best_dir)
            if run.is_main:
                write_json_atomic(run.run_dir / "results.json", {
                    "task": task.name, "metric": log_cfg.metric_for_best, "best_metric": state.best_metric,
                    "best_step": state.best_step, "final_checkpoint": str(final), "best_adapter": str(best_dir)})
            run.say(f"best {log_cfg.metric_for_best} {state.best_metric} at step {state.best_step}")
        return run.finish(state, stop_reason)


if __name__ == "__main__":
    run_main(main)

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

import math
import time
from pathlib import Path
from typing import NamedTuple

from trainkit.cli import build_parser, run_main
from trainkit.config import (BASE_SCHEMA, ConfigError, Key, check_paths, fraction, load_config, merge_schema,
                             non_negative, positive)
from trainkit.loop import check_trackers, resolve_resume
from trainkit.preflight import check_model_config
from trainkit.resume_check import COMMON_MUTABLE
from trainkit.runtime import DTYPE_CHOICES, resolve_dtype

LORA_SCHEMA = merge_schema(BASE_SCHEMA, {
    "paths": {
        "data_path": Key(str, None, "unused by train_lora.py (the data comes from task.name / task.local_dir)", nullable=True),
    },
    "model": {
        "dtype": Key(str, "auto", "dtype of the base weights (HP_PREC: auto | bf16 | fp16 | fp32); auto: bfloat16 on GPUs with native bf16, float16 on older GPUs, float32 on CPUs; adapters train in fp32",
                     choices=DTYPE_CHOICES),
        "attn_mode": Key(str, "chunk", "GLA kernel (fla): chunk; the removed fused_chunk maps to chunk",
                         choices=("chunk", "fused_chunk", "fused_recurrent")),
        "fused_swiglu": Key(bool, False, "GLA: fla's fused SwiGLU MLP (GLA_USE_FUSED_SWIGLU); adapters on down_proj still get gradients"),
    },
    "lora": {
        "r": Key(int, 16, "adapter rank", check=positive),
        "alpha": Key(float, 32.0, "scaling numerator (scale = alpha / r, or alpha / sqrt(r) for rslora)", check=positive),
        "dropout": Key(float, 0.05, "dropout on the adapter input", check=fraction),
        "target_modules": Key((str, list), "auto", "'auto' (preset by model family: gla, llama, ...), a preset name, or a list of module names"),
        "variant": Key(str, "lora", "adapter variant", choices=("lora", "dora", "rslora")),
        "init": Key(str, "default", "adapter init: default (PEFT's: A random, B zero), gaussian, pissa, pissa_niter_N (fast SVD), olora"),
        "pissa_fast": Key(bool, False, "with init pissa: fast randomized SVD (pissa_niter_<pissa_niter>) instead of a full SVD"),
        "pissa_niter": Key(int, 4, "subspace iterations of the fast PiSSA SVD", check=positive),
        "bias": Key(str, "none", "train biases", choices=("none", "all", "lora_only")),
        "modules_to_save": Key(list, [], "modules trained in full and saved with the adapter (e.g. [lm_head] for a random-init model)"),
    },
    "task": {
        "name": Key(str, "sst2", "GLUE task (cola sst2 mrpc qqp stsb mnli qnli rte wnli; glue-tvt_<task> or <task>-tvt: "
                                 "train/validation/test carved from the public splits), samsum, spider, dart (HP_DATA)"),
        "local_dir": Key(str, None, "local copy of the data (else GLUE_LOCAL_DIR / SAMSUM_LOCAL_DIR / SPIDER_LOCAL_DIR / DART_LOCAL_DIR, else HF datasets)", nullable=True),
        "max_train_samples": Key(int, None, "cap on training examples", nullable=True, check=positive),
        "max_eval_samples": Key(int, None, "cap on examples per evaluation split (generation is the slow part)", nullable=True, check=positive),
        "max_source_length": Key(int, 512, "prompt tokens kept (the beginning is cut, not the end)", check=positive),
        "max_target_length": Key(int, 128, "target tokens kept for training", check=positive),
        "label_likelihood": Key(bool, False, "classification: score by the likelihood of each label instead of generating"),
        "evaluate_test": Key(bool, True, "at the end, evaluate the best adapter on the test split (when it differs from validation)"),
    },
    "generation": {
        "enabled": Key(bool, True, "evaluate by .generate() (EVAL_GEN); false: eval_loss only"),
        "max_length": Key(int, 32, "new tokens to generate (EVAL_GEN_MAX_LENGTH); with use_max_new_tokens false: prompt + new tokens", check=positive),
        "min_length": Key(int, 0, "minimum new tokens (EVAL_GEN_MIN_LENGTH); same meaning switch", check=non_negative),
        "use_max_new_tokens": Key(bool, True, "lengths count new tokens (max_new_tokens); false: legacy total length (GLA_USE_MAX_NEW_TOKENS=0)"),
        "num_beams": Key(int, 1, "beam search width (EVAL_GEN_NUM_BEAMS)", check=positive),
        "batch_size": Key(int, 16, "prompts per generate() call", check=positive),
        "force_left_pad": Key(bool, True, "left-pad prompts (GLA_FORCE_LEFT_PAD): batched generation needs it"),
    },
    "logging": {
        "metric_for_best": Key(str, "task_score", "eval_log field that ranks checkpoints: task_score (mean of the task's official metrics) or eval_loss"),
        "greater_is_better": Key(bool, True, "true when a larger metric_for_best is better (false for eval_loss)"),
        "verbose": Key(bool, False, "print backends, shapes and sample predictions (GLA_VERBOSE)"),
    },
    "memory": {
        "dataloader_prefetch_factor": Key(int, None, "batches prefetched per worker (with workers)", nullable=True, check=positive),
        "dataloader_pin_memory": Key(bool, True, "pinned host memory for batches on GPU"),
        "dataloader_persistent_workers": Key(bool, False, "keep DataLoader workers between epochs"),
        "eval_accumulation_steps": Key(int, None, "accepted for earlier launchers (EVAL_ACCUMULATION_STEPS); no effect: predictions are gathered once per split", nullable=True, check=positive),
    },
})
SCHEMA = LORA_SCHEMA  # launch_training.sh validates configs against it before launching
# Keys that may change on resume (README, "Resume and config changes"); the others must match the checkpoint's.
# Generation settings that decide the task score stay: the best so far was ranked by them.
RESUME_MUTABLE = COMMON_MUTABLE | {"lora.dropout", "model.dtype", "model.attn_mode", "model.fused_swiglu",
                                   "task.max_eval_samples", "task.evaluate_test", "generation.batch_size",
                                   "generation.force_left_pad", "logging.verbose"}


def env_config_overrides() -> tuple[list[str], dict]:
    """HP_* and friends from the environment (launch_training.sh applies them too when it validates)."""
    from trainkit.env_overrides import env_overrides
    return env_overrides(schema=LORA_SCHEMA, script="train_lora.py")


def check_config(cfg: dict) -> None:
    """Everything about the config that can be checked before any model loads (the launcher calls it too)."""
    check_paths(cfg, path_keys=(), model_hint="a hub id or local path (e.g. fla-hub/gla-1.3B-100B)")
    lora = cfg["lora"]
    init = lora["init"]
    if not (init in ("default", "gaussian", "pissa", "olora") or (init.startswith("pissa_niter_") and init[12:].isdigit())):
        raise ConfigError(f"lora.init: {init!r} is not one of default, gaussian, pissa, pissa_niter_<N>, olora")
    if init.startswith("pissa") and lora["variant"] == "dora":
        raise ConfigError("lora.init: PiSSA init cannot be combined with lora.variant dora")
    metric = cfg["logging"]["metric_for_best"]
    if metric not in ("task_score", "eval_loss"):
        from trainkit.tasks.official import official_metrics
        try:
            allowed = official_metrics(cfg["task"]["name"])
        except KeyError:
            allowed = ()
        if metric not in allowed:
            raise ConfigError(f"logging.metric_for_best: {metric!r} is not task_score, eval_loss or one of {', '.join(allowed)}")
    if metric == "task_score" and not cfg["generation"]["enabled"] and not cfg["task"]["label_likelihood"]:
        raise ConfigError("logging.metric_for_best: task_score needs generation.enabled or task.label_likelihood (or use eval_loss)")
    if metric == "eval_loss" and cfg["logging"]["greater_is_better"]:
        raise ConfigError("logging.greater_is_better: must be false when metric_for_best is eval_loss")
    check_trackers(cfg["logging"]["report_to"])


def lora_init(lora_cfg: dict):
    """PEFT's init_lora_weights value for lora.init / lora.pissa_fast."""
    init = lora_cfg["init"]
    if init == "default":
        return True
    if init == "pissa" and lora_cfg["pissa_fast"]:
        return f"pissa_niter_{lora_cfg['pissa_niter']}"
    return init


class TaskData(NamedTuple):
    tokenizer: object
    splits: dict          # split name -> [trainkit.tasks.Example]
    eval_splits: list     # the validation splits evaluated during training
    train_rows: list      # tokenized prompt + target rows (trainkit.data.tokenize_prompt_target)
    val_rows: list
    info: dict            # run.json `data`


def load_task_data(cfg, task, say) -> TaskData:
    """The task's splits (trainkit.tasks: local folder or HF datasets), the tokenizer, and the
    training and validation rows tokenized as prompt + target."""
    from trainkit.data import tokenize_prompt_target
    from trainkit.tasks import TaskDataError
    from trainkit.tokenizer import load_tokenizer

    task_cfg = cfg["task"]
    try:
        splits = task.load(local_dir=task_cfg["local_dir"], seed=cfg["training"]["seed"], cache_dir=cfg["paths"]["cache_dir"],
                           local_files_only=cfg["model"]["local_files_only"], max_train=task_cfg["max_train_samples"],
                           max_eval=task_cfg["max_eval_samples"])
    except TaskDataError as e:
        raise ConfigError(f"task.local_dir: {e}") from None
    tokenizer = load_tokenizer(cfg)
    if tokenizer.pad_token_id is None:  # generation pads with eos when the tokenizer has no pad token
        tokenizer.pad_token = tokenizer.eos_token

    def rows(examples):
        return tokenize_prompt_target([e.prompt for e in examples], [e.target for e in examples], tokenizer,
                                      task_cfg["max_source_length"], task_cfg["max_target_length"])

    train_rows = rows(splits["train"])
    if not train_rows:
        raise ConfigError(f"task.name: {task.name} has no training examples")
    cut_targets = sum(r["_truncated_target"] for r in train_rows)
    if cut_targets:  # the model never sees the end of those answers (nor learns to stop)
        say(f"warning: {cut_targets} of {len(train_rows)} training targets (+ eos) are longer than "
            f"task.max_target_length={task_cfg['max_target_length']} tokens and were cut")
    eval_splits = [s for s in task.eval_splits if splits.get(s)]
    info = {"task": task.name, "kind": task.kind, **{f"{k}_examples": len(v) for k, v in splits.items()},
            "eval_splits": eval_splits, "truncated_train_prompts": sum(r["_truncated_prompt"] for r in train_rows),
            "truncated_train_targets": cut_targets}
    say(f"data: {info}")
    return TaskData(tokenizer, splits, eval_splits, train_rows, [r for s in eval_splits for r in rows(splits[s])], info)


def main() -> int:
    # ---------------------------------------------------------------- config (no heavy imports yet)
    args = build_parser(__doc__.splitlines()[0], "configs/gla_lora_sst2.yaml").parse_args()
    env_overrides, env_applied = env_config_overrides()
    cfg = load_config(args.config, env_overrides + args.overrides, LORA_SCHEMA)  # YAML < environment < command line
    check_config(cfg)
    from trainkit.env_overrides import describe
    from trainkit.tasks import get_task
    try:
        task = get_task(cfg["task"]["name"])
    except (KeyError, ValueError) as e:
        raise ConfigError(f"task.name: {e.args[0] if e.args else e}") from None
    if cfg["task"]["label_likelihood"] and task.kind != "classification":
        raise ConfigError(f"task.label_likelihood: {task.name} is not a classification task")
    resume_from = resolve_resume(args, Path(cfg["run_dir"]), cfg, RESUME_MUTABLE)
    # hub id, positions, adapter targets: from the model's config, before data or weights load
    check_model_config(cfg, lengths={"task.max_source_length + task.max_target_length":
                                     cfg["task"]["max_source_length"] + cfg["task"]["max_target_length"]},
                       target_modules=cfg["lora"]["target_modules"])

    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed

    from trainkit.adapters import apply_lora
    from trainkit.data import make_collator
    from trainkit.evaluation import TaskEvaluator, evaluate_loss
    from trainkit.generation import GenerationSettings, check_generate_support
    from trainkit.gla import guard_adapter_paths
    from trainkit.loop import accumulation_position, adapter_loader, gradient_sync, pretrained_saver, seeded_loader
    from trainkit.models import load_model
    from trainkit.patches.peft import quiet_known_warnings
    from trainkit.fileio import write_json_atomic
    from trainkit.schedules import build_optimizer, build_scheduler
    from trainkit.tasks.official import TASK_SCORE
    from trainkit.train_state import EpochTrainState
    from trainkit.training_run import TrainingRun

    quiet_known_warnings()  # the one warning users cannot act on (trainkit.patches.peft)
    train_cfg, opt_cfg, log_cfg, task_cfg, gen_cfg, mem_cfg = (
        cfg["training"], cfg["optimization"], cfg["logging"], cfg["task"], cfg["generation"], cfg["memory"])
    seed, micro_bs, accum = train_cfg["seed"], opt_cfg["micro_batch_size"], opt_cfg["gradient_accumulation_steps"]
    # fp16 base weights need loss scaling: accelerate's fp16 mixed precision brings the GradScaler.
    base_dtype, _ = resolve_dtype(cfg["model"]["dtype"], "cuda" if torch.cuda.is_available() else "cpu")
    accelerator = Accelerator(
        log_with=log_cfg["report_to"] or None, project_dir=cfg["run_dir"],
        mixed_precision="fp16" if base_dtype == "float16" and torch.cuda.is_available() else None,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed))
    device = accelerator.device

    with TrainingRun(accelerator, cfg, "train_lora.py", resume_from) as run:
        run.say(describe(env_applied))
        # ------------------------------------------------------------ task data, tokenizer
        set_seed(seed)
        data = load_task_data(cfg, task, run.say)
        tokenizer, splits, eval_splits = data.tokenizer, data.splits, data.eval_splits
        loader_options = dict(num_workers=mem_cfg["dataloader_num_workers"], collate_fn=make_collator(tokenizer),
                              pin_memory=mem_cfg["dataloader_pin_memory"] and torch.cuda.is_available())
        if mem_cfg["dataloader_num_workers"]:
            loader_options.update(persistent_workers=mem_cfg["dataloader_persistent_workers"],
                                  prefetch_factor=mem_cfg["dataloader_prefetch_factor"])
        train_loader = seeded_loader(data.train_rows, micro_bs, seed, shuffle=True, **loader_options)
        val_loader = seeded_loader(data.val_rows, micro_bs, seed, shuffle=False, **loader_options) if data.val_rows else None

        # ------------------------------------------------------------ model + adapters
        model_cfg = {**cfg, "quantization": {"load_in_4bit": False, "compute_dtype": cfg["model"]["dtype"]}}
        model, model_info = load_model(model_cfg, device, tokenizer)
        for note in [model_info["summary"], *model_info.get("notes", [])]:
            run.say(note)
        set_seed(seed)  # adapter init independent of how much randomness loading used
        lora_cfg = {**cfg["lora"], "init": lora_init(cfg["lora"])}
        model = apply_lora(model, lora_cfg)
        if model_info["family"] == "gla":  # fused fla paths that would bypass an adapter get unfused ones
            for note in guard_adapter_paths(model):
                run.say(note)
        trainable = [p for p in model.parameters() if p.requires_grad]
        init_name = lora_cfg["init"] if isinstance(lora_cfg["init"], str) else "default"
        run.say(f"adapters: {cfg['lora']['variant']} init {init_name} on {model.trainkit_lora_info['target_modules']}, "
                f"trainable parameters: {sum(p.numel() for p in trainable):,}")
        generation = GenerationSettings.from_config(gen_cfg, task_cfg["max_source_length"])
        if gen_cfg["enabled"]:
            check_generate_support(model, generation)  # fail now, not at the first evaluation

        optimizer = build_optimizer(trainable, opt_cfg, device)
        model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
        val_loader = accelerator.prepare(val_loader) if val_loader is not None else None
        batches_per_epoch = len(train_loader)
        steps_per_epoch = math.ceil(batches_per_epoch / accum)
        total_steps = train_cfg["max_steps"] if train_cfg["max_steps"] > 0 else math.ceil(train_cfg["epochs"] * steps_per_epoch)
        scheduler = build_scheduler(optimizer, opt_cfg, total_steps)  # stepped by hand, once per optimizer step
        accelerator.register_for_checkpointing(scheduler)
        load_adapter = adapter_loader(accelerator, model)
        run.make_checkpointer(pretrained_saver(accelerator.unwrap_model(model), tokenizer), load_adapter, trainable)
        best_dir = Path(cfg["paths"]["best_adapter_dir"] or run.run_dir / "best-adapter")

        state = EpochTrainState()
        run.resume(state, scheduler)
        run.begin(state, total_steps, model=model_info, data=data.info, task=task.name, env_overrides=env_applied)
        evaluator = TaskEvaluator(accelerator, model, tokenizer, task, splits, generation,
                                  label_likelihood=task_cfg["label_likelihood"], batch_size=gen_cfg["batch_size"],
                                  run_dir=run.run_dir, progress=log_cfg["progress_bar"], say=run.say, verbose=log_cfg["verbose"])
        scores_by_generation = gen_cfg["enabled"] or task_cfg["label_likelihood"]

        def evaluate() -> None:
            result = {"task": task.name, "split": "validation"}
            if val_loader is not None:
                result.update(evaluate_loss(model, val_loader, accelerator, train_cfg["max_eval_batches"]))
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
            if task_cfg["evaluate_test"] and scores_by_generation:
                evaluator.evaluate_test(run, state, load_adapter, best_dir)
            if run.is_main:
                write_json_atomic(run.run_dir / "results.json", {
                    "task": task.name, "metric": log_cfg["metric_for_best"], "best_metric": state.best_metric,
                    "best_step": state.best_step, "final_checkpoint": str(final), "best_adapter": str(best_dir)})
            run.say(f"best {log_cfg['metric_for_best']} {state.best_metric} at step {state.best_step}")
        return run.finish(state, stop_reason)


if __name__ == "__main__":
    run_main(main)

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

import contextlib
import json
import math
import time
from pathlib import Path

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
PREDICTIONS_DIR = "predictions"


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


def main() -> int:
    # ---------------------------------------------------------------- config (no heavy imports yet)
    args = build_parser(__doc__.splitlines()[0], "configs/gla_lora_sst2.yaml").parse_args()
    env_overrides, env_applied = env_config_overrides()
    cfg = load_config(args.config, env_overrides + args.overrides, LORA_SCHEMA)  # YAML < environment < command line
    check_config(cfg)
    from trainkit.env_overrides import describe
    from trainkit.tasks import TaskDataError, get_task
    try:
        task = get_task(cfg["task"]["name"])
    except (KeyError, ValueError) as e:
        raise ConfigError(f"task.name: {e.args[0] if e.args else e}") from None
    if cfg["task"]["label_likelihood"] and task.kind != "classification":
        raise ConfigError(f"task.label_likelihood: {task.name} is not a classification task")
    run_dir = Path(cfg["run_dir"])
    resume_from = resolve_resume(args, run_dir, cfg, RESUME_MUTABLE)
    # hub id, positions, adapter targets: from the model's config, before data or weights load
    check_model_config(cfg, lengths={"task.max_source_length + task.max_target_length":
                                   cfg["task"]["max_source_length"] + cfg["task"]["max_target_length"]},
                       target_modules=cfg["lora"]["target_modules"])

    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, broadcast_object_list, gather_object, set_seed
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from trainkit.adapters import apply_lora
    from trainkit.checkpoints import final_checkpoint_dir
    from trainkit.data import make_collator, tokenize_prompt_target
    from trainkit.generation import GenerationSettings, check_generate_support, generate_texts, score_label_likelihood
    from trainkit.loop import (Checkpointer, add_to_interval, announce_best, base_run_info, evaluate_loss, fault_steps,
                               finish_run, is_due, new_interval, optimizer_step, prepare_run_dir,
                               record_evaluation, record_failure, register_adapter_state_hooks, report_nonfinite,
                               resume_training_state, tracker_config, training_record, watch_preemption)
    from trainkit.gla import guard_adapter_paths
    from trainkit.models import load_model
    from trainkit.patches.peft import quiet_known_warnings
    from trainkit.runlog import RunLog, write_json_atomic
    from trainkit.schedules import build_scheduler
    from trainkit.tasks.official import TASK_SCORE, selection_score
    from trainkit.tokenizer import load_tokenizer

    quiet_known_warnings()  # the one warning users cannot act on (trainkit.patches.peft)
    paths, train_cfg, opt_cfg, log_cfg, task_cfg, gen_cfg, mem_cfg = (
        cfg["paths"], cfg["training"], cfg["optimization"], cfg["logging"], cfg["task"], cfg["generation"], cfg["memory"])
    # fp16 base weights need loss scaling: accelerate's fp16 mixed precision brings the GradScaler.
    base_dtype, _ = resolve_dtype(cfg["model"]["dtype"], "cuda" if torch.cuda.is_available() else "cpu")
    mixed_precision = "fp16" if base_dtype == "float16" and torch.cuda.is_available() else None
    accelerator = Accelerator(
        log_with=log_cfg["report_to"] or None, project_dir=str(run_dir), mixed_precision=mixed_precision,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=train_cfg["seed"]),
    )
    is_main = accelerator.is_main_process
    verbose = log_cfg["verbose"]

    def say(msg: str) -> None:
        accelerator.print(f"[train_lora] {msg}")

    say(describe(env_applied))
    prepare_run_dir(run_dir, resume_from, is_main, say)
    accelerator.wait_for_everyone()
    runlog = RunLog(run_dir, is_main)
    step = 0
    preemption = watch_preemption(runlog, train_cfg, lambda: step)

    try:
        # ------------------------------------------------------------ task data, tokenizer
        set_seed(train_cfg["seed"])
        try:
            splits = task.load(local_dir=task_cfg["local_dir"], seed=train_cfg["seed"], cache_dir=paths["cache_dir"],
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
        cut_prompts = sum(r["_truncated_prompt"] for r in train_rows)
        if cut_targets:  # the model never sees the end of those answers (nor learns to stop)
            say(f"warning: {cut_targets} of {len(train_rows)} training targets (+ eos) are longer than "
                f"task.max_target_length={task_cfg['max_target_length']} tokens and were cut")
        eval_splits = [s for s in task.eval_splits if splits.get(s)]
        val_rows = [r for s in eval_splits for r in rows(splits[s])]
        data_info = {"task": task.name, "kind": task.kind, **{f"{k}_examples": len(v) for k, v in splits.items()},
                     "eval_splits": eval_splits, "truncated_train_prompts": cut_prompts,
                     "truncated_train_targets": cut_targets}
        say(f"data: {data_info}")
        collate = make_collator(tokenizer)
        micro_bs, accum = opt_cfg["micro_batch_size"], opt_cfg["gradient_accumulation_steps"]
        workers = mem_cfg["dataloader_num_workers"]
        loader_kwargs = dict(num_workers=workers, collate_fn=collate,
                             pin_memory=mem_cfg["dataloader_pin_memory"] and torch.cuda.is_available())
        if workers:
            loader_kwargs.update(persistent_workers=mem_cfg["dataloader_persistent_workers"],
                                 prefetch_factor=mem_cfg["dataloader_prefetch_factor"])
        # Own generators (see train_qlora.py): exact resume needs data order independent of the global RNG.
        train_loader = DataLoader(train_rows, batch_size=micro_bs, shuffle=True,
                                  generator=torch.Generator().manual_seed(train_cfg["seed"]), **loader_kwargs)
        val_loader = DataLoader(val_rows, batch_size=micro_bs, shuffle=False, **loader_kwargs) if val_rows else None

        # ------------------------------------------------------------ model + adapters
        model_cfg = {**cfg, "quantization": {"load_in_4bit": False, "compute_dtype": cfg["model"]["dtype"]}}
        model, model_info = load_model(model_cfg, accelerator.device, tokenizer)
        say(model_info["summary"])
        for note in model_info.get("notes", []):
            say(note)
        set_seed(train_cfg["seed"])  # adapter init independent of how much randomness loading used
        lora_cfg = {**cfg["lora"], "init": lora_init(cfg["lora"])}
        model = apply_lora(model, lora_cfg)
        if model_info["family"] == "gla":  # fused fla paths that would bypass an adapter get unfused ones
            for note in guard_adapter_paths(model):
                say(note)
        trainable = [p for p in model.parameters() if p.requires_grad]
        init_name = lora_cfg["init"] if isinstance(lora_cfg["init"], str) else "default"
        say(f"adapters: {cfg['lora']['variant']} init {init_name} on {model.trainkit_lora_info['target_modules']}, "
            f"trainable parameters: {sum(p.numel() for p in trainable):,}")

        gen_settings = GenerationSettings(
            max_new_tokens=gen_cfg["max_length"], min_new_tokens=gen_cfg["min_length"], num_beams=gen_cfg["num_beams"],
            batch_size=gen_cfg["batch_size"], use_max_new_tokens=gen_cfg["use_max_new_tokens"],
            max_length=None if gen_cfg["use_max_new_tokens"] else gen_cfg["max_length"],
            min_length=None if gen_cfg["use_max_new_tokens"] else gen_cfg["min_length"],
            max_source_length=task_cfg["max_source_length"], force_left_pad=gen_cfg["force_left_pad"])
        if gen_cfg["enabled"]:
            check_generate_support(model, gen_settings)  # fail now, not at the first evaluation

        optimizer = torch.optim.AdamW(
            trainable, lr=opt_cfg["learning_rate"], betas=(opt_cfg["adam_beta1"], opt_cfg["adam_beta2"]),
            eps=opt_cfg["adam_epsilon"], weight_decay=opt_cfg["weight_decay"], fused=accelerator.device.type == "cuda")
        model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
        if val_loader is not None:
            val_loader = accelerator.prepare(val_loader)

        batches_per_epoch = len(train_loader)
        steps_per_epoch = math.ceil(batches_per_epoch / accum)
        total_steps = train_cfg["max_steps"] if train_cfg["max_steps"] > 0 else math.ceil(train_cfg["epochs"] * steps_per_epoch)
        scheduler = build_scheduler(optimizer, opt_cfg, total_steps)  # stepped by hand, once per optimizer step
        accelerator.register_for_checkpointing(scheduler)
        load_adapter = register_adapter_state_hooks(accelerator)

        def save_adapter(directory: Path) -> None:
            accelerator.unwrap_model(model).save_pretrained(directory)
            tokenizer.save_pretrained(directory)

        checkpointer = Checkpointer(accelerator, run_dir, runlog, log_cfg, mem_cfg["save_optimizer_state"],
                                    save_adapter, params_to_check=trainable, run_config=cfg)
        best_dir = Path(paths["best_adapter_dir"] or run_dir / "best-adapter")

        # ------------------------------------------------------------ state of the loop
        state = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "tokens_seen": 0, "best_metric": None,
                 "best_step": None, "metric_value": None, "metric_step": None, "nonfinite_streak": 0,
                 "interval": new_interval()}
        if resume_from is not None:
            resume_training_state(accelerator, resume_from, state, runlog, lambda d: load_adapter([model], d), say,
                                  checkpointer, scheduler)
        step = state["step"]
        runlog.update_run_info(**base_run_info(accelerator, "train_lora.py", cfg, total_steps, resume_from,
                                               model=model_info, data=data_info, task=task.name,
                                               env_overrides=env_applied))
        if resume_from is None:
            runlog.event(0, "start", f"training {total_steps} steps on {accelerator.num_processes} process(es)",
                         total_steps=total_steps, world_size=accelerator.num_processes)
        accelerator.init_trackers(paths["run_name"], config=tracker_config(cfg))

        # ------------------------------------------------------------ evaluation by generation
        def predict(split: str) -> tuple[list[str], float]:
            """Predictions for every example of `split` (each process takes every world_size-th one)."""
            examples = splits[split]
            mine = list(range(accelerator.process_index, len(examples), accelerator.num_processes))
            prompts = [examples[i].prompt for i in mine]
            unwrapped = accelerator.unwrap_model(model)
            started = time.time()
            if task_cfg["label_likelihood"]:
                picks = score_label_likelihood(unwrapped, tokenizer, prompts, task.label_words,
                                               batch_size=gen_cfg["batch_size"], device=accelerator.device)
                texts = [task.label_words[i] for i in picks]
            else:
                texts = generate_texts(unwrapped, tokenizer, prompts, gen_settings, device=accelerator.device,
                                       progress=is_main and log_cfg["progress_bar"]).texts
            pairs = gather_object(list(zip(mine, texts)))
            by_index = dict(pairs)
            return [by_index[i] for i in range(len(examples))], time.time() - started

        def score_splits(split_names: list[str], tag: str) -> dict:
            """Generate, score and save predictions; returns flat metrics (+ task_score) on every process."""
            result: dict = {}
            for split in split_names:
                texts, seconds = predict(split)
                if is_main:
                    metrics = task.score(texts, splits[split], split=split)
                    result.update({k: v for k, v in metrics.items() if k != "num_examples"})
                    result[f"{split}_examples"] = metrics.get("num_examples", len(texts))
                    result["generation_seconds"] = round(result.get("generation_seconds", 0) + seconds, 3)
                    out = run_dir / PREDICTIONS_DIR / f"{tag}-{split}.jsonl"
                    out.parent.mkdir(parents=True, exist_ok=True)
                    tmp = out.with_name(out.name + ".tmp")
                    with open(tmp, "w") as f:
                        for example, text in zip(splits[split], texts):
                            f.write(json.dumps({"prompt": example.prompt, "prediction": text,
                                                "references": example.references, **example.meta}, default=str) + "\n")
                    tmp.replace(out)
                    result.setdefault("predictions", []).append(str(out.relative_to(run_dir)))
                    if verbose and texts:
                        say(f"{split} sample: {splits[split][0].prompt[-80:]!r} -> {texts[0]!r} (ref {splits[split][0].references[:1]})")
            if is_main:
                result[TASK_SCORE] = selection_score(task.name, result)
            return broadcast_object_list([result])[0]

        def run_evaluation() -> None:
            result = {"task": task.name, "split": "validation"}
            if val_loader is not None:
                result.update(evaluate_loss(model, val_loader, accelerator, train_cfg["max_eval_batches"]))
            if gen_cfg["enabled"] or task_cfg["label_likelihood"]:
                result.update(score_splits(eval_splits, f"step-{state['step']}"))
            summary = " ".join(f"{k} {result[k]:.4f}" for k in ("eval_loss", TASK_SCORE) if result.get(k) is not None)
            is_best = record_evaluation(runlog, state, result, log_cfg, summary)
            accelerator.log({f"eval/{k}": v for k, v in result.items() if isinstance(v, (int, float))}, step=state["step"])
            say(f"step {state['step']}: {summary}")
            if is_best:
                checkpointer.save_best(best_dir)
                announce_best(runlog, state, log_cfg["metric_for_best"], best_dir)

        def run_test_evaluation() -> None:
            """The best adapter on the test split: one eval_log line with split 'test' at the last step.
            Called once, after the final checkpoint is saved."""
            test_splits = [s for s in splits if s.startswith("test") and splits[s]]
            if not test_splits or not (gen_cfg["enabled"] or task_cfg["label_likelihood"]):
                return
            def prompts(name):
                return [e.prompt for e in splits.get(name) or []]
            if all(prompts(s) == prompts(s.replace("test", "validation")) for s in test_splits):
                return  # test is the validation split (plain GLUE, hidden test labels): already scored
            # the last use of the model (after the final save): the best adapter can replace the final one
            if state["best_step"] is not None and (best_dir / "adapter_model.safetensors").exists():
                load_adapter([model], str(best_dir))
            result = {"task": task.name, "split": "test", "evaluated_step": state["best_step"],
                      **score_splits(test_splits, f"test-best-step-{state['best_step']}")}
            runlog.write("eval", {"step": state["step"], **result, "metric": log_cfg["metric_for_best"],
                                  "metric_value": None, "is_best": False})
            say(f"test ({', '.join(test_splits)}) with the adapter of step {state['best_step']}: {TASK_SCORE} {result.get(TASK_SCORE)}")

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
            micro_losses, step_tokens = [], torch.zeros((), device=device, dtype=torch.long)
            step_started = time.time()
            for batch_index, batch in enumerate(loader, start=skip):
                group_start = (batch_index // accum) * accum
                micro_in_step = min(accum, batches_per_epoch - group_start)  # the epoch's last step may be short
                is_step_end = batch_index + 1 == group_start + micro_in_step
                with accelerator.no_sync(model) if not is_step_end else contextlib.nullcontext():
                    with accelerator.autocast():
                        loss = model(**batch).loss
                    if state["step"] + 1 in nan_steps:
                        loss = loss * float("nan")
                    accelerator.backward(loss / micro_in_step)
                micro_losses.append(loss.detach())
                step_tokens += batch["attention_mask"].sum()
                state["batches_in_epoch"] = batch_index + 1
                if not is_step_end:
                    continue

                # ---- optimizer step: one all-reduce of [loss, tokens, stop-signal flags], skipped when not finite
                local = torch.stack([torch.stack(micro_losses).double().mean(), step_tokens.double(), preemption.flag(device)])
                loss_sum, tokens_all, stop_votes = accelerator.reduce(local, "sum").tolist()
                step_loss, tokens_all = loss_sum / accelerator.num_processes, int(tokens_all)
                finite, grad_norm, lr = optimizer_step(accelerator, optimizer, scheduler, trainable,
                                                       opt_cfg["max_grad_norm"], step_loss)
                state["nonfinite_streak"] = 0 if finite else state["nonfinite_streak"] + 1
                state["step"] += 1
                step = state["step"]
                state["tokens_seen"] += tokens_all
                progress.update(1)
                add_to_interval(state["interval"], finite, tokens_all, time.time() - step_started, loss=step_loss)
                if not finite:
                    report_nonfinite(runlog, state, step_loss, grad_norm, say)
                    if state["nonfinite_streak"] >= train_cfg["max_consecutive_nonfinite"]:
                        stop_reason = "nan_limit"
                if stop_votes and stop_reason == "finished" and step < total_steps:
                    stop_reason = "preempted"  # SIGTERM/SIGINT: checkpoint this step below, then stop

                # ---- log, evaluate, checkpoint
                if is_due(step, log_cfg["log_interval"], total_steps):
                    record = training_record(state, state["interval"], total_steps=total_steps,
                                             steps_per_epoch=steps_per_epoch, lr=lr, grad_norm=grad_norm, device=device)
                    runlog.write("training", record)
                    accelerator.log({f"train/{k}": v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}, step=step)
                    if record["loss"] is not None:
                        progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}")
                    state["interval"] = new_interval()
                if step % log_cfg["eval_interval"] == 0:
                    run_evaluation()
                if (step % log_cfg["checkpoint_interval"] == 0 or stop_reason == "preempted") and step < total_steps:
                    checkpointer.save(run_dir / f"checkpoint-{step}", state, total_steps=total_steps)
                    checkpointer.apply_retention(step)

                micro_losses, step_tokens = [], torch.zeros((), device=device, dtype=torch.long)
                step_started = time.time()
                if state["step"] >= total_steps or stop_reason != "finished":
                    break
            else:  # the epoch ran out
                state["epoch"] += 1
                state["batches_in_epoch"] = 0
        progress.close()

        # ------------------------------------------------------------ final evaluation and save
        if stop_reason == "finished":
            if state["metric_step"] != state["step"]:
                run_evaluation()
            final = final_checkpoint_dir(run_dir, state["step"])
            checkpointer.save(final, state, total_steps=total_steps)
            if task_cfg["evaluate_test"]:
                run_test_evaluation()
            if is_main:
                write_json_atomic(run_dir / "results.json", {
                    "task": task.name, "metric": log_cfg["metric_for_best"], "best_metric": state["best_metric"],
                    "best_step": state["best_step"], "final_checkpoint": str(final), "best_adapter": str(best_dir)})
            say(f"done: {state['step']} steps; best {log_cfg['metric_for_best']} {state['best_metric']} at step "
                f"{state['best_step']}; final adapter in {final}")
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

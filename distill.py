#!/usr/bin/env python
"""Distil a transformer teacher into a linear-attention student (Llamba / MOHAWK style).

    accelerate launch distill.py --config configs/distill_tiny_mamba2.yaml [--resume | --resume_from PATH] [section.key=value ...]
    ./launch_training.sh --config configs/distill_tiny_mamba2.yaml

Reads top to bottom: config -> tokenizer -> frozen teacher (bf16, on `teacher.device`) -> student
built from the teacher (Discrete Mamba-2 or GLA mixers in place of attention, all other weights
copied; `student.attention_layers` keep softmax attention) -> packed text windows -> loop over
stages (1: pre-training text; 2, optional: instruction data): teacher forward (no grad), student
forward, KD loss computed in chunks over the tokens (trainkit.kd) so that no full tokens x vocab
logits exist, backward, AdamW + WSD -> log, evaluate, checkpoint -> final student saved with
save_pretrained (loads back with from_pretrained after `import trainkit.students`).
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

from trainkit.cli import build_parser, run_main
from trainkit.config import (BASE_SCHEMA, ConfigError, Key, check_paths, fraction, load_config, merge_schema,
                             non_negative, positive)
from trainkit.loop import check_trackers, resolve_resume
from trainkit.preflight import check_model_config
from trainkit.resume_check import COMMON_MUTABLE
from trainkit.runtime import DTYPE_CHOICES

MIXERS = ("discrete_mamba2", "gla")
DISTILL_SCHEMA = merge_schema(BASE_SCHEMA, {
    "paths": {
        "model_name_or_path": Key(str, None, "the TEACHER: hub id or local directory (e.g. meta-llama/Llama-3.1-8B-Instruct); null builds model.config", nullable=True),
        "data_path": Key(str, "data/distill/pretrain", "stage 1 text: JSONL / JSONL.gz file, directory or glob of shards, or an HF datasets id"),
        "eval_data_path": Key(str, None, "held-out text for evaluation (same forms); null: no evaluation", nullable=True),
    },
    "model": {
        "config": Key(dict, None, "HF config kwargs (with model_type) of a random-init TEACHER when paths.model_name_or_path is null", nullable=True),
    },
    "teacher": {
        "device": Key(str, "same", "'same' (the student's device) or a device for the frozen teacher, e.g. cuda:1"),
        "dtype": Key(str, "auto", "teacher weights dtype; auto: bfloat16 on GPUs with native bf16, float16 on older GPUs, float32 on CPUs", choices=DTYPE_CHOICES),
    },
    "student": {
        "mixer": Key(str, "discrete_mamba2", "linear-attention mixer replacing softmax attention", choices=MIXERS),
        "attention_layers": Key(list, [], "layer indices that keep the teacher's softmax attention (hybrid student)"),
        "init_from_teacher": Key(bool, True, "copy embeddings, norms, MLPs, lm_head and (where shapes allow) mixer projections from the teacher"),
        "freeze_mlp": Key(bool, False, "freeze every MLP (train mixers, norms, embeddings, head)"),
        "freeze_replaced_layers": Key(bool, False, "freeze the teacher attention layers kept by attention_layers"),
        "mixer_options": Key(dict, {}, "extra mixer hyperparameters (trainkit/students.py)"),
        "dtype": Key(str, "float32", "student master weights (bf16 compute comes from accelerate mixed precision)",
                     choices=("bfloat16", "float32")),
    },
    "distill": {
        "temperature": Key(float, 1.0, "softmax temperature T of both distributions (the KD loss is scaled by T^2)", check=positive),
        "top_k": Key(int, None, "keep only the teacher's top-k logits (renormalised) in the KD loss; null: full vocabulary", nullable=True, check=positive),
        "ce_weight": Key(float, 0.0, "loss = (1 - ce_weight) * KD + ce_weight * hard-label cross-entropy", check=lambda v: None if 0 <= v <= 1 else "must be in [0, 1]"),
        "chunk_size": Key(int, None, "tokens per chunk of the KD loss (extra memory ~ 3 x chunk_size x vocab x 4 bytes); null: automatic (1,024 at vocab 128,256)", nullable=True, check=positive),
        "loss": Key(str, "chunked", "chunked (memory-lean) or naive (full logits; the baseline)", choices=("chunked", "naive")),
    },
    "data": {
        "text_field": Key(str, "text", "field holding the text in rows of stage 1 data"),
        "dataset_config": Key(str, None, "HF datasets config name (e.g. sample-10BT for FineWeb-Edu)", nullable=True),
        "streaming": Key(bool, False, "stream HF datasets instead of downloading them whole"),
        "shuffle_buffer": Key(int, 0, "windows shuffled in a buffer of this size (0: in order)", check=non_negative),
        "estimate_rows": Key(int, 2000, "rows tokenized to estimate windows per epoch of large or streamed data", check=positive),
    },
    "stage2": {
        "enabled": Key(bool, False, "run stage 2 (instruction data) after stage 1"),
        "data_path": Key(str, None, "stage 2 data: `messages` or `prompt`/`response` rows (rendered with the chat template), or `text`", nullable=True),
        "data_split": Key(str, "train", "split when data_path is an HF datasets id"),
        "epochs": Key(float, 1.0, "passes over the stage 2 data: steps = tokens x epochs / tokens per step", check=positive),
        "max_steps": Key(int, -1, "stage 2 steps; -1: from tokens x epochs", check=lambda v: None if v > 0 or v == -1 else "must be > 0 or -1"),
        "learning_rate": Key(float, None, "stage 2 peak lr; null: optimization.learning_rate", nullable=True, check=positive),
    },
    "optimization": {
        "learning_rate": Key(float, 1e-3, "peak learning rate (stage 1)", check=positive),
        "lr_scheduler": Key(str, "wsd", "schedule of each stage: warmup, stable, decay", choices=("wsd", "cosine", "linear", "constant")),
        "warmup_ratio": Key(float, 0.02, "warmup as a fraction of each stage's steps", check=fraction),
        "decay_ratio": Key(float, 0.2, "wsd: fraction of each stage's steps in the final decay", check=fraction),
        "min_lr_ratio": Key(float, 0.1, "lr at the end of each stage's decay, as a fraction of the peak", check=fraction),
        "adam_beta1": Key(float, 0.9, "AdamW beta1", check=fraction),
        "adam_beta2": Key(float, 0.95, "AdamW beta2", check=fraction),
        "weight_decay": Key(float, 0.1, "AdamW weight decay (not on norms, biases, embeddings)", check=non_negative),
    },
    "training": {
        "max_seq_length": Key(int, 2048, "tokens per window (windows of max_seq_length + 1 give inputs and shifted labels)", check=positive),
    },
    "logging": {
        "metric_for_best": Key(str, "eval_kd_loss", "eval_log field that ranks checkpoints (eval_kd_loss, eval_loss, eval_top1_agreement)"),
        "greater_is_better": Key(bool, False, "true when a larger metric_for_best is better"),
    },
})
SCHEMA = DISTILL_SCHEMA  # launch_training.sh validates configs against it before launching
# Keys that may change on resume (README, "Resume and config changes"); the others must match the checkpoint's.
# Not the stage lengths (training.max_steps/epochs, stage2.max_steps/epochs, data.estimate_rows): the
# staged schedule runs on the global step, so a stage of another length shifts every later stage.
RESUME_MUTABLE = (COMMON_MUTABLE - {"training.epochs", "training.max_steps"}) | {
    "stage2.learning_rate", "teacher.device", "teacher.dtype", "distill.chunk_size", "distill.loss"}
KD_STATS = ("kd_loss", "ce_loss", "top1_agreement")  # per-step means logged besides the loss
EVAL_METRICS = {"eval_kd_loss": False, "eval_loss": False, "perplexity": False, "eval_top1_agreement": True}


def check_config(cfg: dict) -> None:
    """Everything about the config that can be checked before any model loads (the launcher calls it too)."""
    check_paths(cfg, path_keys=("data_path", "eval_data_path"), model_hint="the teacher (hub id or local path)")
    if cfg["stage2"]["enabled"] and not cfg["stage2"]["data_path"]:
        raise ConfigError("stage2.data_path: required when stage2.enabled is true")
    layers = cfg["student"]["attention_layers"]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
        raise ConfigError(f"student.attention_layers: expected non-negative layer indices, got {layers!r}")
    metric = cfg["logging"]["metric_for_best"]
    if metric not in EVAL_METRICS:
        raise ConfigError(f"logging.metric_for_best: {metric!r} is not one of {', '.join(EVAL_METRICS)}")
    if cfg["logging"]["greater_is_better"] != EVAL_METRICS[metric]:
        raise ConfigError(f"logging.greater_is_better: must be {str(EVAL_METRICS[metric]).lower()} for {metric}")
    if cfg["optimization"]["warmup_ratio"] + cfg["optimization"]["decay_ratio"] > 1:
        raise ConfigError("optimization.decay_ratio: warmup_ratio + decay_ratio must be <= 1")
    check_trackers(cfg["logging"]["report_to"])


def optimizer_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices, none on norms, biases, embeddings and scalar/vector mixer parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_student_kd(student, **kd_options):
    """The student with its KD loss as one module, so DDP sees the lm_head used by the chunked loss
    inside forward (accelerate.prepare wraps this module)."""
    import torch

    from trainkit.kd import chunked_kd_loss, naive_kd_loss

    class StudentKD(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.student = student

        def forward(self, input_ids, labels, teacher_hidden, teacher_head):
            hidden = self.student.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
            head = self.student.get_output_embeddings().weight
            options = {k: v for k, v in kd_options.items() if k != "loss"}
            if kd_options["loss"] == "naive":  # the full-logit baseline (benchmarks, debugging)
                options.pop("chunk_size", None)
                return naive_kd_loss(hidden.flatten(0, 1) @ head.T, teacher_hidden.flatten(0, 1) @ teacher_head.T,
                                     labels.flatten(), **options)
            return chunked_kd_loss(hidden.flatten(0, 1), head, teacher_hidden.flatten(0, 1), teacher_head,
                                   labels.flatten(), **options)

    return StudentKD()


def env_config_overrides() -> tuple[list[str], dict]:
    """HP_* and friends from the environment (trainkit.env_overrides; launch_training.sh applies them too)."""
    from trainkit.env_overrides import env_overrides
    return env_overrides(schema=DISTILL_SCHEMA, script="distill.py")


def main() -> int:
    # ---------------------------------------------------------------- config (no heavy imports yet)
    args = build_parser(__doc__.splitlines()[0], "configs/distill_tiny_mamba2.yaml").parse_args()
    env_overrides, env_applied = env_config_overrides()
    cfg = load_config(args.config, env_overrides + args.overrides, DISTILL_SCHEMA)  # YAML < environment < command line
    check_config(cfg)
    run_dir = Path(cfg["run_dir"])
    resume_from = resolve_resume(args, run_dir, cfg, RESUME_MUTABLE)
    # hub id, positions: from the model's config, before data or weights load
    check_model_config(cfg, lengths={"training.max_seq_length": cfg["training"]["max_seq_length"]})

    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from trainkit.checkpoints import final_checkpoint_dir
    from trainkit.env_overrides import describe
    from trainkit.models import enable_activation_checkpointing, load_frozen_model, load_weights_into
    from trainkit.loop import (Checkpointer, add_to_interval, announce_best, base_run_info, fault_steps, finish_run,
                               interval_means, is_due, new_interval, optimizer_step, prepare_run_dir,
                               record_evaluation, record_failure, report_nonfinite, resume_training_state,
                               tracker_config, training_record, watch_preemption)
    from trainkit.patches.peft import quiet_known_warnings
    from trainkit.runlog import RunLog
    from trainkit.schedules import build_staged_scheduler
    from trainkit.students import build_student, freeze
    from trainkit.text_windows import WindowStream, estimate_data
    from trainkit.tokenizer import load_tokenizer

    quiet_known_warnings()  # the one warning users cannot act on (trainkit.patches.peft)
    paths, train_cfg, opt_cfg, log_cfg, kd_cfg = (cfg["paths"], cfg["training"], cfg["optimization"],
                                                  cfg["logging"], cfg["distill"])
    accelerator = Accelerator(log_with=log_cfg["report_to"] or None, project_dir=str(run_dir))
    is_main = accelerator.is_main_process

    def say(msg: str) -> None:
        accelerator.print(f"[distill] {msg}")

    prepare_run_dir(run_dir, resume_from, is_main, say)
    accelerator.wait_for_everyone()
    runlog = RunLog(run_dir, is_main)
    if env_applied:
        say(describe(env_applied))
    step = 0
    preemption = watch_preemption(runlog, train_cfg, lambda: step)

    try:
        # ------------------------------------------------------------ tokenizer, teacher, student
        set_seed(train_cfg["seed"])
        tokenizer = load_tokenizer(cfg)
        device = accelerator.device
        teacher_device = device if cfg["teacher"]["device"] == "same" else torch.device(cfg["teacher"]["device"])
        teacher, teacher_info = load_frozen_model(cfg, teacher_device, tokenizer, dtype=cfg["teacher"]["dtype"])
        say(f"teacher: {teacher_info['summary']} on {teacher_device}")
        set_seed(train_cfg["seed"])  # student init independent of how much randomness loading used
        student, student_report = build_student(
            teacher, mixer=cfg["student"]["mixer"], attention_layers=cfg["student"]["attention_layers"],
            init_from_teacher=cfg["student"]["init_from_teacher"], dtype=getattr(torch, cfg["student"]["dtype"]),
            device=device, **cfg["student"]["mixer_options"])
        trainable_count = freeze(student, freeze_mlp=cfg["student"]["freeze_mlp"],
                                 freeze_replaced_layers=cfg["student"]["freeze_replaced_layers"],
                                 attention_layers=cfg["student"]["attention_layers"])
        if cfg["memory"]["gradient_checkpointing"]:
            enable_activation_checkpointing(student)
        student.train()
        say(f"student: {cfg['student']['mixer']} mixers, attention kept in layers {cfg['student']['attention_layers'] or 'none'}; "
            f"{student_report.get('summary', '')}; trainable parameters: {trainable_count:,}")
        # The teacher's lm_head is used inside the student's chunked loss: it must sit on the student's device.
        teacher_head = teacher.get_output_embeddings().weight.detach().to(device)
        kd_model = make_student_kd(student, temperature=kd_cfg["temperature"], top_k=kd_cfg["top_k"],
                             ce_weight=kd_cfg["ce_weight"], chunk_size=kd_cfg["chunk_size"], loss=kd_cfg["loss"])

        # ------------------------------------------------------------ data: packed windows, stages
        seq_len = train_cfg["max_seq_length"]
        micro_bs, accum = cfg["optimization"]["micro_batch_size"], cfg["optimization"]["gradient_accumulation_steps"]
        windows_per_step = micro_bs * accum * accelerator.num_processes
        data_cfg = cfg["data"]
        stage_sources = [{"path": paths["data_path"], "split": paths["data_split"], "name": data_cfg["dataset_config"],
                          "text_field": data_cfg["text_field"], "streaming": data_cfg["streaming"],
                          "cache_dir": paths["cache_dir"], "local_files_only": cfg["model"]["local_files_only"],
                          "key": "paths.data_path"}]
        if cfg["stage2"]["enabled"]:  # instruction rows (messages, prompt/response or text), rendered per row
            stage_sources.append({**stage_sources[0], "path": cfg["stage2"]["data_path"], "key": "stage2.data_path",
                                  "split": cfg["stage2"]["data_split"], "name": None, "text_field": None})
        stages = []
        for index, source in enumerate(stage_sources):
            data_estimate = estimate_data(source, tokenizer, seq_len, sample_rows=data_cfg["estimate_rows"])
            estimate = data_estimate.windows
            explicit = train_cfg["max_steps"] if index == 0 else cfg["stage2"]["max_steps"]
            epochs = train_cfg["epochs"] if index == 0 else cfg["stage2"]["epochs"]
            if explicit > 0:
                steps = explicit
            elif estimate:
                steps = max(1, math.ceil(estimate * epochs / windows_per_step))  # tokens x epochs / tokens per step
            else:
                raise ConfigError(f"{'training' if index == 0 else 'stage2'}.max_steps: the size of {source['path']} is unknown "
                                  "(streaming): set max_steps")
            lr = opt_cfg["learning_rate"] if index == 0 or cfg["stage2"]["learning_rate"] is None else cfg["stage2"]["learning_rate"]
            stages.append({"source": source, "steps": steps, "windows_per_epoch": estimate, "epochs": epochs, "lr": lr,
                           "empty_rows": data_estimate.empty_rows, "first_empty_row": data_estimate.first_empty_row})
            say(f"stage {index + 1}: {source['path']}: ~{estimate or '?'} windows of {seq_len + 1} tokens per epoch -> {steps} steps"
                + (f"; {data_estimate.empty_rows} rows of empty text left out (first: {data_estimate.first_empty_row})"
                   if data_estimate.empty_rows else ""))
        total_steps = sum(s["steps"] for s in stages)
        steps_per_epoch = (stages[0]["windows_per_epoch"] or windows_per_step) / windows_per_step

        eval_batches = []
        if paths["eval_data_path"]:
            eval_stream = WindowStream({**stage_sources[0], "path": paths["eval_data_path"], "key": "paths.eval_data_path"},
                                       tokenizer, seq_len, seed=0, rank=accelerator.process_index,
                                       world_size=accelerator.num_processes, epochs=1)
            limit = (train_cfg["max_eval_batches"] or 8) * micro_bs
            windows = [w for _, w in zip(range(limit), eval_stream)]
            eval_batches = [torch.stack(windows[i:i + micro_bs]) for i in range(0, len(windows), micro_bs)]

        # ------------------------------------------------------------ optimizer, schedule, checkpoints
        optimizer = torch.optim.AdamW(optimizer_groups(student, opt_cfg["weight_decay"]), lr=opt_cfg["learning_rate"],
                                      betas=(opt_cfg["adam_beta1"], opt_cfg["adam_beta2"]), eps=opt_cfg["adam_epsilon"],
                                      fused=device.type == "cuda")
        kd_model, optimizer = accelerator.prepare(kd_model, optimizer)
        scheduler = build_staged_scheduler(optimizer, opt_cfg, [(s["steps"], s["lr"] / opt_cfg["learning_rate"]) for s in stages])
        accelerator.register_for_checkpointing(scheduler)
        trainable = [p for p in student.parameters() if p.requires_grad]

        # Checkpoints hold the student in save_pretrained form (loads with from_pretrained), not a second copy.
        def save_hook(models, weights, output_dir):
            weights.clear()

        def load_hook(models, input_dir):
            load_weights_into(student, input_dir)
            models.clear()

        accelerator.register_save_state_pre_hook(save_hook)
        accelerator.register_load_state_pre_hook(load_hook)

        def save_student(directory: Path) -> None:
            student.save_pretrained(directory)
            tokenizer.save_pretrained(directory)

        checkpointer = Checkpointer(accelerator, run_dir, runlog, log_cfg, cfg["memory"]["save_optimizer_state"],
                                    save_student, params_to_check=trainable, run_config=cfg)
        best_dir = Path(paths["best_adapter_dir"] or run_dir / "best-student")

        # ------------------------------------------------------------ state of the loop
        state = {"step": 0, "stage": 0, "stage_step": 0, "data_state": None, "tokens_seen": 0, "best_metric": None,
                 "best_step": None, "metric_value": None, "metric_step": None, "nonfinite_streak": 0,
                 "interval": new_interval(*KD_STATS)}
        if resume_from is not None:
            resume_training_state(accelerator, resume_from, state, runlog, lambda d: load_weights_into(student, d), say,
                                  checkpointer, scheduler)
        step = state["step"]
        runlog.update_run_info(**base_run_info(
            accelerator, "distill.py", cfg, total_steps, resume_from,
            model={**teacher_info, "student": {k: v for k, v in student_report.items() if k not in ("copied", "initialised")}},
            data={"stages": [{k: v for k, v in s.items() if k != "source"} | {"path": s["source"]["path"]} for s in stages]},
            env_overrides=env_applied))
        if resume_from is None:
            runlog.event(0, "start", f"distilling {total_steps} steps in {len(stages)} stage(s) on {accelerator.num_processes} process(es)",
                         total_steps=total_steps, world_size=accelerator.num_processes)
        accelerator.init_trackers(paths["run_name"], config=tracker_config(cfg))

        def teacher_hidden(input_ids):
            with torch.no_grad():
                hidden = teacher.base_model(input_ids=input_ids.to(teacher_device), use_cache=False).last_hidden_state
            return hidden.to(device)

        def evaluate() -> dict:
            kd_model.eval()
            sums = torch.zeros(4, device=device, dtype=torch.float64)  # kd*tokens, ce*tokens, agree*tokens, tokens
            started = time.time()
            with torch.no_grad():
                for windows in eval_batches:
                    windows = windows.to(device)
                    inputs, labels = windows[:, :-1], windows[:, 1:]
                    with accelerator.autocast():
                        out = kd_model(inputs, labels, teacher_hidden(inputs), teacher_head)
                    n = torch.as_tensor(out.tokens, device=device, dtype=torch.float64)  # no host sync per batch
                    sums += torch.stack([out.kd_loss.double() * n, out.ce_loss.double() * n,
                                         out.top1_agreement.double() * n, n])
            kd_model.train()
            kd, ce, agree, tokens = accelerator.reduce(sums, "sum").tolist()
            tokens = max(tokens, 1)
            return {"eval_kd_loss": kd / tokens, "eval_loss": ce / tokens, "perplexity": math.exp(min(ce / tokens, 50)),
                    "eval_top1_agreement": agree / tokens, "eval_tokens": int(tokens), "eval_seconds": round(time.time() - started, 3)}

        def run_evaluation() -> None:
            result = evaluate()
            summary = f"eval_kd_loss {result['eval_kd_loss']:.4f} eval_loss {result['eval_loss']:.4f} top1 {result['eval_top1_agreement']:.3f}"
            is_best = record_evaluation(runlog, state, result, log_cfg, summary)
            accelerator.log({f"eval/{k}": v for k, v in result.items()}, step=state["step"])
            say(f"step {state['step']}: {summary}")
            if is_best:
                checkpointer.save_best(best_dir)
                announce_best(runlog, state, log_cfg["metric_for_best"], best_dir)

        nan_steps = fault_steps()

        # ------------------------------------------------------------ the loop: stages -> windows -> steps
        progress = tqdm(total=total_steps, initial=state["step"], disable=not (is_main and log_cfg["progress_bar"]),
                        desc="distill", unit="step", dynamic_ncols=True)
        stop_reason = "finished"
        preemption.arm()
        while state["stage"] < len(stages) and stop_reason == "finished":
            stage = stages[state["stage"]]
            stream = WindowStream(stage["source"], tokenizer, seq_len, seed=train_cfg["seed"] + state["stage"],
                                  rank=accelerator.process_index, world_size=accelerator.num_processes,
                                  shuffle_buffer=data_cfg["shuffle_buffer"])
            if state["data_state"] is not None:
                stream.load_state_dict(state["data_state"])  # exact continuation after a resume
            windows_iter = iter(stream)
            while state["stage_step"] < stage["steps"] and stop_reason == "finished":
                step_started = time.time()
                stats = torch.zeros(4, device=device, dtype=torch.float64)  # loss, kd, ce, agreement (means over micro batches)
                for micro in range(accum):
                    windows = torch.stack([next(windows_iter) for _ in range(micro_bs)]).to(device)
                    inputs, labels = windows[:, :-1], windows[:, 1:]
                    t_hidden = teacher_hidden(inputs)
                    with accelerator.no_sync(kd_model) if micro < accum - 1 else contextlib.nullcontext():
                        with accelerator.autocast():
                            out = kd_model(inputs, labels, t_hidden, teacher_head)
                        loss = out.loss
                        if state["step"] + 1 in nan_steps:
                            loss = loss * float("nan")
                        accelerator.backward(loss / accum)
                    stats += torch.stack([loss.detach(), out.kd_loss.detach(), out.ce_loss.detach(),
                                          out.top1_agreement.detach()]).double() / accum
                state["data_state"] = stream.state_dict()

                # ---- optimizer step: one all-reduce of the step's statistics and the stop-signal flags
                stats = torch.cat([stats, preemption.flag(device)[None]])
                step_loss, kd_loss, ce_loss, agreement, stop_votes = (accelerator.reduce(stats, "sum") / accelerator.num_processes).tolist()
                tokens_all = windows_per_step * seq_len
                finite, grad_norm, lr = optimizer_step(accelerator, optimizer, scheduler, trainable,
                                                       opt_cfg["max_grad_norm"], step_loss)
                state["nonfinite_streak"] = 0 if finite else state["nonfinite_streak"] + 1
                state["step"] += 1
                state["stage_step"] += 1
                step = state["step"]
                state["tokens_seen"] += tokens_all
                progress.update(1)
                add_to_interval(state["interval"], finite, tokens_all, time.time() - step_started,
                                loss=step_loss, kd_loss=kd_loss, ce_loss=ce_loss, top1_agreement=agreement)
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
                    means = interval_means(state["interval"])
                    record.update(stage=state["stage"] + 1, kd_loss=means["kd_loss"], ce_loss=means["ce_loss"],
                                  top1_agreement=means["top1_agreement"])
                    runlog.write("training", record)
                    accelerator.log({f"train/{k}": v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}, step=step)
                    if record["loss"] is not None:
                        progress.set_postfix(kd=f"{record['kd_loss']:.4f}", top1=f"{record['top1_agreement']:.3f}", lr=f"{lr:.2e}")
                    state["interval"] = new_interval(*KD_STATS)
                if eval_batches and step % log_cfg["eval_interval"] == 0:
                    run_evaluation()
                if (step % log_cfg["checkpoint_interval"] == 0 or stop_reason == "preempted") and step < total_steps:
                    checkpointer.save(run_dir / f"checkpoint-{step}", state, total_steps=total_steps)
                    checkpointer.apply_retention(step)
            if state["stage_step"] >= stage["steps"]:
                state["stage"] += 1
                state["stage_step"] = 0
                state["data_state"] = None
        progress.close()

        # ------------------------------------------------------------ final save
        if stop_reason == "finished":
            if eval_batches and state["metric_step"] != state["step"]:
                run_evaluation()
            final = final_checkpoint_dir(run_dir, state["step"])
            checkpointer.save(final, state, total_steps=total_steps)
            say(f"done: {state['step']} steps; student in {final} (from_pretrained after `import trainkit.students`)")
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

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
DDP: every process holds the student and the teacher whole. FSDP (--accelerate-config fsdp): the student
sharded (gathered whole into each checkpoint), the teacher whole, or sharded too with teacher.shard.
"""

from __future__ import annotations

import itertools
import math
import time
from pathlib import Path

from trainkit.cli import build_parser, run_main
from trainkit.config import ConfigError, load_script_config
from trainkit.config.distill import DistillConfig
from trainkit.loop import resolve_resume
from trainkit.preflight import check_model_config

KD_STATS = ("kd_loss", "ce_loss", "top1_agreement")  # per-step means logged besides the loss


def plan_stages(cfg, tokenizer, windows_per_step: int, say) -> list[dict]:
    """Stage 1 (paths.data_path) and, with stage2.enabled, stage 2 (instruction rows: messages,
    prompt/response or text, rendered per row): each stage's data source, steps and peak lr. A stage
    without max_steps runs tokens x epochs / tokens per step, its size estimated by tokenizing
    data.estimate_rows rows (trainkit.text_windows.estimate_data)."""
    from trainkit.text_windows import estimate_data

    paths, data_cfg, stage2 = cfg.paths, cfg.data, cfg.stage2
    seq_len = cfg.training.max_seq_length
    sources = [{"path": paths.data_path, "split": paths.data_split, "name": data_cfg.dataset_config,
                "text_field": data_cfg.text_field, "streaming": data_cfg.streaming, "cache_dir": paths.cache_dir,
                "local_files_only": cfg.model.local_files_only, "key": "paths.data_path"}]
    if stage2.enabled:
        sources.append({**sources[0], "path": stage2.data_path, "key": "stage2.data_path",
                        "split": stage2.data_split, "name": None, "text_field": None})
    stages = []
    for index, source in enumerate(sources):
        section = cfg.training if index == 0 else stage2
        estimate = estimate_data(source, tokenizer, seq_len, sample_rows=data_cfg.estimate_rows)
        if section.max_steps > 0:
            steps = section.max_steps
        elif estimate.windows:
            steps = max(1, math.ceil(estimate.windows * section.epochs / windows_per_step))
        else:
            raise ConfigError(f"{'training' if index == 0 else 'stage2'}.max_steps: the size of {source['path']} "
                              "is unknown (streaming): set max_steps")
        lr = cfg.optimization.learning_rate if index == 0 or stage2.learning_rate is None else stage2.learning_rate
        stages.append({"source": source, "steps": steps, "windows_per_epoch": estimate.windows, "epochs": section.epochs,
                       "lr": lr, "empty_rows": estimate.empty_rows, "first_empty_row": estimate.first_empty_row})
        say(f"stage {index + 1}: {source['path']}: ~{estimate.windows or '?'} windows of {seq_len + 1} tokens per epoch "
            f"-> {steps} steps" + (f"; {estimate.empty_rows} rows of empty text left out (first: {estimate.first_empty_row})"
                                   if estimate.empty_rows else ""))
    return stages


def main() -> int:
    # ---------------------------------------------------------------- config (no heavy imports yet)
    args = build_parser(__doc__.splitlines()[0], "configs/distill_tiny_mamba2.yaml").parse_args()
    cfg, env_applied = load_script_config(args.config, args.overrides, DistillConfig, "distill.py")
    resume_from = resolve_resume(args, cfg)
    # hub id, positions: from the model's config, before data or weights load
    check_model_config(cfg, lengths={"training.max_seq_length": cfg.training.max_seq_length})

    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from trainkit.env_overrides import describe
    from trainkit.kd import StudentKD, evaluate_kd
    from trainkit.loop import (describe_weight_sharding, gradient_sync, is_sharded, load_sharded_weights,
                               pretrained_saver, shard_frozen_model)
    from trainkit.models import (apply_activation_checkpointing, describe_activation_checkpointing, load_frozen_model,
                                 load_weights_into)
    from trainkit.patches.peft import quiet_known_warnings
    from trainkit.schedules import build_optimizer, build_staged_scheduler, weight_decay_groups
    from trainkit.students import build_student, freeze
    from trainkit.text_windows import WindowStream
    from trainkit.tokenizer import load_tokenizer
    from trainkit.train_state import Interval, StageTrainState
    from trainkit.training_run import TrainingRun

    quiet_known_warnings()  # the one warning users cannot act on (trainkit.patches.peft)
    train_cfg, opt_cfg, kd_cfg, student_cfg = cfg.training, cfg.optimization, cfg.distill, cfg.student
    seed, seq_len = train_cfg.seed, train_cfg.max_seq_length
    micro_bs, accum = opt_cfg.micro_batch_size, opt_cfg.gradient_accumulation_steps
    accelerator = Accelerator(log_with=cfg.logging.report_to or None, project_dir=str(cfg.run_dir))
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    # Under DDP and FSDP every process holds the whole frozen teacher (on its own device, or on the CPU), unless
    # teacher.shard: then FSDP shards it too (on the processes' own devices, where the collectives run).
    if cfg.teacher.shard and not (is_sharded(accelerator) and cfg.teacher.device == "same"):
        raise ConfigError("teacher.shard: shards the teacher in FSDP runs only (--accelerate-config fsdp on GPUs) "
                          "with teacher.device: same")
    if world > 1 and cfg.teacher.device not in ("same", "cpu"):  # every process would put its teacher there
        raise ConfigError(f"teacher.device: {cfg.teacher.device} under {world} processes would hold every process's "
                          "teacher; use 'same' (each process's own device) or 'cpu'")

    with TrainingRun(accelerator, cfg, "distill.py", resume_from) as run:
        if env_applied:
            run.say(describe(env_applied))
        # ------------------------------------------------------------ tokenizer, teacher, student
        set_seed(seed)
        tokenizer = load_tokenizer(cfg)
        teacher_device = device if cfg.teacher.device == "same" else torch.device(cfg.teacher.device)
        teacher, teacher_info = load_frozen_model(cfg, teacher_device, tokenizer, dtype=cfg.teacher.dtype)
        run.say(f"teacher: {teacher_info['summary']} on {teacher_device}")
        set_seed(seed)  # student init independent of how much randomness loading used
        student, student_report = build_student(
            teacher, mixer=student_cfg.mixer, attention_layers=student_cfg.attention_layers,
            init_from_teacher=student_cfg.init_from_teacher, dtype=getattr(torch, student_cfg.dtype),
            device=device, **student_cfg.mixer_options)
        trainable_count = freeze(student, freeze_mlp=student_cfg.freeze_mlp, attention_layers=student_cfg.attention_layers,
                                 freeze_replaced_layers=student_cfg.freeze_replaced_layers)
        student.train()
        run.say(f"student: {student_cfg.mixer} mixers, attention kept in layers {student_cfg.attention_layers or 'none'}; "
                f"{student_report.get('summary', '')}; trainable parameters: {trainable_count:,}")
        # The teacher's lm_head is used inside the student's chunked loss: it must sit on the student's device.
        teacher_head = teacher.get_output_embeddings().weight.detach().to(device)
        teacher_sharding = None
        if cfg.teacher.shard:  # after build_student, which copies the teacher's whole weights
            shard_frozen_model(teacher)
            teacher_sharding = describe_weight_sharding(teacher, accelerator)
            run.say(f"teacher: {teacher_sharding['summary']} (lm_head whole)")

        def teacher_hidden(input_ids):
            with torch.no_grad():
                hidden = teacher.base_model(input_ids=input_ids.to(teacher_device), use_cache=False).last_hidden_state
            if cfg.teacher.shard:  # torch's FSDP2 may keep a root unit gathered after forward (it expects a backward)
                teacher.base_model.reshard()
            return hidden.to(device)

        kd_model = StudentKD(student, loss=kd_cfg.loss, temperature=kd_cfg.temperature, top_k=kd_cfg.top_k,
                             ce_weight=kd_cfg.ce_weight, chunk_size=kd_cfg.chunk_size)
        # measured on the KD loss the loop computes (chunked: no full logits), teacher forward included
        checkpointing = apply_activation_checkpointing(
            student, cfg.memory.gradient_checkpointing, device=device, tokens=micro_bs * seq_len,
            trainable=[p for p in student.parameters() if p.requires_grad], budget_gib=cfg.memory.activation_memory_budget_gib,
            loss_fn=lambda ids: kd_model(ids, ids, teacher_hidden(ids), teacher_head).loss)
        run.say(describe_activation_checkpointing(checkpointing))

        # ------------------------------------------------------------ data: stages of packed windows
        windows_per_step = micro_bs * accum * world
        stages = plan_stages(cfg, tokenizer, windows_per_step, run.say)
        total_steps = sum(s["steps"] for s in stages)
        steps_per_epoch = (stages[0]["windows_per_epoch"] or windows_per_step) / windows_per_step
        eval_batches = []
        if cfg.paths.eval_data_path:
            eval_source = {**stages[0]["source"], "path": cfg.paths.eval_data_path, "key": "paths.eval_data_path"}
            eval_windows = WindowStream(eval_source, tokenizer, seq_len, seed=0, rank=rank, world_size=world, epochs=1)
            # The first max_eval_batches x micro_bs windows (None: all) on any number of processes, each
            # process every N-th of them (its share of the stream): the same evaluation on 1 or N processes.
            limit = train_cfg.max_eval_batches * micro_bs if train_cfg.max_eval_batches else None
            windows = list(itertools.islice(eval_windows, None if limit is None else len(range(rank, limit, world))))
            eval_batches = [torch.stack(windows[i:i + micro_bs]) for i in range(0, len(windows), micro_bs)]

        # ------------------------------------------------------------ optimizer, schedule, checkpoints
        optimizer = build_optimizer(weight_decay_groups(student, opt_cfg.weight_decay), opt_cfg, device)
        # FSDP: each of the student's decoder layers one unit, its embeddings, final norm and lm_head the root's
        kd_model, optimizer = accelerator.prepare(kd_model, optimizer)
        scheduler = build_staged_scheduler(optimizer, opt_cfg, [(s["steps"], s["lr"] / opt_cfg.learning_rate) for s in stages])
        accelerator.register_for_checkpointing(scheduler)
        trainable = [p for p in student.parameters() if p.requires_grad]  # under FSDP its shards
        if is_sharded(accelerator):
            student_report["sharding"] = describe_weight_sharding(student, accelerator)
            run.say(f"student: {student_report['sharding']['summary']}")
        # Checkpoints hold the student in save_pretrained form (loads with from_pretrained), not a second copy;
        # under FSDP the whole student (frozen parts too) gathered onto the main process, and scattered back on resume.
        def load_student(directory: str) -> None:
            if is_sharded(accelerator):
                load_sharded_weights(accelerator, kd_model, student, directory)
            else:
                load_weights_into(student, directory)

        run.make_checkpointer(pretrained_saver(student, tokenizer), load_student, trainable, model=kd_model,
                              optimizer=optimizer, saved_module=student)
        best_dir = Path(cfg.paths.best_adapter_dir or run.run_dir / "best-student")

        state = StageTrainState(interval=Interval(KD_STATS))
        run.resume(state, scheduler)
        run.begin(state, total_steps, f"distilling {total_steps} steps in {len(stages)} stage(s)", "distill",
                  model={**teacher_info, "activation_checkpointing": checkpointing, "sharding": teacher_sharding,
                         "student": {k: v for k, v in student_report.items() if k not in ("copied", "initialised")}},
                  data={"stages": [{k: v for k, v in s.items() if k != "source"} | {"path": s["source"]["path"]} for s in stages]},
                  env_overrides=env_applied)

        def evaluate() -> None:
            result = evaluate_kd(kd_model, eval_batches, teacher_hidden, teacher_head, accelerator)
            run.record_evaluation(state, result, f"eval_kd_loss {result['eval_kd_loss']:.4f} eval_loss {result['eval_loss']:.4f} "
                                  f"top1 {result['eval_top1_agreement']:.3f}", best_dir)

        # ------------------------------------------------------------ the loop: stages -> windows -> steps
        stop_reason = "finished"
        while state.stage < len(stages) and stop_reason == "finished":
            stage = stages[state.stage]
            stream = WindowStream(stage["source"], tokenizer, seq_len, seed=seed + state.stage, rank=rank, world_size=world,
                                  shuffle_buffer=cfg.data.shuffle_buffer)
            if state.data_state is not None:
                stream.load_state_dict(state.data_state)  # exact continuation after a resume
            windows_iter = iter(stream)
            while state.stage_step < stage["steps"] and stop_reason == "finished":
                step_started = time.time()
                stats = torch.zeros(4, device=device, dtype=torch.float64)  # loss, kd, ce, agreement (means over micro batches)
                for micro in range(accum):
                    windows = torch.stack([next(windows_iter) for _ in range(micro_bs)]).to(device)
                    inputs, labels = windows[:, :-1], windows[:, 1:]
                    t_hidden = teacher_hidden(inputs)
                    with gradient_sync(accelerator, kd_model, micro == accum - 1):
                        with accelerator.autocast():
                            out = kd_model(inputs, labels, t_hidden, teacher_head)
                        accelerator.backward(out.loss / accum)
                    stats += torch.stack([out.loss.detach(), out.kd_loss.detach(), out.ce_loss.detach(),
                                          out.top1_agreement.detach()]).double() / accum
                state.data_state = stream.state_dict()

                # ---- optimizer step (skipped when the loss or gradients are not finite)
                sums, stop_requested = run.reduce_step(list(stats))
                step_loss, kd_loss, ce_loss, agreement = (value / world for value in sums)
                result = run.end_step(state, optimizer, scheduler, trainable, step_loss, windows_per_step * seq_len,
                                      time.time() - step_started, stop_requested,
                                      kd_loss=kd_loss, ce_loss=ce_loss, top1_agreement=agreement)
                state.stage_step += 1
                stop_reason, step = result.stop_reason, result.step

                # ---- log, evaluate, checkpoint
                if run.log_due(step):
                    record = run.training_record(state, result, steps_per_epoch)
                    record.update(stage=state.stage + 1, **{k: v for k, v in state.interval.means().items() if k in KD_STATS})
                    run.write_training(state, record, kd_loss=".4f", top1_agreement=".3f", lr=".2e")
                if eval_batches and run.eval_due(step):
                    evaluate()
                if run.checkpoint_due(result):
                    run.save_checkpoint(state)
            if state.stage_step >= stage["steps"]:
                state.stage, state.stage_step, state.data_state = state.stage + 1, 0, None

        if stop_reason == "finished":  # the student loads with from_pretrained after `import trainkit.students`
            run.save_final(state, evaluate if eval_batches else None, what="student")
        return run.finish(state, stop_reason)


if __name__ == "__main__":
    run_main(main)

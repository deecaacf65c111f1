"""distill.py end to end on CPU: a tiny Llama teacher into Discrete Mamba-2 and GLA students from the
shipped text shards, run as real subprocesses (kill-and-resume included)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers_qlora import (REPO, check_two_process_resume, kill_at_drawn_state, one_and_two_processes, run_script,
                           run_two_processes)
from trainkit.fileio import iter_jsonl
from trainkit.runlog import DISTILL_EVAL_FIELDS, DISTILL_TRAINING_FIELDS, EVAL_FIELDS, TRAINING_FIELDS

CONFIG = REPO / "configs" / "distill_tiny_mamba2.yaml"


def distill_config(tmp_path: Path, **sections) -> Path:
    cfg = yaml.safe_load(CONFIG.read_text())
    cfg["paths"].update(output_dir=str(tmp_path / "out"), run_name="kd",
                        data_path=str(REPO / "data" / "distill" / "pretrain"),
                        eval_data_path=str(REPO / "data" / "distill" / "eval"))
    cfg["training"].update(max_steps=12, max_eval_batches=1)
    cfg["logging"].update(log_interval=2, eval_interval=6, checkpoint_interval=4, progress_bar=False)
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def stream(run_dir: Path, name: str) -> list[dict]:
    return list(iter_jsonl(run_dir / "logs" / name))


@pytest.mark.parametrize("mixer", ["discrete_mamba2", "gla"])
def test_student_learns_from_teacher(tmp_path, mixer):
    # activation checkpointing auto: with a budget nothing fits (every layer), and with the derived budget (none)
    budget = 1e-9 if mixer == "discrete_mamba2" else None
    cfg = distill_config(tmp_path, student={"mixer": mixer}, training={"max_steps": 24},
                         memory={"gradient_checkpointing": "auto", "activation_memory_budget_gib": budget})
    result = run_script(["--config", str(cfg)], script="distill.py")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "out" / "kd"
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "finished" and info["script"] == "distill.py"
    assert info["model"]["student"]["mixer"] == mixer
    ckpt = info["model"]["activation_checkpointing"]
    student = info["model"]["student"]
    assert ckpt["policy"] == "auto" and ckpt["of"] == len(student["mixer_layers"]) + len(student["attention_layers"]) == 4
    assert ckpt["layers"] == (ckpt["of"] if budget else 0) and ckpt["tokens"] == 4 * 64, ckpt
    assert ckpt["estimated_gib"] > 0 and (ckpt["budget_from"] == "memory.activation_memory_budget_gib" if budget
                                          else "available RAM" in ckpt["budget_from"])
    assert f"activation checkpointing: auto -> {ckpt['layers']} of {ckpt['of']} layers" in result.stdout
    lines = stream(run_dir, "training_log.jsonl")
    assert [r["step"] for r in lines] == list(range(2, 25, 2))
    assert all(set(TRAINING_FIELDS) | set(DISTILL_TRAINING_FIELDS) <= set(r) for r in lines)
    assert lines[-1]["kd_loss"] < 0.8 * lines[0]["kd_loss"], [r["kd_loss"] for r in lines]
    assert lines[-1]["top1_agreement"] > lines[0]["top1_agreement"]
    evals = stream(run_dir, "eval_log.jsonl")
    assert [e["step"] for e in evals] == [6, 12, 18, 24] and evals[-1]["eval_kd_loss"] < evals[0]["eval_kd_loss"]
    assert all(set(EVAL_FIELDS) - {"eval_tokens", "nan_fields"} | set(DISTILL_EVAL_FIELDS) <= set(e) for e in evals)
    # the saved student loads back with from_pretrained and runs
    import trainkit.students  # noqa: F401,I001  (registers the student's model type)
    from transformers import AutoModelForCausalLM
    student = AutoModelForCausalLM.from_pretrained(run_dir / "final-checkpoint-24")
    assert student.config.mixer == mixer and student.config.attention_layers == [1]
    with torch.no_grad():
        logits = student(input_ids=torch.randint(0, 200, (1, 16))).logits
    assert torch.isfinite(logits).all()
    assert (run_dir / "best-student" / "config.json").is_file()


def test_exact_resume_after_sigkill(tmp_path):
    """SIGKILL at a drawn state after the first checkpoint, --resume: the same student weights bitwise, the same log."""
    ref_cfg = distill_config(tmp_path / "ref")
    assert run_script(["--config", str(ref_cfg)], script="distill.py").returncode == 0
    ref_dir = tmp_path / "ref" / "out" / "kd"
    reference = load_file(ref_dir / "final-checkpoint-12" / "model.safetensors")

    cfg = distill_config(tmp_path / "kill")
    run_dir = tmp_path / "kill" / "out" / "kd"
    code, state = kill_at_drawn_state("distill.py", cfg, run_dir, checkpoints=[4, 8], log_steps=[6, 8, 10])
    assert code == -signal.SIGKILL, f"the run ended before the kill at {state}"
    result = run_script(["--config", str(cfg), "--resume"], script="distill.py")
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = load_file(run_dir / "final-checkpoint-12" / "model.safetensors")
    assert resumed.keys() == reference.keys()
    for key in reference:
        assert torch.equal(resumed[key], reference[key]), key
    assert [r["loss"] for r in stream(run_dir, "training_log.jsonl")] == [r["loss"] for r in stream(ref_dir, "training_log.jsonl")]
    assert "resume" in [e["event"] for e in stream(run_dir, "events.jsonl")]


def test_two_stages_and_frozen_mlps(tmp_path):
    cfg = distill_config(tmp_path, stage2={"enabled": True, "data_path": str(REPO / "data" / "distill" / "stage2"),
                                           "max_steps": 4, "learning_rate": 1e-3},
                         student={"freeze_mlp": True}, training={"max_steps": 6},
                         logging={"eval_interval": 5, "checkpoint_interval": 5})
    result = run_script(["--config", str(cfg)], script="distill.py")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "out" / "kd"
    info = json.loads((run_dir / "run.json").read_text())
    assert info["total_steps"] == 10 and len(info["data"]["stages"]) == 2
    stages = {r["step"]: r["stage"] for r in stream(run_dir, "training_log.jsonl")}
    assert stages[6] == 1 and stages[10] == 2
    # MLPs stayed the teacher's: the final student's MLP weights equal the checkpoint-5 ones
    first, final = (load_file(run_dir / d / "model.safetensors") for d in ("checkpoint-5", "final-checkpoint-10"))
    mlp = [k for k in final if ".mlp." in k]
    assert mlp and all(torch.equal(first[k], final[k]) for k in mlp)
    assert any(not torch.equal(first[k], final[k]) for k in final if "self_attn" in k)


def test_bad_config_is_one_line_exit_2(tmp_path):
    cfg = distill_config(tmp_path)
    cases = {"student.mixer=mamba": "student.mixer: 'mamba' is not one of",
             "paths.data_path=./nowhere/shards": "paths.data_path: no such file or directory",
             "stage2.enabled=true": "stage2.data_path: required",
             "logging.metric_for_best=accuracy": "logging.metric_for_best",
             "teacher.shard=true": "teacher.shard: shards the teacher in FSDP runs only"}
    for override, expected in cases.items():
        result = run_script(["--config", str(cfg), override], script="distill.py", timeout=120)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and expected in lines[0], (override, result.stderr[-1500:])
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_two_process_data_parallel_matches_one_process(tmp_path):
    """2 CPU processes (gloo), micro batch 4 == 1 process, micro batch 4 x 2 accumulation: the same windows
    per step (the same tokens and losses), the same evaluation windows (max_eval_batches counts over all
    processes); a 2-process checkpoint resumes on 2 processes to the same student, bitwise."""
    sections = dict(training={"max_steps": 4, "max_eval_batches": 3}, logging={"eval_interval": 2, "checkpoint_interval": 2})
    _, two = one_and_two_processes("distill.py", distill_config, tmp_path, 4, **sections)
    one_dir, two_dir = tmp_path / "one" / "out" / "kd", tmp_path / "two" / "out" / "kd"
    info = json.loads((two_dir / "run.json").read_text())
    assert info["world_size"] == 2 and info["num_machines"] == 1 and info["status"] == "finished"
    train_one, train_two = stream(one_dir, "training_log.jsonl"), stream(two_dir, "training_log.jsonl")
    assert [r["step"] for r in train_two] == [2, 4]
    assert [r["tokens"] for r in train_two] == [r["tokens"] for r in train_one] == [2 * 8 * 64, 4 * 8 * 64]
    # fp32 on CPU; measured within 6e-8 relative (the mean over 8 windows summed in another order)
    for field in ("loss", "kd_loss", "top1_agreement"):
        assert [r[field] for r in train_two] == pytest.approx([r[field] for r in train_one], rel=1e-5), field
    evals_one, evals_two = stream(one_dir, "eval_log.jsonl"), stream(two_dir, "eval_log.jsonl")
    assert [e["step"] for e in evals_two] == [2, 4]
    for e1, e2 in zip(evals_one, evals_two):
        assert e2["eval_tokens"] == e1["eval_tokens"] == 3 * 4 * 64  # 12 windows split 6 + 6, none twice
        for field in ("eval_kd_loss", "eval_loss", "eval_top1_agreement"):
            assert e2[field] == pytest.approx(e1[field], rel=1e-5), field  # measured within 6e-8

    check_two_process_resume("distill.py", two, two_dir, 2, 4, "model.safetensors")


def test_teacher_on_one_device_for_several_processes_is_refused(tmp_path):
    """teacher.device names one device; under 2 processes both teachers would land there: one line, exit 2."""
    cfg = distill_config(tmp_path, teacher={"device": "cuda:1"})
    result = run_two_processes(["--config", str(cfg)], script="distill.py", timeout=300)
    assert result.returncode != 0
    assert "config error: teacher.device: cuda:1 under 2 processes would hold every process's teacher" in result.stderr
    assert "[rank0]: Traceback" not in result.stderr  # (accelerate launch reports the exit code with its own)
    assert not (tmp_path / "out").exists()

"""train_qlora.py end to end on a tiny 4-bit MoE, run as a real subprocess."""

from __future__ import annotations

import importlib.metadata
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers_qlora import REPO, fault_env, run_script, script_env, kill_at_drawn_state, tiny_config
from trainkit.fileio import iter_jsonl
from trainkit.runlog import EVAL_FIELDS, EXPERT_FIELDS, TRAINING_FIELDS


def read_stream(run_dir: Path, name: str) -> list[dict]:
    return list(iter_jsonl(run_dir / "logs" / name))


def adapter_tensors(directory: Path) -> dict:
    return load_file(directory / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qlora")
    cfg = tiny_config(tmp)
    result = run_script(["--config", str(cfg)])
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "out" / "tiny", result


def test_run_directory_is_complete(finished_run):
    run_dir, result = finished_run
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "finished" and info["total_steps"] == 12 and info["world_size"] == 1
    assert info["model"]["is_moe"] is True
    # the dtype chosen for the CPU, and why; the versions and patches the numbers depend on
    assert info["model"]["compute_dtype"] == "float32" and info["model"]["compute_dtype_reason"].startswith("auto:")
    assert "compute dtype float32 (auto:" in result.stdout
    # memory.gradient_checkpointing auto (the default): on CPU half the available RAM holds 4 x 64 tokens of it
    ckpt = info["model"]["activation_checkpointing"]
    assert ckpt["policy"] == "auto" and ckpt["layers"] == 0 and ckpt["of"] == 2 and ckpt["tokens"] == 4 * 64, ckpt
    assert 0 < ckpt["estimated_gib"] < ckpt["budget_gib"] and "available RAM" in ckpt["budget_from"]
    assert "activation checkpointing: auto -> 0 of 2 layers (estimated" in result.stdout
    for name in ("torch", "transformers", "accelerate", "peft", "bitsandbytes", "datasets", "triton"):
        assert info["versions"][name] == importlib.metadata.version(name), name
    applied = {p["name"]: p for p in info["patches"]}
    for name in ("transformers.expert_quantize_on_load", "transformers.experts_4bit_forward",
                 "bitsandbytes.cpu_4bit_layout", "peft.gradient_checkpointing_warning"):
        assert name in applied, (name, sorted(applied))
    assert applied["bitsandbytes.cpu_4bit_layout"]["version"] == importlib.metadata.version("bitsandbytes")
    for name in ("training_log.jsonl", "eval_log.jsonl", "expert_usage_log.jsonl", "events.jsonl"):
        assert (run_dir / "logs" / name).stat().st_size > 0, name
    assert (run_dir / "final-checkpoint-12" / "adapter_model.safetensors").is_file()
    assert (run_dir / "best-adapter" / "adapter_config.json").is_file()
    assert (run_dir / "best-adapter" / "tokenizer.json").is_file()
    # keep_top_k=1 plus the latest: at most two intermediate checkpoints remain
    kept = sorted(p.name for p in run_dir.glob("checkpoint-*"))
    assert 1 <= len(kept) <= 2 and "checkpoint-8" in kept, kept
    assert not list(run_dir.glob(".tmp-*"))
    assert "4-bit" in result.stdout


def test_training_log_schema(finished_run):
    run_dir, _ = finished_run
    lines = read_stream(run_dir, "training_log.jsonl")
    assert [r["step"] for r in lines] == [2, 4, 6, 8, 10, 12]
    for record in lines:
        assert set(TRAINING_FIELDS) <= set(record), set(TRAINING_FIELDS) - set(record)
        assert record["loss"] > 0 and record["tokens_per_sec"] > 0 and record["router_aux_loss"] is not None
    assert lines[-1]["tokens"] == 12 * 4 * 64
    evals = read_stream(run_dir, "eval_log.jsonl")
    assert [e["step"] for e in evals] == [4, 8, 12]
    for e in evals:
        assert set(EVAL_FIELDS) - {"nan_fields"} <= set(e)  # nan_fields: only in a line with a NaN value
        assert abs(e["perplexity"] - __import__("math").exp(e["eval_loss"])) < 1e-6 * e["perplexity"]
    experts = read_stream(run_dir, "expert_usage_log.jsonl")
    assert [e["step"] for e in experts] == [4, 8, 12]
    for snap in experts:
        assert set(EXPERT_FIELDS) <= set(snap)
        assert len(snap["layers"]) == 2
        for layer in snap["layers"]:
            # every token goes to top_k experts
            assert sum(layer["tokens_per_expert"]) == snap["tokens_routed"] // 2
    events = [e["event"] for e in read_stream(run_dir, "events.jsonl")]
    assert events[0] == "start" and events[-1] == "stop"
    assert {"checkpoint_saved", "checkpoint_deleted", "new_best", "eval"} <= set(events)


def test_adapter_loads_with_peft(finished_run):
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from helpers_qlora import TINY_MOE

    run_dir, _ = finished_run
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "final-checkpoint-12")
    config = AutoConfig.for_model(**{**TINY_MOE, "vocab_size": len(tokenizer)})
    base = AutoModelForCausalLM.from_config(config)
    model = PeftModel.from_pretrained(base, run_dir / "final-checkpoint-12")
    saved = adapter_tensors(run_dir / "final-checkpoint-12")
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(saved) > 0


def test_bad_config_is_one_line_exit_2(tmp_path):
    cases = {
        "training.max_stpes=5": "training.max_stpes: unknown key (did you mean training.max_steps?)",
        "training.max_steps=abc": "training.max_steps: expected int",
        "optimization.learning_rate=-1": "optimization.learning_rate: must be > 0",
        "paths.data_path=missing/nothing.jsonl": "paths.data_path: no such file or directory",
        "lora.variant=qlora": "lora.variant: 'qlora' is not one of",
    }
    cfg = tiny_config(tmp_path)
    for override, expected in cases.items():
        result = run_script(["--config", str(cfg), override], timeout=120)
        assert result.returncode == 2, (override, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], (override, result.stderr)
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()  # nothing loaded, nothing written
    result = run_script(["--config", str(tmp_path / "nope.yaml")], timeout=120)
    assert result.returncode == 2 and "no such file" in result.stderr
    result = run_script(["--config", str(cfg), "--resume"], timeout=120)
    assert result.returncode == 2 and "--resume: no complete checkpoint" in result.stderr


def test_nonfinite_loss_skips_steps_and_stops(tmp_path):
    cfg = tiny_config(tmp_path, training={"max_consecutive_nonfinite": 3}, logging={"keep_top_k": 5})
    result = run_script(["--config", str(cfg)], **fault_env(TRAINKIT_FAULT_NONFINITE_STEPS="3,6,7,8"))
    run_dir = tmp_path / "out" / "tiny"
    assert result.returncode == 1, result.stderr[-2000:]
    errors = read_stream(run_dir, "error_log.jsonl")
    assert [e["step"] for e in errors] == [3, 6, 7, 8] and all(e["type"] == "NonFiniteLoss" for e in errors)
    events = read_stream(run_dir, "events.jsonl")
    assert [e["step"] for e in events if e["event"] == "nan_skip"] == [3, 6, 7, 8]
    assert events[-1]["event"] == "stop" and events[-1]["reason"] == "nan_limit"
    assert json.loads((run_dir / "run.json").read_text())["status"] == "failed"
    # checkpoints after skipped steps hold finite weights; no final checkpoint for a failed run
    for step in (4, 8):
        for tensor in adapter_tensors(run_dir / f"checkpoint-{step}").values():
            assert torch.isfinite(tensor).all()
    assert not list(run_dir.glob("final-checkpoint-*"))


def test_exact_resume_after_sigkill(tmp_path):
    """SIGKILL at a state drawn from a seeded generator, resume: same final adapter bitwise, every step logged once."""
    reference_cfg = tiny_config(tmp_path / "ref")
    assert run_script(["--config", str(reference_cfg)]).returncode == 0
    reference = adapter_tensors(tmp_path / "ref" / "out" / "tiny" / "final-checkpoint-12")

    cfg = tiny_config(tmp_path / "kill")
    run_dir = tmp_path / "kill" / "out" / "tiny"
    code, state = kill_at_drawn_state("train_qlora.py", cfg, run_dir, checkpoints=[4, 8], log_steps=[6, 8, 10])
    assert code == -signal.SIGKILL, f"the run ended before the kill at {state}"

    result = run_script(["--config", str(cfg), "--resume"])
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = adapter_tensors(run_dir / "final-checkpoint-12")
    assert resumed.keys() == reference.keys()
    for key in reference:
        assert torch.equal(resumed[key], reference[key]), key
    steps = [r["step"] for r in read_stream(run_dir, "training_log.jsonl")]
    assert steps == [2, 4, 6, 8, 10, 12]
    ref_losses = [r["loss"] for r in read_stream(tmp_path / "ref" / "out" / "tiny", "training_log.jsonl")]
    assert [r["loss"] for r in read_stream(run_dir, "training_log.jsonl")] == ref_losses
    assert "resume" in [e["event"] for e in read_stream(run_dir, "events.jsonl")]


def test_two_process_data_parallel_matches_one_process(tmp_path):
    """2 CPU processes (gloo) with micro batch 2 == 1 process with micro batch 2 x 2 accumulation."""
    one = tiny_config(tmp_path / "one", optimization={"micro_batch_size": 2, "gradient_accumulation_steps": 2},
                      training={"max_steps": 6}, lora={"dropout": 0.0})
    two = tiny_config(tmp_path / "two", optimization={"micro_batch_size": 2, "gradient_accumulation_steps": 1},
                      training={"max_steps": 6}, lora={"dropout": 0.0})
    assert run_script(["--config", str(one)]).returncode == 0
    launch = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(29500 + os.getpid() % 1000),
         str(REPO / "train_qlora.py"), "--config", str(two)],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=script_env(ACCELERATE_USE_CPU="1"))
    assert launch.returncode == 0, launch.stderr[-3000:]
    info = json.loads((tmp_path / "two" / "out" / "tiny" / "run.json").read_text())
    assert info["world_size"] == 2
    loss_one = [r["loss"] for r in read_stream(tmp_path / "one" / "out" / "tiny", "training_log.jsonl")]
    loss_two = [r["loss"] for r in read_stream(tmp_path / "two" / "out" / "tiny", "training_log.jsonl")]
    assert len(loss_one) == len(loss_two) == 3
    assert loss_one == pytest.approx(loss_two, rel=2e-2)
    tokens_one = [r["tokens"] for r in read_stream(tmp_path / "one" / "out" / "tiny", "training_log.jsonl")]
    tokens_two = [r["tokens"] for r in read_stream(tmp_path / "two" / "out" / "tiny", "training_log.jsonl")]
    assert tokens_one == tokens_two


def test_no_validation_split(tmp_path):
    """val_split 0: trains without evaluations, still a final checkpoint; TensorBoard through accelerate."""
    cfg = tiny_config(tmp_path, training={"val_split": 0.0, "max_steps": 4},
                      logging={"report_to": ["tensorboard"], "progress_bar": False})
    result = run_script(["--config", str(cfg)])
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "out" / "tiny"
    assert (run_dir / "final-checkpoint-4" / "adapter_model.safetensors").is_file()
    assert read_stream(run_dir, "eval_log.jsonl") == []
    assert list(run_dir.rglob("events.out.tfevents.*")), "no TensorBoard event file"

"""train_qlora.py on CUDA: bitsandbytes kernels on one GPU, DeepSpeed ZeRO-2 on two. Marked `gpu`."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from helpers_qlora import REPO, run_script, script_env, tiny_config
from trainkit.fileio import iter_jsonl

pytestmark = pytest.mark.gpu


def losses(run_dir):
    return [r["loss"] for r in iter_jsonl(run_dir / "logs" / "training_log.jsonl")]


def test_qlora_run_on_cuda(tmp_path):
    cfg = tiny_config(tmp_path, training={"max_steps": 40, "max_seq_length": 128},
                      optimization={"micro_batch_size": 8, "learning_rate": 3e-3},
                      lora={"modules_to_save": ["embed_tokens", "lm_head"]},
                      logging={"log_interval": 5, "eval_interval": 20, "checkpoint_interval": 20})
    result = run_script(["--config", str(cfg)])
    assert result.returncode == 0, result.stderr[-4000:]
    run_dir = tmp_path / "out" / "tiny"
    info = json.loads((run_dir / "run.json").read_text())
    print("\n".join(line for line in result.stdout.splitlines() if "4-bit" in line or "done" in line))
    assert info["versions"].get("cuda") and info["model"]["parameters"]["quantized_4bit"] > 0
    curve = losses(run_dir)
    print("loss curve:", [round(x, 3) for x in curve])
    assert curve[-1] < curve[0] - 0.3
    peak = [r["memory_peak_gb"] for r in iter_jsonl(run_dir / "logs" / "training_log.jsonl")][-1]
    assert 0 < peak < 4


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")
def test_deepspeed_zero2_two_gpus(tmp_path):
    cfg = tiny_config(tmp_path, training={"max_steps": 20, "max_seq_length": 128},
                      optimization={"micro_batch_size": 4, "learning_rate": 3e-3},
                      lora={"modules_to_save": ["embed_tokens", "lm_head"]},
                      logging={"log_interval": 5, "eval_interval": 10, "checkpoint_interval": 10})
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
         str(REPO / "configs" / "accelerate" / "deepspeed_zero2.yaml"), "--num_processes", "2",
         str(REPO / "train_qlora.py"), "--config", str(cfg)],
        cwd=REPO, capture_output=True, text=True, timeout=900, env=script_env())
    assert result.returncode == 0, result.stderr[-4000:]
    run_dir = tmp_path / "out" / "tiny"
    info = json.loads((run_dir / "run.json").read_text())
    assert info["world_size"] == 2 and info["status"] == "finished"
    curve = losses(run_dir)
    print("zero-2 loss curve:", [round(x, 3) for x in curve])
    assert curve[-1] < curve[0]
    assert (run_dir / "final-checkpoint-20" / "adapter_model.safetensors").is_file()
    resumed = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
         str(REPO / "configs" / "accelerate" / "deepspeed_zero2.yaml"), "--num_processes", "2",
         str(REPO / "train_qlora.py"), "--config", str(cfg), "--resume_from", str(run_dir / "checkpoint-10"),
         "training.max_steps=20"],
        cwd=REPO, capture_output=True, text=True, timeout=900, env=script_env())
    assert resumed.returncode == 0, resumed.stderr[-4000:]

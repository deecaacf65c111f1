"""FSDP on the GPUs of this machine: QLoRA (NCCL, bf16 mixed precision, as users run it): a kill and a resume
against an uninterrupted run, adapter-only checkpoints, and the final adapter loaded by plain PEFT on one GPU;
distill.py with the student and the teacher sharded, killed and resumed.

Runs on every visible GPU, up to 2 (NCCL allows one process per GPU). On one GPU this is FSDP over one process:
the NCCL, CUDA and bf16 code paths of checkpointing and resuming, not the sharding itself, which
benchmarks/bench_multi_gpu.py and tests/test_fsdp.py (2 CPU processes) measure.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers_qlora import REPO, TINY_MOE, free_port, kill_then_resume, script_env
from test_fsdp import CHECKPOINT_EVERY, STEPS, config, losses  # the same tiny run as on CPU processes

pytestmark = pytest.mark.gpu



def processes() -> int:
    return max(1, min(2, torch.cuda.device_count()))


def command(config: Path, *extra: str, script: str = "train_qlora.py") -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(REPO / "configs" / "accelerate" / "fsdp.yaml"), "--num_processes", str(processes()),
            "--main_process_port", str(free_port()), str(REPO / script), "--config", str(config), *extra]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("gpu_fsdp")
    result = subprocess.run(command(config(tmp)), cwd=REPO, capture_output=True, text=True, timeout=900,
                            env=script_env())
    assert result.returncode == 0, result.stderr[-4000:]
    print(result.stdout[-3000:])
    return tmp / "out" / "tiny"


def test_fsdp_on_gpus_checkpoints_the_adapter_and_peft_loads_it_on_one_gpu(uninterrupted):
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    info = json.loads((uninterrupted / "run.json").read_text())
    assert (info["distributed_type"], info["world_size"]) == ("FSDP", processes())
    print("sharding:", info["model"].get("sharding", {}).get("summary"))
    final = uninterrupted / f"final-checkpoint-{STEPS}"
    files = {p.name for p in final.iterdir()}
    assert not any(f.startswith(("pytorch_model", "model")) for f in files), files
    saved = load_file(final / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in saved.items())

    tokenizer = AutoTokenizer.from_pretrained(final)
    base = AutoModelForCausalLM.from_config(AutoConfig.for_model(**{**TINY_MOE, "vocab_size": len(tokenizer)}))
    model = PeftModel.from_pretrained(base.to("cuda:0"), final)
    loaded = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    assert loaded.keys() == saved.keys()
    for key in saved:
        assert loaded[key].device.type == "cuda"
        assert torch.equal(loaded[key].cpu(), saved[key]), key


def test_fsdp_on_gpus_resume_after_a_kill_matches_the_uninterrupted_run(uninterrupted, tmp_path):
    cfg = config(tmp_path)
    run_dir = tmp_path / "out" / "tiny"
    kill_then_resume("train_qlora.py", cfg, command(cfg), command(cfg, "--resume"), script_env(), run_dir,
                     checkpoint_step=CHECKPOINT_EVERY, log_step=6, final_step=STEPS)

    final = f"final-checkpoint-{STEPS}"
    resumed, reference = (load_file(d / final / "adapter_model.safetensors") for d in (run_dir, uninterrupted))
    assert resumed.keys() == reference.keys()
    diffs = {k: (resumed[k].float() - reference[k].float()).abs().max().item() for k in reference}
    bitwise = all(torch.equal(resumed[k], reference[k]) for k in reference)
    # the figure the README states: bitwise, or the largest difference and where
    worst = max(diffs, key=diffs.get)
    print(f"resume vs uninterrupted on {processes()} GPU(s): bitwise={bitwise}, largest |diff| {diffs[worst]:.3e} "
          f"({worst}); losses {losses(run_dir)} vs {losses(uninterrupted)}")
    for key in reference:  # NCCL may sum in another order after a restart: within bf16 rounding of the update
        torch.testing.assert_close(resumed[key], reference[key], rtol=2e-2, atol=1e-4, msg=key)
    assert losses(run_dir) == pytest.approx(losses(uninterrupted), rel=1e-2)


def test_distill_under_fsdp_on_gpus_resumes_after_a_kill(tmp_path):
    """distill.py with the student sharded and teacher.shard (NCCL, bf16 mixed precision): killed after a checkpoint
    and resumed, it ends with the uninterrupted run's student (bitwise, or within bf16 rounding); the final student
    loads with from_pretrained onto the GPU."""
    from test_distill import distill_config
    from transformers import AutoModelForCausalLM

    import trainkit.students  # noqa: F401  (registers the student model types)

    def write(directory: Path) -> Path:
        return distill_config(directory, training={"max_steps": STEPS}, teacher={"shard": True},
                              logging={"log_interval": 1, "checkpoint_interval": CHECKPOINT_EVERY,
                                       "eval_interval": CHECKPOINT_EVERY})

    reference_cfg = write(tmp_path / "reference")
    result = subprocess.run(command(reference_cfg, script="distill.py"), cwd=REPO, capture_output=True, text=True, timeout=900,
                            env=script_env())
    assert result.returncode == 0, result.stderr[-4000:]
    reference_dir = tmp_path / "reference" / "out" / "kd"
    info = json.loads((reference_dir / "run.json").read_text())
    assert (info["distributed_type"], info["world_size"]) == ("FSDP", processes())
    print("teacher:", info["model"]["sharding"]["summary"], "\nstudent:", info["model"]["student"]["sharding"]["summary"])

    cfg = write(tmp_path / "killed")
    run_dir = tmp_path / "killed" / "out" / "kd"
    kill_then_resume("distill.py", cfg, command(cfg, script="distill.py"), command(cfg, "--resume", script="distill.py"),
                     script_env(), run_dir, checkpoint_step=CHECKPOINT_EVERY, log_step=6, final_step=STEPS)
    final = f"final-checkpoint-{STEPS}"
    resumed, reference = (load_file(d / final / "model.safetensors") for d in (run_dir, reference_dir))
    assert resumed.keys() == reference.keys()
    diffs = {k: (resumed[k].float() - reference[k].float()).abs().max().item() for k in reference}
    worst = max(diffs, key=diffs.get)
    print(f"distill resume vs uninterrupted on {processes()} GPU(s): bitwise="
          f"{all(torch.equal(resumed[k], reference[k]) for k in reference)}, largest |diff| {diffs[worst]:.3e} ({worst}); "
          f"losses {losses(run_dir)} vs {losses(reference_dir)}")
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], rtol=2e-2, atol=1e-4, msg=key)
    student = AutoModelForCausalLM.from_pretrained(reference_dir / final).to("cuda:0")
    for name, tensor in student.state_dict().items():
        if name in reference:
            assert torch.equal(tensor.cpu(), reference[name]), name

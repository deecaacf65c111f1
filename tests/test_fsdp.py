"""FSDP-QLoRA on 2 CPU processes (gloo): the 4-bit base (Linear4bit and NF4 expert banks) and the adapters (expert
adapters included) sharded, training equal to DDP, checkpoints that hold the adapter only, exact resume after a kill.

accelerate runs FSDP on GPUs only and turns an FSDP config on CPUs into DDP; tests/cpu_fsdp/sitecustomize.py lets
its FSDP2 path run on CPU processes (torch's fully_shard works with gloo), so everything below is accelerate's and
trainkit's real FSDP code. The same config launched without that shim is the DDP baseline, which also shows the
warning a user gets when FSDP falls back to DDP on CPUs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers_qlora import REPO, fsdp_launch_command, fsdp_launch_env, kill_then_resume, tiny_config

pytestmark = pytest.mark.slow

STEPS, CHECKPOINT_EVERY = 8, 4


def launch_command(config: Path, *extra: str) -> list[str]:
    return fsdp_launch_command("train_qlora.py", config, *extra)


def launch(config: Path, fsdp: bool, *extra: str):
    import subprocess
    return subprocess.run(launch_command(config, *extra), cwd=REPO, capture_output=True, text=True, timeout=900,
                          env=fsdp_launch_env(fsdp))


def config(tmp_path: Path) -> Path:
    # expert adapters on the NF4 banks too; no dropout, so FSDP and DDP draw nothing differently
    return tiny_config(tmp_path, training={"max_steps": STEPS}, lora={"dropout": 0.0, "expert_targets": "auto"},
                       optimization={"micro_batch_size": 2},
                       logging={"checkpoint_interval": CHECKPOINT_EVERY, "eval_interval": CHECKPOINT_EVERY})


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "logs" / "training_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    out = {}
    for name, fsdp in (("fsdp", True), ("ddp", False)):
        result = launch(config(tmp / name), fsdp)
        assert result.returncode == 0, result.stderr[-4000:]
        out[name] = (tmp / name / "out" / "tiny", result)
    return out


def test_fsdp_shards_the_4bit_base_and_trains_as_ddp_does(runs):
    fsdp_dir, fsdp_result = runs["fsdp"]
    ddp_dir, ddp_result = runs["ddp"]
    fsdp_info = json.loads((fsdp_dir / "run.json").read_text())
    ddp_info = json.loads((ddp_dir / "run.json").read_text())
    assert (fsdp_info["distributed_type"], fsdp_info["world_size"]) == ("FSDP", 2)
    # the same config without the CPU shim: accelerate's DDP, and the run says FSDP did not happen
    assert ddp_info["distributed_type"] == "MULTI_CPU"
    assert "accelerate runs FSDP on GPUs only" in ddp_result.stdout
    assert "accelerate runs FSDP on GPUs only" not in fsdp_result.stdout

    # each process holds about half of the 4-bit base (data and banks sharded; Linear4bit statistics replicated)
    sharding = fsdp_info["model"]["sharding"]
    print(f"\n{sharding['summary']}")
    assert 0.45 <= sharding["base_share_largest_process"] <= 0.55, sharding
    assert sharding["trainable_bytes_this_process"] < sharding["trainable_bytes_whole"]
    assert "FSDP over 2 processes" in fsdp_result.stdout
    assert any(p["name"] == "bitsandbytes.shardable_4bit_weights" for p in fsdp_info["patches"])

    # the same training: FSDP's reduce-scatter and DDP's all-reduce sum the same gradients (fp32, 2 processes)
    assert len(losses(fsdp_dir)) == len(losses(ddp_dir)) == STEPS // 2
    assert losses(fsdp_dir) == pytest.approx(losses(ddp_dir), rel=1e-5)
    final = f"final-checkpoint-{STEPS}"
    fsdp_adapter, ddp_adapter = (load_file(d / final / "adapter_model.safetensors") for d in (fsdp_dir, ddp_dir))
    assert fsdp_adapter.keys() == ddp_adapter.keys()
    assert any(".experts." in k for k in fsdp_adapter), "no expert adapter saved"
    for key in fsdp_adapter:
        torch.testing.assert_close(fsdp_adapter[key], ddp_adapter[key], rtol=1e-4, atol=1e-6, msg=key)


def test_fsdp_checkpoints_hold_the_adapter_not_the_base(runs):
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from helpers_qlora import TINY_MOE

    run_dir, _ = runs["fsdp"]
    for name in (f"checkpoint-{CHECKPOINT_EVERY}", f"final-checkpoint-{STEPS}"):
        files = {p.name for p in (run_dir / name).iterdir()}
        # no sharded model directory (pytorch_model_fsdp_0) or full model file: accelerate's FSDP save would write the base
        assert not any(f.startswith(("pytorch_model", "model")) for f in files), files
        assert {"adapter_model.safetensors", "optimizer_full_state.pt", "trainer_state.json",
                "random_states_0.pkl", "random_states_1.pkl", "custom_checkpoint_0.pkl"} <= files, files
        saved = load_file(run_dir / name / "adapter_model.safetensors")
        assert all("lora_" in k for k in saved)
        assert all(torch.isfinite(v).all() and v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)
    assert sorted(p.name for p in (run_dir / "best-adapter").iterdir() if p.name.startswith("adapter_"))

    # plain PEFT on CPU, no trainkit code: every saved tensor lands in the model
    final = run_dir / f"final-checkpoint-{STEPS}"
    tokenizer = AutoTokenizer.from_pretrained(final)
    base = AutoModelForCausalLM.from_config(AutoConfig.for_model(**{**TINY_MOE, "vocab_size": len(tokenizer)}))
    model = PeftModel.from_pretrained(base, final)
    saved = load_file(final / "adapter_model.safetensors")
    loaded = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    assert loaded.keys() == saved.keys()
    for key in saved:
        assert torch.equal(loaded[key], saved[key]), key


def test_fsdp_resume_after_a_kill_is_exact(runs, tmp_path):
    reference_dir, _ = runs["fsdp"]
    cfg = config(tmp_path)
    run_dir = tmp_path / "out" / "tiny"
    kill_then_resume("train_qlora.py", cfg, launch_command(cfg), launch_command(cfg, "--resume"), fsdp_launch_env(True),
                     run_dir, checkpoint_step=CHECKPOINT_EVERY, log_step=6, final_step=STEPS)
    final = f"final-checkpoint-{STEPS}"
    resumed, reference = (load_file(d / final / "adapter_model.safetensors") for d in (run_dir, reference_dir))
    assert resumed.keys() == reference.keys()
    for key in reference:
        assert torch.equal(resumed[key], reference[key]), key  # bitwise: fp32 on CPU, gloo sums in a fixed order
    assert losses(run_dir) == losses(reference_dir)
    # the optimizer state came back too (resumed AdamW moments, not fresh ones: a fresh optimizer would diverge)
    saved = torch.load(run_dir / final / "optimizer_full_state.pt", weights_only=False)
    assert saved["state"] and all("exp_avg" in s for s in saved["state"].values())


@pytest.mark.parametrize("family", ["gla", "llama"])
def test_train_lora_under_fsdp_trains_as_ddp_does(tmp_path, family):
    """train_lora.py (LoRA plus modules_to_save embeddings and lm_head; GLA scored by generation, an HF Llama by
    label likelihood) under FSDP and under DDP from the same config. Evaluating leaves FSDP's root unit unsharded
    (no backward follows); the checkpoint after it must still find the optimizer's parameters (trainkit.loop.reshard)."""
    import subprocess

    from test_train_lora import TINY_LLAMA, lora_config

    steps = 8
    sections = dict(training={"max_steps": steps}, lora={"dropout": 0.0},
                    logging={"eval_interval": 4, "checkpoint_interval": 4})
    if family == "llama":
        sections.update(model={"config": TINY_LLAMA}, task={"label_likelihood": True},
                        lora={"dropout": 0.0, "modules_to_save": ["embed_tokens", "lm_head"]})
    runs = {}
    for name, fsdp in (("fsdp", True), ("ddp", False)):
        command = fsdp_launch_command("train_lora.py", lora_config(tmp_path / name, **sections))
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900, env=fsdp_launch_env(fsdp))
        assert result.returncode == 0, result.stderr[-4000:]
        runs[name] = tmp_path / name / "out" / "gla"
    info = json.loads((runs["fsdp"] / "run.json").read_text())
    assert (info["distributed_type"], info["model"]["family"]) == ("FSDP", family)
    assert losses(runs["fsdp"]) == pytest.approx(losses(runs["ddp"]), rel=1e-4)
    evals = {name: [json.loads(line) for line in (d / "logs" / "eval_log.jsonl").read_text().splitlines()]
             for name, d in runs.items()}
    assert [e["step"] for e in evals["fsdp"]] == [4, 8]
    for a, b in zip(evals["fsdp"], evals["ddp"]):
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-4)
        assert a["task_score"] == b["task_score"]
    fsdp_adapter, ddp_adapter = (load_file(d / f"final-checkpoint-{steps}" / "adapter_model.safetensors")
                                 for d in runs.values())
    assert fsdp_adapter.keys() == ddp_adapter.keys()
    assert any("lm_head" in k for k in fsdp_adapter) and any("embed" in k for k in fsdp_adapter)
    for key in fsdp_adapter:
        torch.testing.assert_close(fsdp_adapter[key], ddp_adapter[key], rtol=1e-3, atol=1e-5, msg=key)

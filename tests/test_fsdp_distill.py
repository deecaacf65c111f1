"""distill.py under FSDP on 2 CPU processes (gloo): the student sharded (each decoder layer one unit), the frozen
teacher whole on every process; training equal to DDP, the final student whole in save_pretrained form (loads with
from_pretrained), exact resume after a kill.

As in tests/test_fsdp.py, tests/cpu_fsdp/sitecustomize.py lets accelerate's FSDP2 path run on CPU processes; the
same config launched without it is the DDP baseline.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers_qlora import REPO, fsdp_launch_command, fsdp_launch_env, kill_then_resume
from test_distill import distill_config, stream

pytestmark = pytest.mark.slow

STEPS, CHECKPOINT_EVERY = 8, 4


def launch_command(config: Path, *extra: str) -> list[str]:
    return fsdp_launch_command("distill.py", config, *extra)


def launch(config: Path, fsdp: bool, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(launch_command(config, *extra), cwd=REPO, capture_output=True, text=True, timeout=900,
                          env=fsdp_launch_env(fsdp))


def config(tmp_path: Path, **sections) -> Path:
    # freeze_mlp: the checkpoint must hold the frozen MLPs too (a whole student, not its trainable weights);
    # activation checkpointing auto: its probe forward runs before prepare (with a budget nothing fits: every layer)
    return distill_config(tmp_path, training={"max_steps": STEPS, "max_eval_batches": 2},
                          optimization={"micro_batch_size": 2},
                          student={"freeze_mlp": True},
                          memory={"gradient_checkpointing": "auto", "activation_memory_budget_gib": 1e-9},
                          logging={"log_interval": 1, "eval_interval": CHECKPOINT_EVERY,
                                   "checkpoint_interval": CHECKPOINT_EVERY}, **sections)


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in stream(run_dir, "training_log.jsonl")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp_distill")
    out = {}
    for name, fsdp in (("fsdp", True), ("ddp", False)):
        result = launch(config(tmp / name), fsdp)
        assert result.returncode == 0, result.stderr[-4000:]
        out[name] = (tmp / name / "out" / "kd", result)
    return out


def test_fsdp_shards_the_student_and_trains_as_ddp_does(runs):
    fsdp_dir, fsdp_result = runs["fsdp"]
    ddp_dir, _ = runs["ddp"]
    fsdp_info = json.loads((fsdp_dir / "run.json").read_text())
    assert (fsdp_info["distributed_type"], fsdp_info["world_size"], fsdp_info["status"]) == ("FSDP", 2, "finished")
    assert json.loads((ddp_dir / "run.json").read_text())["distributed_type"] == "MULTI_CPU"

    # each process holds about half of the student (every weight, the frozen MLPs included)
    sharding = fsdp_info["model"]["student"]["sharding"]
    print(f"\nstudent: {sharding['summary']}")
    assert 0.45 <= sharding["weight_share_largest_process"] <= 0.55, sharding
    assert sharding["units"] == 4  # each decoder layer its own unit (StudentKD names them for the auto wrap)
    assert f"student: {sharding['summary']}" in fsdp_result.stdout
    assert fsdp_info["model"]["sharding"] is None  # the teacher whole on every process (teacher.shard: false)
    checkpointing = fsdp_info["model"]["activation_checkpointing"]
    assert (checkpointing["policy"], checkpointing["layers"], checkpointing["budget_from"]) == \
        ("auto", 4, "memory.activation_memory_budget_gib"), checkpointing

    # the same training: FSDP's reduce-scatter and DDP's all-reduce sum the same gradients (fp32, 2 processes)
    assert len(losses(fsdp_dir)) == len(losses(ddp_dir)) == STEPS
    assert losses(fsdp_dir) == pytest.approx(losses(ddp_dir), rel=1e-4)
    evals = {name: stream(d, "eval_log.jsonl") for name, d in (("fsdp", fsdp_dir), ("ddp", ddp_dir))}
    assert [e["step"] for e in evals["fsdp"]] == [e["step"] for e in evals["ddp"]] == [4, 8]
    for a, b in zip(evals["fsdp"], evals["ddp"]):
        assert a["eval_kd_loss"] == pytest.approx(b["eval_kd_loss"], rel=1e-4)

    # the final student: every weight, in save_pretrained form, equal to DDP's
    final = f"final-checkpoint-{STEPS}"
    fsdp_student, ddp_student = (load_file(d / final / "model.safetensors") for d in (fsdp_dir, ddp_dir))
    assert fsdp_student.keys() == ddp_student.keys()
    assert any(".mlp." in k for k in fsdp_student), "the frozen MLPs are not in the checkpoint"
    for key in fsdp_student:
        torch.testing.assert_close(fsdp_student[key], ddp_student[key], rtol=1e-4, atol=1e-6, msg=key)
    assert (fsdp_dir / "best-student" / "model.safetensors").is_file()


def test_fsdp_checkpoint_holds_the_student_and_loads_with_from_pretrained(runs):
    import trainkit.students  # noqa: F401  (registers the student's model type)
    from transformers import AutoModelForCausalLM

    run_dir, _ = runs["fsdp"]
    for name in (f"checkpoint-{CHECKPOINT_EVERY}", f"final-checkpoint-{STEPS}"):
        files = {p.name for p in (run_dir / name).iterdir()}
        # no sharded model directory (pytorch_model_fsdp_0) or accelerate optimizer file
        assert not any(f.startswith("pytorch_model") for f in files), files
        assert {"model.safetensors", "config.json", "optimizer_full_state.pt", "trainer_state.json",
                "random_states_0.pkl", "random_states_1.pkl", "custom_checkpoint_0.pkl"} <= files, files
    final = run_dir / f"final-checkpoint-{STEPS}"
    student = AutoModelForCausalLM.from_pretrained(final)
    saved = load_file(final / "model.safetensors")
    loaded = student.state_dict()
    for key in saved:
        assert torch.equal(loaded[key], saved[key]), key
    with torch.no_grad():
        logits = student(input_ids=torch.randint(0, 200, (1, 16))).logits
    assert torch.isfinite(logits).all()


def test_fsdp_resume_after_a_kill_is_exact(runs, tmp_path):
    reference_dir, _ = runs["fsdp"]
    cfg = config(tmp_path)
    run_dir = tmp_path / "out" / "kd"
    kill_then_resume("distill.py", cfg, launch_command(cfg), launch_command(cfg, "--resume"), fsdp_launch_env(True),
                     run_dir, checkpoint_step=CHECKPOINT_EVERY, log_step=6, final_step=STEPS)
    final = f"final-checkpoint-{STEPS}"
    resumed, reference = (load_file(d / final / "model.safetensors") for d in (run_dir, reference_dir))
    assert resumed.keys() == reference.keys()
    for key in reference:
        assert torch.equal(resumed[key], reference[key]), key  # bitwise: fp32 on CPU, gloo sums in a fixed order
    assert losses(run_dir) == losses(reference_dir)


def test_sharded_teacher_trains_the_same_student(runs, tmp_path):
    """teacher.shard: each process keeps half of the teacher's decoder layers and embeddings (its lm_head whole, read
    by the KD loss); every teacher forward gathers the same weights, so the run is the unsharded teacher's, bitwise."""
    reference_dir, _ = runs["fsdp"]
    result = launch(config(tmp_path, teacher={"shard": True}), True)
    assert result.returncode == 0, result.stderr[-4000:]
    run_dir = tmp_path / "out" / "kd"
    sharding = json.loads((run_dir / "run.json").read_text())["model"]["sharding"]
    print(f"\nteacher: {sharding['summary']}")
    assert sharding["units"] == 5  # 4 decoder layers and the base model (embeddings, final norm)
    assert sharding["weight_share_largest_process"] < 0.6, sharding
    assert f"teacher: {sharding['summary']} (lm_head whole)" in result.stdout
    assert losses(run_dir) == losses(reference_dir)
    final = f"final-checkpoint-{STEPS}"
    sharded, reference = (load_file(d / final / "model.safetensors") for d in (run_dir, reference_dir))
    for key in reference:
        assert torch.equal(sharded[key], reference[key]), key

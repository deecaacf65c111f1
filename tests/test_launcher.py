"""launch_training.sh end to end: real subprocess runs (dry runs, bad configs, a fake script).

The launcher runs with TRAINKIT_NO_VENV=1 and this interpreter's directory first on PATH,
so no venv is built; CUDA_VISIBLE_DEVICES="" makes the CPU path the same on every machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from helpers_launcher import launcher_env, write_fake_run_config

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "launch_training.sh"
ACCELERATE_CONFIGS = ("single_gpu", "ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp", "multi_node", "cpu")

FAKE_SCRIPT = textwrap.dedent("""\
    # Stands in for a training script: records how it was called, exits with $FAKE_EXIT.
    import json, os, sys
    with open(os.environ["FAKE_OUT"], "w") as f:
        json.dump({"argv": sys.argv[1:], "env": dict(os.environ)}, f)
    if os.environ.get("FAKE_EXIT", "0") != "0":
        print("fake failure", file=sys.stderr)
    sys.exit(int(os.environ.get("FAKE_EXIT", "0")))
""")


def launch(*args, timeout=120, **env) -> subprocess.CompletedProcess:
    return subprocess.run([str(LAUNCHER), *map(str, args)], cwd=REPO, env=launcher_env(**env), text=True,
                          capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture
def fake_run(tmp_path):
    """A config whose script is FAKE_SCRIPT (no schema: the launcher passes unknown sections through)."""
    config = write_fake_run_config(tmp_path, FAKE_SCRIPT,
                                   tracking={"hf_token": "hf_CONFIGSECRET", "project": "demo"})
    return {"config": config, "run_dir": tmp_path / "out" / "run", "out": tmp_path / "called.json"}


def fake_checkpoint(run_dir: Path, step: int) -> Path:
    ckpt = run_dir / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    (ckpt / "adapter_model.safetensors").write_bytes(b"weights")
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": step}))
    return ckpt


def command_line(stdout: str) -> str:
    lines = stdout.splitlines()
    return lines[lines.index("command:") + 1]


# ---------------------------------------------------------------- dry runs


def test_help():
    r = launch("--help")
    assert r.returncode == 0
    for option in ("--config", "--num-processes", "--gpus", "--accelerate-config", "--no-resume", "--resume-from",
                   "--dry-run", "--dashboard", "--main-process-ip", "--mixed-precision"):
        assert option in r.stdout


def test_dry_run_default_config(tmp_path):
    r = launch("--dry-run", f"paths.output_dir={tmp_path}", "training.max_steps=7")
    assert r.returncode == 0, r.stderr
    assert "no GPU: training on CPU" in r.stdout
    assert "script:      train_qlora.py" in r.stdout
    assert f"run dir:     {tmp_path}/tiny-moe-qlora" in r.stdout
    cmd = command_line(r.stdout)
    assert "-m accelerate.commands.launch" in cmd
    assert "--cpu --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no" in cmd
    assert cmd.endswith(f"train_qlora.py --config training_config.yaml paths.output_dir={tmp_path} training.max_steps=7")
    assert "--resume" not in cmd
    for line in ("PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True", "TOKENIZERS_PARALLELISM=false",
                 "TORCH_NCCL_ASYNC_ERROR_HANDLING=1", "ACCELERATE_USE_CPU=1"):
        assert line in r.stdout
    assert not tmp_path.joinpath("tiny-moe-qlora").exists()


def test_dry_run_two_cpu_processes(tmp_path):
    r = launch("--dry-run", "--num-processes", "2", f"paths.output_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    cmd = command_line(r.stdout)
    assert "--multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no" in cmd
    assert "--cpu" not in cmd
    assert "ACCELERATE_USE_CPU=1" in r.stdout and "OMP_NUM_THREADS=" in r.stdout


def test_dry_run_multi_node(tmp_path):
    r = launch("--dry-run", "--num-machines", "2", "--machine-rank", "1", "--main-process-ip", "10.0.0.1",
               "--accelerate-config", "multi_node", f"paths.output_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    cmd = command_line(r.stdout)
    assert f"--config_file {REPO}/configs/accelerate/multi_node.yaml" in cmd
    assert "--num_processes 2" in cmd and "--num_machines 2" in cmd
    assert "--machine_rank 1 --main_process_ip 10.0.0.1 --main_process_port 29500" in cmd


def test_overrides_after_double_dash(tmp_path):
    r = launch("--dry-run", "--", f"paths.output_dir={tmp_path}", "lora.r=4")
    assert r.returncode == 0, r.stderr
    assert command_line(r.stdout).endswith(f"paths.output_dir={tmp_path} lora.r=4")


# ---------------------------------------------------------------- bad input: exit 2, one line


@pytest.mark.parametrize("args, message", [
    (["training.max_stepz=3"], "training.max_stepz: unknown key (did you mean training.max_steps?)"),
    (["lora.rr=3"], "lora.rr: unknown key"),  # the script's own section, checked before launching
    (["paths.data_path=/no/such/data.jsonl"], "paths.data_path: no such file or directory"),
    (["paths.model_name_or_path=./no/such/model", "model.config=null"], "paths.model_name_or_path: no such directory"),
    (["--config", "no_such_config.yaml"], "--config: no such file"),
    (["--accelerate-config", "zero9"], "--accelerate-config: no config named 'zero9'"),
    (["--resume-from", "/no/such/checkpoint"], "--resume-from: /no/such/checkpoint is not a complete checkpoint"),
    (["--num-processes", "two"], "--num-processes: expected a positive integer"),
    (["--num-machines", "2"], "--num-machines 2 needs --machine-rank"),
    (["--bogus"], "unknown option --bogus"),
    (["--no-resume", "--resume-from", "x"], "--no-resume and --resume-from exclude each other"),
    (["--gpus", "0,1"], "--gpus 0,1: no NVIDIA GPU found"),
])
def test_bad_input_exits_2_with_one_line(args, message):
    if args[0] == "--gpus" and subprocess.run("nvidia-smi -L", shell=True, capture_output=True).returncode == 0:
        pytest.skip("this machine has a GPU")
    r = launch("--dry-run", *args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert r.stdout == ""


def test_base_sections_checked_for_scripts_without_schema(fake_run):
    r = launch("--dry-run", "--config", fake_run["config"], "training.max_steps=0")
    assert r.returncode == 2
    assert r.stderr.strip() == "config error: training.max_steps: must be > 0, or -1 to train by epochs (got 0)"


# ---------------------------------------------------------------- secrets


def test_secrets_redacted_in_env_config_and_command(fake_run):
    r = launch("--dry-run", "--config", fake_run["config"], "tracking.api_key=sk-OVERRIDESECRET",
               HF_TOKEN="hf_ENVSECRET", WANDB_API_KEY="wandb_ENVSECRET", AWS_SECRET_ACCESS_KEY="aws_ENVSECRET",
               HF_HOME="/tmp/hf-home")
    assert r.returncode == 0, r.stderr
    out = r.stdout + r.stderr
    for secret in ("hf_ENVSECRET", "wandb_ENVSECRET", "hf_CONFIGSECRET", "OVERRIDESECRET"):
        assert secret not in out
    assert "HF_TOKEN=***" in out and "WANDB_API_KEY=***" in out
    assert "hf_token: '***'" in out and "project: demo" in out
    assert "tracking.api_key=***" in command_line(r.stdout)
    assert "HF_HOME=/tmp/hf-home" in out  # names without KEY/TOKEN/SECRET/PASSWORD stay readable
    assert "num_key_value_heads" not in out or "num_key_value_heads: '***'" not in out


# ---------------------------------------------------------------- resume


def test_auto_resume_when_a_complete_checkpoint_exists(fake_run):
    fake_checkpoint(fake_run["run_dir"], 10)
    incomplete = fake_run["run_dir"] / "checkpoint-20"
    incomplete.mkdir()  # no trainer_state.json: never picked
    r = launch("--dry-run", "--config", fake_run["config"])
    assert r.returncode == 0, r.stderr
    assert f"checkpoint:  {fake_run['run_dir']}/checkpoint-10 (step 10)" in r.stdout
    assert command_line(r.stdout).endswith(f"--config {fake_run['config']} --resume")

    r = launch("--dry-run", "--config", fake_run["config"], "--no-resume")
    assert r.returncode == 0
    assert "--resume" not in command_line(r.stdout)
    assert "would move" in r.stdout
    assert (fake_run["run_dir"] / "checkpoint-10" / "trainer_state.json").is_file()  # a dry run moves nothing

    ckpt = fake_run["run_dir"] / "checkpoint-10"
    r = launch("--dry-run", "--config", fake_run["config"], "--resume-from", ckpt)
    assert r.returncode == 0
    assert command_line(r.stdout).endswith(f"--resume_from {ckpt}")


def test_no_resume_moves_the_old_run_aside_and_runs_the_script(fake_run):
    run_dir = fake_run["run_dir"]
    fake_checkpoint(run_dir, 5)
    (run_dir / "logs").mkdir()
    (run_dir / "logs" / "training_log.jsonl").write_text('{"step": 5, "time": 0, "loss": 1.0}\n')
    r = launch("--config", fake_run["config"], "--no-resume", "training.seed=3", FAKE_OUT=fake_run["out"])
    assert r.returncode == 0, r.stderr
    called = json.loads(fake_run["out"].read_text())
    assert called["argv"] == ["--config", str(fake_run["config"]), "training.seed=3"]
    assert called["env"]["TOKENIZERS_PARALLELISM"] == "false"
    assert called["env"]["ACCELERATE_USE_CPU"] in ("1", "True")  # accelerate rewrites it
    old = [p for p in run_dir.parent.iterdir() if p.name.startswith("run.old-")]
    assert len(old) == 1, list(run_dir.parent.iterdir())
    assert (old[0] / "checkpoint-5" / "adapter_model.safetensors").read_bytes() == b"weights"
    assert (old[0] / "logs" / "training_log.jsonl").read_text().startswith('{"step": 5')
    assert not run_dir.exists()  # the fake script writes nothing


def test_resume_flag_reaches_the_script_and_exit_code_is_the_scripts(fake_run):
    fake_checkpoint(fake_run["run_dir"], 8)
    r = launch("--config", fake_run["config"], FAKE_OUT=fake_run["out"], FAKE_EXIT="3")
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert json.loads(fake_run["out"].read_text())["argv"][-1] == "--resume"
    assert "fake failure" in r.stderr
    assert "Traceback" not in r.stderr


def test_finished_run_is_not_retrained(fake_run):
    fake_checkpoint(fake_run["run_dir"], 8)
    (fake_run["run_dir"] / "run.json").write_text(json.dumps({"status": "finished"}))
    r = launch("--config", fake_run["config"], FAKE_OUT=fake_run["out"])
    assert r.returncode == 0
    assert "already finished" in r.stdout
    assert not fake_run["out"].exists()


# ---------------------------------------------------------------- accelerate configs


def test_accelerate_configs_parse_with_accelerate():
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    names = sorted(p.stem for p in (REPO / "configs" / "accelerate").glob("*.yaml"))
    assert names == sorted(ACCELERATE_CONFIGS)
    for name in names:
        config = load_config_from_file(str(REPO / "configs" / "accelerate" / f"{name}.yaml"))
        assert isinstance(config, ClusterConfig), name
    zero2 = load_config_from_file(str(REPO / "configs" / "accelerate" / "deepspeed_zero2.yaml"))
    assert zero2.deepspeed_config["zero_stage"] == 2
    assert load_config_from_file(str(REPO / "configs" / "accelerate" / "fsdp.yaml")).fsdp_config["fsdp_version"] == 2


@pytest.mark.parametrize("name", ["ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp"])
def test_dry_run_with_named_accelerate_config(tmp_path, name):
    r = launch("--dry-run", "--accelerate-config", name, "--num-processes", "2", f"paths.output_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    cmd = command_line(r.stdout)
    assert f"--config_file {REPO}/configs/accelerate/{name}.yaml --num_processes 2" in cmd
    assert "--cpu" not in cmd and "--multi_gpu" not in cmd


# ---------------------------------------------------------------- GPU paths, with a stand-in nvidia-smi


@pytest.fixture
def two_fake_gpus(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\n"
                   'if [ "$1" = -L ]; then echo "GPU 0: Fake H100"; echo "GPU 1: Fake H100"; exit 0; fi\n'
                   'echo "0, Fake H100, 81559 MiB, 1 MiB"; echo "1, Fake H100, 81559 MiB, 1 MiB"\n')
    smi.chmod(0o755)
    env = launcher_env()
    del env["CUDA_VISIBLE_DEVICES"]
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return env


def test_gpu_paths_with_fake_nvidia_smi(tmp_path, two_fake_gpus):
    def run(*args):
        return subprocess.run([str(LAUNCHER), "--dry-run", *args, f"paths.output_dir={tmp_path}"], cwd=REPO,
                              env=two_fake_gpus, text=True, capture_output=True, timeout=120)

    r = run()
    assert r.returncode == 0, r.stderr
    assert "0, Fake H100, 81559 MiB, 1 MiB" in r.stdout and "no GPU" not in r.stdout
    assert "--multi_gpu --num_processes 2 --num_machines 1 --mixed_precision bf16" in command_line(r.stdout)
    assert "ACCELERATE_USE_CPU" not in r.stdout

    r = run("--gpus", "1")
    assert r.returncode == 0, r.stderr
    assert "visible: CUDA_VISIBLE_DEVICES=1 (1)" in r.stdout
    assert "--num_processes 1 --num_machines 1 --mixed_precision bf16" in command_line(r.stdout)

    r = run("--num-processes", "4")
    assert r.returncode == 2
    assert "only 2 GPU(s) are visible" in r.stderr

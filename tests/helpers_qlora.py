"""Shared by the train_qlora tests: a tiny config and a way to run the script as users do."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

TINY_MOE = {
    "model_type": "mixtral", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2,
    "max_position_embeddings": 256, "router_aux_loss_coef": 0.01,
}


def tiny_config(tmp_path: Path, **sections) -> Path:
    """Write a tiny-model config under tmp_path; `sections` update the defaults per section."""
    cfg = {
        "script": "train_qlora.py",
        "paths": {"data_path": str(REPO / "data" / "tiny_corpus.jsonl"), "output_dir": str(tmp_path / "out"),
                  "run_name": "tiny"},
        "model": {"config": dict(TINY_MOE)},
        "training": {"max_steps": 12, "seed": 7, "max_seq_length": 64, "val_split": 0.05, "max_eval_batches": 2},
        "optimization": {"micro_batch_size": 4, "gradient_accumulation_steps": 1, "learning_rate": 2e-3,
                         "warmup_steps": 2, "lr_scheduler": "cosine"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.1},
        "logging": {"log_interval": 2, "eval_interval": 4, "checkpoint_interval": 4, "keep_top_k": 1,
                    "expert_stats_interval": 4, "progress_bar": False},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def script_env(**extra) -> dict:
    env = dict(os.environ)
    env.update({"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
                "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    env.update(extra)
    return env


FAULT_INJECTION_DIR = REPO / "tests" / "fault_injection"


def fault_env(**faults: str) -> dict:
    """Environment of a run with faults put in (tests/fault_injection/sitecustomize.py): e.g.
    fault_env(TRAINKIT_FAULT_NONFINITE_STEPS="3,7")."""
    path = os.pathsep.join(p for p in (str(FAULT_INJECTION_DIR), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, **faults}


def run_script(args: list[str], script: str = "train_qlora.py", timeout: int = 600, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=script_env(**env))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for torch.distributed's rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CPU_FSDP = REPO / "tests" / "cpu_fsdp"  # test-only shim: accelerate's FSDP2 path on CPU processes


def fsdp_launch_command(script: str, config: Path, *extra: str) -> list[str]:
    """`accelerate launch` of `script --config config` on 2 processes with configs/accelerate/fsdp.yaml, fp32: FSDP
    with fsdp_launch_env(True), plain DDP without the shim (accelerate runs FSDP on GPUs only)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(REPO / "configs" / "accelerate" / "fsdp.yaml"), "--num_processes", "2", "--mixed_precision", "no",
            "--main_process_port", str(29500 + (os.getpid() + len(script) + len(str(config))) % 1000),
            str(REPO / script), "--config", str(config), *extra]


def fsdp_launch_env(fsdp: bool) -> dict:
    """CPU processes; with `fsdp`, tests/cpu_fsdp/sitecustomize.py on PYTHONPATH."""
    extra = {"ACCELERATE_USE_CPU": "1"}
    if fsdp:
        extra["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CPU_FSDP), os.environ.get("PYTHONPATH")]))
    return script_env(**extra)


def run_two_processes(args: list[str], script: str = "train_qlora.py", timeout: int = 600,
                      **env) -> subprocess.CompletedProcess:
    """`script args` on 2 CPU processes (gloo) as launch_training.sh starts them on a machine without a
    GPU: `accelerate launch --multi_gpu` with ACCELERATE_USE_CPU=1 (`--cpu --num_processes 2` starts one)."""
    return subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
         str(REPO / script), *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout, env=script_env(ACCELERATE_USE_CPU="1", **env))


def one_and_two_processes(script: str, write_config, tmp_path: Path, micro_batch_size: int, **sections) -> tuple[Path, Path]:
    """The same config on 1 process with micro batch m x 2 accumulation and on 2 processes with micro
    batch m (the same rows in each optimizer step): `write_config(dir, **sections)` writes each under
    tmp_path/one and tmp_path/two; both runs must succeed. Returns the two configs' paths."""
    one = write_config(tmp_path / "one", optimization={"micro_batch_size": micro_batch_size,
                                                       "gradient_accumulation_steps": 2}, **sections)
    two = write_config(tmp_path / "two", optimization={"micro_batch_size": micro_batch_size,
                                                       "gradient_accumulation_steps": 1}, **sections)
    result = run_script(["--config", str(one)], script=script)
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_two_processes(["--config", str(two)], script=script)
    assert result.returncode == 0, result.stderr[-3000:]
    return one, two


def check_two_process_resume(script: str, config: Path, run_dir: Path, checkpoint_step: int, final_step: int,
                             weights_file: str) -> None:
    """checkpoint-<checkpoint_step> of a finished 2-process run is complete (both processes' RNG state,
    the optimizer, the weights) and, resumed on 2 processes, ends with the same final weights bitwise
    and the same training losses as the uninterrupted run."""
    import torch
    from safetensors.torch import load_file

    from trainkit.fileio import iter_jsonl

    checkpoint = run_dir / f"checkpoint-{checkpoint_step}"
    for name in ("random_states_0.pkl", "random_states_1.pkl", "optimizer.bin", weights_file, "trainer_state.json"):
        assert (checkpoint / name).is_file(), name
    final = run_dir / f"final-checkpoint-{final_step}" / weights_file
    uninterrupted, losses = load_file(final), [r["loss"] for r in iter_jsonl(run_dir / "logs" / "training_log.jsonl")]
    result = run_two_processes(["--config", str(config), "--resume_from", str(checkpoint)], script=script)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {checkpoint}" in result.stdout
    assert json.loads((run_dir / "run.json").read_text())["world_size"] == 2
    resumed = load_file(final)
    assert resumed.keys() == uninterrupted.keys()
    for key in uninterrupted:
        assert torch.equal(resumed[key], uninterrupted[key]), key
    assert [r["loss"] for r in iter_jsonl(run_dir / "logs" / "training_log.jsonl")] == losses


# Seed of the moments the kill tests draw; a failure prints the drawn state, rerun with the same seed.
KILL_SEED = int(os.environ.get("TRAINKIT_TEST_SEED", "20261130"))


def kill_at_drawn_state(script: str, config: Path, run_dir: Path, *, checkpoints: list[int], log_steps: list[int],
                        seed: int = KILL_SEED, timeout: float = 300, command: list[str] | None = None,
                        env: dict | None = None) -> tuple[int, str]:
    """Start `script --config config` (or `command`, e.g. an `accelerate launch` of several processes) and SIGKILL
    its whole process group, as when a node dies, the moment the run reaches a state drawn from a
    generator seeded with `seed`: `checkpoint-<N>` complete (N in `checkpoints`) or the training log's
    line for a step in `log_steps`. Waits for the state, never for wall time, so the kill lands at the
    same point of the run on a fast or a loaded machine. Returns (exit code, the drawn state)."""
    import random
    import signal
    import time

    states = [("checkpoint", n) for n in checkpoints] + [("log", n) for n in log_steps]
    kind, n = random.Random(f"{seed}:{script}").choice(states)
    description = f"checkpoint-{n} complete" if kind == "checkpoint" else f"training log line of step {n}"
    log = run_dir / "logs" / "training_log.jsonl"

    def reached() -> bool:
        if kind == "checkpoint":
            return (run_dir / f"checkpoint-{n}" / "trainer_state.json").is_file()
        if not log.is_file():
            return False
        steps = []
        for line in log.read_text().splitlines():
            try:
                steps.append(json.loads(line)["step"])
            except (ValueError, KeyError):  # a line being written
                pass
        return n in steps

    proc = subprocess.Popen(command or [sys.executable, str(REPO / script), "--config", str(config)], cwd=REPO,
                            env=env or script_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and not reached():
            if time.monotonic() > deadline:
                raise AssertionError(f"{script} did not reach the state ({description}) in {timeout} s")
            time.sleep(0.002)
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait(), description
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def logged_steps(run_dir: Path) -> list[int]:
    steps = []
    for line in (run_dir / "logs" / "training_log.jsonl").read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):  # a line being written
            pass
    return steps



def kill_then_resume(script: str, config: Path, command: list[str], resume_command: list[str], env: dict, run_dir: Path,
                     *, checkpoint_step: int, log_step: int, final_step: int) -> subprocess.CompletedProcess:
    """`command` (a launch of `script --config config` writing run_dir) SIGKILLed at a drawn state (kill_at_drawn_state: checkpoint
    `checkpoint_step` complete or the log line of `log_step`), then `resume_command` run to the end; checks the
    kill landed before the end and the resume continued from the checkpoint. Returns the resumed run."""
    code, state = kill_at_drawn_state(script, config, run_dir, checkpoints=[checkpoint_step],
                                      log_steps=[log_step], command=command, env=env)
    assert code == -signal.SIGKILL, f"the run ended before the kill at {state}"
    assert not (run_dir / f"final-checkpoint-{final_step}").exists()
    result = subprocess.run(resume_command, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"resumed from {run_dir / f'checkpoint-{checkpoint_step}'}" in result.stdout
    return result

def wait_for_log_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 300) -> None:
    """Wait (for a state, never for wall time) until the training log has the line of `step`."""
    import time

    log = run_dir / "logs" / "training_log.jsonl"
    deadline = time.monotonic() + timeout
    while not (log.is_file() and step in logged_steps(run_dir)):
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (code {proc.returncode}) before logging step {step}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no training log line for step {step} in {timeout} s")
        time.sleep(0.002)


def signal_at_log_step(script: str, config: Path, run_dir: Path, step: int, signum: int, *args: str,
                       timeout: float = 300, **env) -> subprocess.CompletedProcess:
    """Run `script --config config`, send `signum` once the training log has the line of `step`,
    and wait for the exit. Returns the finished process's code, stdout and stderr."""
    proc = subprocess.Popen([sys.executable, str(REPO / script), "--config", str(config), *args], cwd=REPO,
                            env=script_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_log_step(proc, run_dir, step, timeout)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()

"""Multi-node as users run it: two launch_training.sh invocations, --num-machines 2 with --machine-rank 0
and 1 against 127.0.0.1, started together on this one machine (CPU, gloo), form one job.

Both "machines" share the output directory here, as nodes on a shared file system do: machine 0 alone
locks the run directory and moves an earlier attempt aside; machine 1 only trains. The launchers run
with TRAINKIT_NO_VENV=1 (tests/helpers_launcher.py), so no venv is built.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers_launcher import launcher_env
from helpers_qlora import free_port, run_two_processes, wait_for_log_step
from test_distill import distill_config
from trainkit.fileio import iter_jsonl

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "launch_training.sh"


def start_two_machines(config: Path, *args: str, machine_args: tuple = ((), ())) -> list[subprocess.Popen]:
    """Machine 0 and machine 1 started together, as on two nodes."""
    port = str(free_port())
    env = launcher_env(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")  # one thread each, as the reference run
    return [subprocess.Popen([str(LAUNCHER), "--config", str(config), "--num-machines", "2", "--machine-rank", str(rank),
                              "--main-process-ip", "127.0.0.1", "--main-process-port", port, *args, *machine_args[rank]],
                             cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             stdin=subprocess.DEVNULL)
            for rank in (0, 1)]


def finish(procs: list[subprocess.Popen], timeout: int = 600) -> list[subprocess.CompletedProcess]:
    try:
        return [subprocess.CompletedProcess(p.args, p.returncode, out, err)
                for p in procs for out, err in [p.communicate(timeout=timeout)]]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()


def launch_two_machines(config: Path, *args: str, machine_args: tuple = ((), ()), timeout: int = 600):
    """Both machines started together and run to the end; returns both finished processes."""
    return finish(start_two_machines(config, *args, machine_args=machine_args), timeout)


def losses(run_dir: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r["tokens"]) for r in iter_jsonl(run_dir / "logs" / "training_log.jsonl")]


SECTIONS = dict(training={"max_steps": 4}, logging={"eval_interval": 2, "checkpoint_interval": 2})


@pytest.fixture(scope="module")
def two_machine_run(tmp_path_factory):
    """A tiny distillation on 2 machines x 1 CPU process, and the same config on 1 machine x 2 processes."""
    tmp = tmp_path_factory.mktemp("multi_node")
    sections = SECTIONS
    config = distill_config(tmp / "nodes", **sections)
    machines = launch_two_machines(config)
    reference = run_two_processes(["--config", str(distill_config(tmp / "one_machine", **sections))],
                                  script="distill.py", OMP_NUM_THREADS="1")
    assert reference.returncode == 0, reference.stderr[-3000:]
    return config, tmp / "nodes" / "out", machines, tmp / "one_machine" / "out" / "kd"


@pytest.mark.slow
def test_two_launchers_form_one_job(two_machine_run):
    config, out, machines, reference = two_machine_run
    for rank, result in enumerate(machines):
        assert result.returncode == 0, (rank, result.stderr[-3000:])
        assert "--num_machines 2" in result.stdout and f"--machine_rank {rank} --main_process_ip 127.0.0.1" in result.stdout
        assert "training finished" in result.stdout
    run_dir = out / "kd"
    info = json.loads((run_dir / "run.json").read_text())
    assert info["world_size"] == 2 and info["num_machines"] == 2 and info["status"] == "finished"
    assert sorted(p.name for p in out.iterdir()) == [".kd.lock", "kd"]  # one run directory, nothing moved aside
    lock = (out / ".kd.lock").read_text()
    assert "launch_training.sh" in lock  # machine 0's launcher held it (machine 1 takes no lock)
    # the same job as 2 processes on one machine: the same ranks, the same windows, bitwise the same losses
    assert losses(run_dir) == losses(reference) and len(losses(run_dir)) == 2
    checkpoint = run_dir / "checkpoint-2"
    assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()
    assert (run_dir / "final-checkpoint-4" / "model.safetensors").is_file()

    # the same commands again: the run has finished, neither machine starts anything
    again = launch_two_machines(config, timeout=300)
    for result in again:
        assert result.returncode == 0 and "already finished: nothing to do" in result.stdout, result.stderr[-2000:]


@pytest.mark.slow
def test_no_resume_moves_the_run_aside_on_machine_0_only(two_machine_run):
    config, out, _, reference = two_machine_run
    before = losses(out / "kd")
    machines = launch_two_machines(config, "--no-resume")
    for rank, result in enumerate(machines):
        assert result.returncode == 0, (rank, result.stderr[-3000:])
    assert "moved the earlier run aside" in machines[0].stdout and "moved" not in machines[1].stdout
    assert "machine 1 of 2: machine 0 locks and writes" in machines[1].stdout
    moved = [p for p in out.iterdir() if p.name.startswith("kd.old-")]
    assert len(moved) == 1 and losses(moved[0]) == before  # the earlier run, whole, moved once
    assert losses(out / "kd") == before  # trained again from the start, the same way
    assert json.loads((out / "kd" / "run.json").read_text())["num_machines"] == 2


@pytest.mark.slow
def test_machines_that_disagree_on_resuming_stop_before_touching_the_run(two_machine_run):
    """Machine 0 resumes, machine 1 starts over (as when it does not see the run directory): both exit 2
    with one line naming each rank's start, and the run directory is left as it was."""
    config, out, _, _ = two_machine_run
    run_dir = out / "kd"
    before = sorted(p.name for p in out.iterdir())
    machines = launch_two_machines(config, machine_args=(("--resume-from", str(run_dir / "checkpoint-2")), ("--no-resume",)),
                                   timeout=300)
    for result in machines:
        assert result.returncode == 2, result.stderr[-3000:]
        assert (f"config error: --resume: the processes disagree on where to start (rank 0: {run_dir / 'checkpoint-2'}; "
                "rank 1: a fresh start)") in result.stderr
    assert sorted(p.name for p in out.iterdir()) == before
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"


@pytest.mark.slow
def test_preempted_two_machine_job_resumes_on_both(two_machine_run, tmp_path):
    """SIGTERM to machine 0's launcher (a scheduler preempting node 0) once step 2 is logged: both machines
    stop after the same step with a checkpoint and exit 143; the same two commands again resume on both
    machines and end with the student of the uninterrupted run, bitwise."""
    _, _, _, reference = two_machine_run
    config = distill_config(tmp_path, **SECTIONS)
    run_dir = tmp_path / "out" / "kd"
    procs = start_two_machines(config)
    try:
        wait_for_log_step(procs[0], run_dir, 2)
    except BaseException:
        finish(procs, timeout=60)
        raise
    procs[0].send_signal(signal.SIGTERM)
    stopped = finish(procs)
    for rank, result in enumerate(stopped):
        assert result.returncode == 143, (rank, result.returncode, result.stderr[-3000:])
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "preempted" and info["total_steps"] == 4
    [preempted] = [e for e in iter_jsonl(run_dir / "logs" / "events.jsonl") if e["event"] == "preempted"]
    assert preempted["checkpoint"], preempted  # the stop saved a checkpoint (written once, by machine 0)

    resumed = launch_two_machines(config)
    for rank, result in enumerate(resumed):
        assert result.returncode == 0, (rank, result.stderr[-3000:])
        assert "launch_training.sh: resuming from" in result.stdout, result.stdout[-2000:]
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"
    final, expected = (load_file(d / "final-checkpoint-4" / "model.safetensors") for d in (run_dir, reference))
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in expected)
    assert losses(run_dir) == losses(reference)


@pytest.mark.gpu
def test_two_launchers_on_two_gpus_form_one_nccl_job(tmp_path):
    """The same two launchers on a 2-GPU machine, one GPU each (`--gpus 0` / `--gpus 1`): one NCCL job of 2
    processes whose training equals one launcher running both GPUs (within NCCL's summation order)."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs ({torch.cuda.device_count()} visible)")
    machines = launch_two_machines(distill_config(tmp_path / "nodes", **SECTIONS),
                                   machine_args=(("--gpus", "0"), ("--gpus", "1")))
    for rank, result in enumerate(machines):
        assert result.returncode == 0, (rank, result.stderr[-3000:])
    one = subprocess.run([str(LAUNCHER), "--config", str(distill_config(tmp_path / "one", **SECTIONS)), "--gpus", "0,1"],
                         cwd=REPO, env=launcher_env(HF_HUB_OFFLINE="1"), text=True, capture_output=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    nodes_dir, one_dir = tmp_path / "nodes" / "out" / "kd", tmp_path / "one" / "out" / "kd"
    info = json.loads((nodes_dir / "run.json").read_text())
    assert (info["world_size"], info["num_machines"], info["distributed_type"]) == (2, 2, "MULTI_GPU")
    print("2 launchers:", losses(nodes_dir), "\n1 launcher: ", losses(one_dir))
    for (step, loss, tokens), (step1, loss1, tokens1) in zip(losses(nodes_dir), losses(one_dir), strict=True):
        assert (step, tokens) == (step1, tokens1) and loss == pytest.approx(loss1, rel=1e-3)

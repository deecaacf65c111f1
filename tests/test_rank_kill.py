"""One rank of a 4-process run dies (SIGKILL, as the OOM killer or a dying GPU process ends it): the job
ends on its own, the failure is recorded in the run directory, and the same launch_training.sh command
resumes it. Real processes throughout: train_qlora.py on the tiny MoE config under
`./launch_training.sh --num-processes 4` (4 CPU processes, gloo), a real SIGKILL to one trainer
picked by the RANK in its environment, once checkpoint-4 is complete."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from helpers_qlora import free_port, logged_steps, tiny_config
from test_preemption import LAUNCHER, adapter, alive, descendants, launcher_env, run_info, start_launcher, stream, trainer_pids
from trainkit.fileio import iter_jsonl
from trainkit.launcher import main as launcher_main
from trainkit.runlog import RunLog

PROCESSES = 4
STEPS = 12
# A hang guard only, never a speed claim: on the 2-core CPU machine the job ended 2.5-8.4 s after the kill (10 kills).
END_BOUND_S = 120


def write_config(directory: Path) -> Path:
    # keep_top_k 3: the uninterrupted run keeps checkpoint-4 and checkpoint-8, to resume from for comparison
    return tiny_config(directory, training={"max_steps": STEPS}, logging={"keep_top_k": 3})


def launch(cfg: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([str(LAUNCHER), "--config", str(cfg), "--num-processes", str(PROCESSES),
                             "--main-process-port", str(free_port()), *args],
                            cwd=LAUNCHER.parent, env=launcher_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    return result


def kill_one_rank(cfg: Path, run_dir: Path, victim: int) -> tuple[subprocess.CompletedProcess, float]:
    """Start the launcher, SIGKILL the trainer of rank `victim` once checkpoint-4 is complete, and wait
    for the launcher to exit. Returns its result and the seconds from the kill to its exit."""
    proc = start_launcher(cfg, "--num-processes", str(PROCESSES), "--main-process-port", str(free_port()))
    try:
        while not (run_dir / "checkpoint-4" / "trainer_state.json").is_file():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.002)
        tree = descendants(proc.pid)
        ranks = trainer_pids(tree)
        assert set(ranks) == set(range(PROCESSES)), ranks
        os.kill(ranks[victim], signal.SIGKILL)
        killed_at = time.monotonic()
        try:
            out, err = proc.communicate(timeout=END_BOUND_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the job was still running {END_BOUND_S} s after rank {victim} was killed (a hang)")
        ended_after = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert not [pid for pid in tree if alive(pid)], "processes left running after the job ended"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), ended_after


@pytest.mark.slow
def test_killed_rank_is_recorded_and_the_same_command_resumes(tmp_path):
    """Rank 1 and, separately, rank 0 (which writes the logs) are killed mid-run. Each time the job
    ends within the guard, the launcher exits 1 and names the dead rank on stderr, error_log.jsonl
    gets a fatal `RankDied` line with that rank, run.json says failed (never left running), and the
    same command resumes from the latest complete checkpoint and finishes.

    The resumed run's final adapter equals, bitwise, that of the uninterrupted run resumed from the
    same checkpoint (so the kill cost nothing), and the uninterrupted run's own final adapter up to
    float32 rounding: with more than 2 processes gloo's ring all-reduce adds the 4 gradients in an
    order that depends on the element's place in DDP's bucket, and DDP lays its bucket out anew
    after the first backward of every start, so the first step after any resume sums in another
    order (2 processes: a + b = b + a, bitwise; tests/helpers_qlora.check_two_process_resume)."""
    baseline_cfg = write_config(tmp_path / "baseline")
    baseline_dir = tmp_path / "baseline" / "out" / "tiny"
    launch(baseline_cfg)
    final = f"final-checkpoint-{STEPS}"
    uninterrupted = adapter(baseline_dir / final)
    uninterrupted_losses = {r["step"]: r["loss"] for r in stream(baseline_dir, "training_log.jsonl")}
    resumed_uninterrupted: dict[int, dict] = {}  # checkpoint step -> final adapter of the baseline resumed there

    for victim in (1, 0):
        cfg = write_config(tmp_path / f"kill-rank-{victim}")
        run_dir = tmp_path / f"kill-rank-{victim}" / "out" / "tiny"
        result, ended_after = kill_one_rank(cfg, run_dir, victim)
        print(f"rank {victim} killed: the job ended {ended_after:.1f} s later, exit code {result.returncode}")

        # how the job ended: exit code 1, one line naming the rank, and the records in the run dir
        assert result.returncode == 1, (result.stdout[-2000:], result.stderr[-3000:])
        assert re.search(rf"launch_training.sh: rank {victim} \(pid \d+\) on \S+ ended without an exit code",
                         result.stderr), result.stderr[-3000:]
        died = [e for e in stream(run_dir, "error_log.jsonl") if e["type"] == "RankDied"]
        assert len(died) == 1 and died[0]["ranks"] == [victim] and died[0]["fatal"] is True, died
        assert died[0]["exit_code"] == 1 and died[0]["step"] >= 4
        info = run_info(run_dir)
        assert info["status"] == "failed" and info["exit_code"] == 1 and info["end_time"] is not None, info
        assert stream(run_dir, "events.jsonl")[-1]["event"] == "stop"
        if victim == 0:  # nothing else could write: the launcher's record is the run's error
            assert info["error"] == died[0]["message"]
        else:  # rank 0 recorded its own failure (its collective lost a peer) before the launcher's line
            own = [e for e in stream(run_dir, "error_log.jsonl") if e["type"] != "RankDied"]
            assert own and own[0]["fatal"] is True and info["error"] == own[0]["message"]

        # the same command resumes from the latest complete checkpoint and finishes
        resumed = launch(cfg)
        match = re.search(r"resuming from (\S+/checkpoint-(\d+))", resumed.stdout)
        assert match, resumed.stdout[-2000:]
        step = int(match.group(2))
        assert step >= 4 and f"resumed from {match.group(1)} at step {step}" in resumed.stdout
        info = run_info(run_dir)
        assert info["status"] == "finished" and info["exit_code"] == 0 and info["world_size"] == PROCESSES
        assert logged_steps(run_dir)[-1] == STEPS
        # the attempt's ending stays on record after the resume (runlog.kept_on_resume)
        assert [e["ranks"] for e in iter_jsonl(run_dir / "logs" / "error_log.jsonl") if e["type"] == "RankDied"] == [[victim]]

        losses = {r["step"]: r["loss"] for r in stream(run_dir, "training_log.jsonl")}
        assert {s: v for s, v in losses.items() if s <= step} == {s: v for s, v in uninterrupted_losses.items() if s <= step}
        if step not in resumed_uninterrupted:  # a copy of the baseline resumed from the same checkpoint, no kill
            reference_cfg = write_config(tmp_path / f"reference-{step}")
            reference_dir = tmp_path / f"reference-{step}" / "out" / "tiny"
            shutil.copytree(baseline_dir, reference_dir)
            launch(reference_cfg, "--resume-from", str(reference_dir / f"checkpoint-{step}"))
            resumed_uninterrupted[step] = adapter(reference_dir / final)
        got = adapter(run_dir / final)
        assert got.keys() == uninterrupted.keys()
        for key in got:
            assert torch.equal(got[key], resumed_uninterrupted[step][key]), key
            torch.testing.assert_close(got[key], uninterrupted[key], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- the launcher's end record alone
def record_end(capsys, run_dir: Path, exit_dir: Path, code: int) -> tuple[int, str]:
    assert launcher_main(["record-end", str(run_dir), "--exit-dir", str(exit_dir), "--exit-code", str(code)]) == 0
    out, err = capsys.readouterr()
    return int(out), err


def exit_dir_with(tmp_path: Path, pids: dict[int, int], codes: dict[int, int]) -> Path:
    exit_dir = tmp_path / "exit"
    exit_dir.mkdir()
    for rank, pid in pids.items():
        (exit_dir / f"pid-{rank}").write_text(f"{pid}\n")
    for rank, code in codes.items():
        (exit_dir / f"rank-{rank}").write_text(f"{code}\n")
    return exit_dir


def test_record_end_writes_nothing_when_every_rank_recorded_its_code(tmp_path, capsys):
    run_dir = tmp_path / "run"
    RunLog(run_dir).update_run_info(status="preempted", exit_code=143)
    exit_dir = exit_dir_with(tmp_path, {0: 10, 1: 11}, {0: 143, 1: 143})
    assert record_end(capsys, run_dir, exit_dir, 143) == (143, "")
    assert not (run_dir / "logs" / "error_log.jsonl").exists()
    assert run_info(run_dir)["status"] == "preempted"


def test_record_end_names_the_dead_rank_and_ends_a_run_left_running(tmp_path, capsys):
    """Rank 0 recorded no exit code (killed) and run.json still says running: a RankDied line, run.json
    failed with it, a stop event. Survivors that recorded 143 (torchrun's SIGTERM) do not make it a
    preemption: the exit code is 1."""
    run_dir = tmp_path / "run"
    log = RunLog(run_dir)
    log.update_run_info(status="running", exit_code=None)
    log.write("training", {"step": 6, "loss": 1.0})
    exit_dir = exit_dir_with(tmp_path, {0: 10, 1: 11, 2: 12}, {1: 143, 2: 143})
    code, err = record_end(capsys, run_dir, exit_dir, 143)
    assert code == 1
    assert err.startswith("launch_training.sh: rank 0 (pid 10) on ") and "error_log.jsonl" in err
    [line] = stream(run_dir, "error_log.jsonl")
    assert line["type"] == "RankDied" and line["ranks"] == [0] and line["fatal"] is True and line["step"] == 6
    info = run_info(run_dir)
    assert info["status"] == "failed" and info["exit_code"] == 1 and info["error"] == line["message"]
    assert stream(run_dir, "events.jsonl")[-1]["reason"] == "failed"


def test_record_end_keeps_the_error_rank_0_recorded(tmp_path, capsys):
    """Rank 1 died; rank 0 had recorded its own failure (its collective lost the peer): that stays
    run.json's error, the RankDied line is added."""
    run_dir = tmp_path / "run"
    RunLog(run_dir).update_run_info(status="failed", exit_code=1, error="RuntimeError: peer lost")
    exit_dir = exit_dir_with(tmp_path, {0: 10, 1: 11}, {0: 1})
    assert record_end(capsys, run_dir, exit_dir, 1)[0] == 1
    assert [e["ranks"] for e in stream(run_dir, "error_log.jsonl")] == [[1]]
    assert run_info(run_dir)["error"] == "RuntimeError: peer lost"


def test_record_end_ends_a_run_left_running_by_ranks_that_all_recorded_a_failure(tmp_path, capsys):
    """Every rank recorded its exit code, yet run.json says running (rank 0 failed before it could
    write it): a RunEnded line and status failed with the launcher's code."""
    run_dir = tmp_path / "run"
    RunLog(run_dir).update_run_info(status="running", exit_code=None)
    exit_dir = exit_dir_with(tmp_path, {0: 10, 1: 11}, {0: 1, 1: 1})
    code, err = record_end(capsys, run_dir, exit_dir, 1)
    assert code == 1 and "left run.json saying running" in err
    [line] = stream(run_dir, "error_log.jsonl")
    assert line["type"] == "RunEnded" and line["ranks"] == [] and line["fatal"] is True
    assert run_info(run_dir)["status"] == "failed" and run_info(run_dir)["exit_code"] == 1

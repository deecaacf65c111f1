"""trainkit.sweep with tests/fake_trainer.py: plan, GPU slots, concurrency, skip/resume, detach, status, SLURM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainkit.runlock import pid_alive
from trainkit.sweep.cli import main as sweep_main

REPO = Path(__file__).resolve().parents[1]
FAKE = str(REPO / "tests" / "fake_trainer.py")
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))


@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", ENV["PYTHONPATH"])
    for name in ("FAKE_TRAINER_FAIL_RUNS", "FAKE_TRAINER_FAIL_AT", "FAKE_TRAINER_STEP_SLEEP"):
        monkeypatch.delenv(name, raising=False)
    Path("configs").mkdir()
    for stem in ("a", "b"):
        Path(f"configs/{stem}.yaml").write_text("task:\n  name: sst2\ntraining:\n  seed: 0\n  max_steps: 4\n")
    return tmp_path


def args(*extra, configs=("configs/a.yaml",), seeds=("1",), datasets=("sst2",), sweep_dir="sweeps/t"):
    return ["--configs", *configs, "--seeds", *seeds, "--datasets", *datasets, "--sweep-dir", sweep_dir,
            "--script", FAKE, *extra]


def state(sweep_dir="sweeps/t") -> dict:
    return json.loads(Path(sweep_dir, "state.json").read_text())


def run_json(name: str) -> dict:
    return json.loads(Path("outputs", name, "run.json").read_text())


def one_line_error(capsys, argv, expected):
    assert sweep_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("sweep: error:") and expected in err, err


# ---------------------------------------------------------------- plan and errors
def test_plan_dry_run(work, capsys):
    argv = ["run", *args("--gpus", "0 1 3", "--gpu-plan", "2,2,1", "--dry-run",
                         configs=("configs/a.yaml", "configs/b.yaml"), seeds=("1", "2"), datasets=("sst2", "mrpc"))]
    assert sweep_main(argv) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("job "))
    assert lines[header].split() == ["job", "config", "dataset", "seed", "gpu", "slot", "run", "dir", "state"]
    rows = [line.split() for line in lines[header + 1:header + 9]]
    assert [r[0] for r in rows] == [str(i) for i in range(8)]
    assert [tuple(r[1:4]) for r in rows[:3]] == [("configs/a.yaml", "sst2", "1"), ("configs/a.yaml", "sst2", "2"),
                                                 ("configs/a.yaml", "mrpc", "1")]
    assert [r[4] for r in rows[:5]] == ["gpu0#0", "gpu1#0", "gpu3#0", "gpu0#1", "gpu1#1"]
    assert all(r[4:6] == ["next", "free"] for r in rows[5:])
    assert rows[0][-2:] == ["outputs/a__sst2__seed1", "todo"] and rows[7][-2] == "outputs/b__mrpc__seed2"
    assert "5 slots" in out and "dry run" in out
    assert not Path("sweeps/t/state.json").exists() and not Path("outputs").exists()


def test_errors_are_one_line(work, capsys):
    one_line_error(capsys, ["run", *args(configs=("configs/nope.yaml",))], "no such file: configs/nope.yaml")
    one_line_error(capsys, ["run", *args("--gpus", "0 1", "--gpu-plan", "2,x")], "'x' is not a number")
    one_line_error(capsys, ["run", *args("--gpus", "0 1 3", "--gpu-plan", "2,1")], "2 numbers for 3 GPUs")
    one_line_error(capsys, ["run", *args("--script", "missing.py")], "no such file: missing.py")
    one_line_error(capsys, ["run", *args("--gpus", "", "--", "training.seed=3")], "the sweep sets training.seed")
    one_line_error(capsys, ["slurm", *args("--partition", "p", "--", "oops")], "expected section.key=value")


# ---------------------------------------------------------------- scheduling
def test_gpu_slots_and_concurrency_limit(work, capsys):
    argv = ["run", *args("--gpus", "0,1", "--gpu-plan", "2,1", "--foreground", "--poll-interval", "0.05",
                         "--", "fake.step_sleep=0.1", seeds=("1", "2", "3"), datasets=("sst2", "mrpc"))]
    assert sweep_main(argv) == 0
    jobs = state()["jobs"]
    assert [j["state"] for j in jobs] == ["finished"] * 6 and state()["scheduler_state"] == "done"
    intervals = {"0": [], "1": []}
    for j in jobs:
        info = run_json(j["run_name"])
        assert info["status"] == "finished"
        # the job's GPU reached the trainer, and the slot belongs to that GPU
        assert info["cuda_visible_devices"] == j["gpu"] == j["cuda_visible_devices"]
        assert j["slot"].startswith(f"gpu{j['gpu']}#") and j["exit_code"] == 0
        a = info["attempts"][-1]
        intervals[j["gpu"]].append((a["start"], a["end"]))
        assert j["start_time"] <= a["start"] <= a["end"] <= j["end_time"]

    def max_overlap(spans):
        events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans], key=lambda x: (x[0], x[1]))
        now = peak = 0
        for _, d in events:
            now += d
            peak = max(peak, now)
        return peak

    assert max_overlap(intervals["0"]) <= 2 and max_overlap(intervals["1"]) <= 1
    # jobs really ran side by side: the scheduler started the next ones before it saw the first end (its own
    # record; the trainers' own start..end overlap only when their start-up jitter is shorter than their run)
    assert max_overlap([(j["start_time"], j["end_time"]) for j in jobs]) >= 2
    by_slot = {}
    for j in jobs:
        by_slot.setdefault(j["slot"], []).append((j["start_time"], j["end_time"]))
    assert set(by_slot) <= {"gpu0#0", "gpu0#1", "gpu1#0"}
    for spans in by_slot.values():  # one job at a time per slot
        spans.sort()
        assert all(prev[1] <= nxt[0] for prev, nxt in zip(spans, spans[1:]))
    log = Path(jobs[0]["log"]).read_text()
    assert "=== " in log and "CUDA_VISIBLE_DEVICES='0'" in log and "fake trainer: finished" in log


def test_rerun_skips_finished_and_resumes_failed_only_with_checkpoint(work, capsys, monkeypatch):
    argv = ["run", *args("--gpus", "", "--cpu-slots", "2", "--foreground", "--poll-interval", "0.05",
                         seeds=("1", "2", "3"))]
    # seed 2 fails after its step-2 checkpoint; seed 3 fails at step 1, before any checkpoint
    monkeypatch.setenv("FAKE_TRAINER_FAIL_RUNS", "a__sst2__seed2=3,a__sst2__seed3=1")
    assert sweep_main(argv) == 1
    assert [j["state"] for j in state()["jobs"]] == ["finished", "failed", "failed"]
    assert [j["exit_code"] for j in state()["jobs"]] == [0, 1, 1]
    assert run_json("a__sst2__seed1")["cuda_visible_devices"] == ""  # CPU slots hide the GPUs
    assert run_json("a__sst2__seed2")["status"] == "failed"
    capsys.readouterr()

    monkeypatch.delenv("FAKE_TRAINER_FAIL_RUNS")
    assert sweep_main(argv) == 0
    out = capsys.readouterr().out
    plan = {line.split()[-2]: line.split()[-1] for line in out.splitlines() if line.split()[-2:-1]
            and line.split()[-2].startswith("outputs/")}
    assert plan == {"outputs/a__sst2__seed1": "finished-skip", "outputs/a__sst2__seed2": "resume",
                    "outputs/a__sst2__seed3": "todo"}
    jobs = state()["jobs"]
    assert [j["state"] for j in jobs] == ["skipped", "finished", "finished"]
    assert [j["resume"] for j in jobs] == [None, True, False]
    assert len(run_json("a__sst2__seed1")["attempts"]) == 1  # not started again
    seed2 = run_json("a__sst2__seed2")
    assert "--resume" in seed2["argv"] and seed2["attempts"][-1]["resume"] and seed2["resumed_from"].endswith("checkpoint-2")
    assert len(seed2["attempts"]) == 2 and seed2["status"] == "finished"
    seed3 = run_json("a__sst2__seed3")
    assert "--resume" not in seed3["argv"] and seed3["status"] == "finished"
    assert "--resume" in jobs[1]["command"] and "--resume" not in jobs[2]["command"]

    one_line_error(capsys, argv, "nothing to run")


def test_sigterm_interrupts_jobs(work):
    argv = [sys.executable, "-m", "trainkit.sweep", "run",
            *args("--gpus", "", "--cpu-slots", "2", "--foreground", "--poll-interval", "0.05", "--grace", "5",
                  "--", "fake.step_sleep=0.5", "training.max_steps=40", seeds=("1", "2", "3"))]
    proc = subprocess.Popen(argv, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        while not all(Path(f"outputs/a__sst2__seed{s}/logs/training_log.jsonl").exists() for s in (1, 2)):
            # both trainers in their loop (SIGTERM handled) before the signal; a slow start fails here, clearly
            assert time.time() < deadline and proc.poll() is None, "the trainers did not start their loop"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    jobs = state()["jobs"]
    assert [j["state"] for j in jobs] == ["interrupted", "interrupted", "queued"]
    assert state()["scheduler_state"] == "interrupted"
    for name in ("a__sst2__seed1", "a__sst2__seed2"):
        info = run_json(name)
        assert info["status"] == "failed" and info["attempts"][-1]["exit"] == 143  # the trainer saw SIGTERM
        assert not pid_alive(info["pid"])


# ---------------------------------------------------------------- detached mode and status
def test_detached_scheduler_survives_its_parent_and_status(work, capsys):
    release = work / "release"   # the trainers hold after their last step until it exists
    argv = [sys.executable, "-m", "trainkit.sweep", "run",
            *args("--gpus", "0", "--gpu-plan", "2", "--poll-interval", "0.05",
                  "--", f"fake.hold_file={release}", "training.max_steps=3", seeds=("1", "2"))]
    # the launcher gets its own session, like a terminal's shell job; then the "terminal" goes away
    launcher = subprocess.Popen(argv, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    out, _ = launcher.communicate(timeout=30)
    launcher_done = time.time()
    assert launcher.returncode == 0, out
    assert "started detached scheduler pid" in out and "a__sst2__seed1" in out
    try:
        os.killpg(launcher.pid, signal.SIGHUP)  # hang up the launcher's session: must not reach the scheduler
    except ProcessLookupError:
        pass
    pid = int(Path("sweeps/t/scheduler.pid").read_text())
    try:
        assert pid != launcher.pid and os.getsid(pid) != launcher.pid
        deadline = time.time() + 10
        while time.time() < deadline and any(j["state"] != "running" for j in state()["jobs"]):
            time.sleep(0.02)
        capsys.readouterr()
        assert sweep_main(["status", "--sweep-dir", "sweeps/t"]) == 0
        status_out = capsys.readouterr().out
        assert f"alive (pid {pid})" in status_out and "2 running" in status_out
        release.touch()   # only now can the jobs end: after the launcher did, and after status saw them running
        deadline = time.time() + 30
        while time.time() < deadline and state().get("scheduler_state") == "running":
            time.sleep(0.1)
        final = state()
        assert final["scheduler_state"] == "done" and final["detached"] is True
        assert [j["state"] for j in final["jobs"]] == ["finished", "finished"]
        assert all(j["end_time"] > launcher_done for j in final["jobs"])  # they outlived the launcher
        assert all(run_json(j["run_name"])["cuda_visible_devices"] == "0" for j in final["jobs"])
        assert "scheduler pid" in Path("sweeps/t/sweep.log").read_text()
        deadline = time.time() + 10
        while time.time() < deadline and pid_alive(pid):
            time.sleep(0.05)
        capsys.readouterr()
        assert sweep_main(["status"]) == 0  # default: the newest sweeps/*/state.json
        lines = capsys.readouterr().out.splitlines()
        assert "scheduler not running (last state: done" in lines[0] and "2 finished" in lines[0]
        assert lines[1].split() == ["job", "run", "state", "gpu", "elapsed", "step", "task_score", "exit"]
        row = lines[2].split()
        assert row[:4] == ["0", "a__sst2__seed1", "finished", "0"] and row[5] == "3/3" and row[-1] == "0"
        assert float(row[6]) > 0 and row[7] == "@3"
        assert sweep_main(["status", "--sweep-dir", "sweeps/t", "--json"]) == 0
        js = json.loads(capsys.readouterr().out)
        assert js["scheduler_alive"] is False and js["jobs"][1]["step"] == 3 and js["jobs"][1]["total_steps"] == 3
    finally:
        release.touch()
        if pid_alive(pid):
            os.kill(pid, signal.SIGTERM)


# ---------------------------------------------------------------- SLURM
def test_slurm_script(work, capsys, tmp_path):
    # one run already finished: it stays out of the array
    done = Path("outputs/a__sst2__seed1")
    done.mkdir(parents=True)
    (done / "run.json").write_text(json.dumps({"status": "finished"}, indent=2))
    argv = ["slurm", *args("--partition", "gpu", "--gpus-per-job", "1", "--time", "04:00:00", "--max-concurrent",
                           "2", "--out", "sweep.sbatch", "--python", sys.executable, "--",
                           "training.max_steps=2", seeds=("1", "2"), datasets=("sst2", "mrpc"))]
    assert sweep_main(argv) == 0
    out = capsys.readouterr().out
    assert "sbatch sweep.sbatch" in out and "finished-skip" in out
    text = Path("sweep.sbatch").read_text()
    assert text.startswith("#!/bin/bash\n")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gres=gpu:1", "#SBATCH --time=04:00:00",
                 "#SBATCH --array=0-2%2", f"#SBATCH --output={tmp_path}/sweeps/t/logs/slurm-%A_%a.out"):
        assert line in text.splitlines()
    assert "SLURM_ARRAY_TASK_ID" in text and '"${ARGV[@]}"' in text and "eval " not in text
    tasks_block = text.split('case "$i" in\n')[1].split("\nesac")[0]
    argvs = [line for line in tasks_block.splitlines() if "ARGV=(" in line]
    assert len(argvs) == 3 and "a__sst2__seed1" not in tasks_block
    assert "task.name=sst2 training.seed=2 paths.run_name=a__sst2__seed2" in argvs[0]
    assert "--resume" not in argvs[0] and "training.max_steps=2" in argvs[0]
    assert subprocess.run(["bash", "-n", "sweep.sbatch"]).returncode == 0
    # run array task 1 the way SLURM would (CUDA_VISIBLE_DEVICES set by SLURM)
    env = dict(ENV, SLURM_ARRAY_TASK_ID="1", SLURM_ARRAY_JOB_ID="77", CUDA_VISIBLE_DEVICES="5")
    res = subprocess.run(["bash", "sweep.sbatch"], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    info = run_json("a__mrpc__seed1")
    assert info["status"] == "finished" and info["cuda_visible_devices"] == "5" and "--resume" not in info["argv"]
    assert "slurm job 77_1" in Path("sweeps/t/logs/a__mrpc__seed1.log").read_text()
    res = subprocess.run(["bash", "sweep.sbatch"], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "is finished: skipped" in res.stdout
    # a failed run with a checkpoint gets --resume
    info_path = Path("outputs/a__mrpc__seed1/run.json")
    info_path.write_text(json.dumps({**info, "status": "failed"}, indent=2))
    res = subprocess.run(["bash", "sweep.sbatch"], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "--resume" in run_json("a__mrpc__seed1")["argv"]


def test_slurm_arguments_reach_the_job_unevaluated(work, capsys):
    # spaces, both quotes, $(...), backticks and ; in an output dir and an override value: the task
    # must pass each to the trainer as one argument, exactly, and the shell must run none of them
    value = """it's a "quoted" $(touch pwned) `touch pwned2`; touch pwned3 ${HOME}"""
    out_dir = "out dir $(touch pwned4)"
    argv = ["slurm", *args("--partition", "gpu", "--out", "sweep.sbatch", "--python", sys.executable,
                           "--output-dir", out_dir, "--", f"fake.note={value}", "training.max_steps=2")]
    assert sweep_main(argv) == 0
    env = dict(ENV, SLURM_ARRAY_TASK_ID="0", SLURM_ARRAY_JOB_ID="9")
    res = subprocess.run(["bash", "sweep.sbatch"], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    info = json.loads(Path(out_dir, "a__sst2__seed1", "run.json").read_text())
    assert info["status"] == "finished"
    assert f"fake.note={value}" in info["argv"] and f"paths.output_dir={out_dir}" in info["argv"]
    assert not any(Path(name).exists() for name in ("pwned", "pwned2", "pwned3", "pwned4"))

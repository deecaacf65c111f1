"""benchmarks/run_all.py on CPU: the benchmarks run in their --tiny mode as subprocesses, and the one table's
rows and ratios come from the benchmarks' own JSON rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fla")
pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[1]
SHORT, LONG = 32, 64  # run_all's tiny stand-ins for T=2048 and T=8192


def table_line(stdout: str, workload: str) -> list[str]:
    """The cells of the printed table's row for `workload`."""
    lines = [line for line in stdout.splitlines() if line.startswith(f"| {workload} |")]
    assert len(lines) == 1, f"{workload!r}: {len(lines)} table lines"
    return [cell.strip() for cell in lines[0].strip("|").split("|")]


@pytest.mark.slow
def test_run_all_tiny_lora_distill(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/run_all.py", "--tiny", "--only", "lora,distill",
                           "--out-dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "bench_all_cpu-tiny.json").read_text())
    log = (tmp_path / "bench_all_cpu-tiny.log").read_text()
    jobs = {job["name"]: job for job in result["jobs"]}
    assert sorted(jobs) == ["distill_loss", "distill_students", "lora_1.3b", "lora_374m"]
    assert all(job["rc"] == 0 for job in jobs.values())
    assert result["header"]["device"] == "cpu" and result["header"]["mode"] == "tiny"
    assert "torch" in result["header"]["versions"]

    def bench_row(job, **match):
        (row,) = [r for r in jobs[job]["data"]["rows"] if all(r[k] == v for k, v in match.items())]
        return row

    # (workload, job, baseline row, project row, goal, speed goal)
    ge, gt = float.__ge__, float.__gt__
    expected = []
    for shape, job in (("374M", "lora_374m"), ("1.3B (fla-hub/gla-1.3B-100B)", "lora_1.3b")):
        for seq, speed in ((SHORT, 1.0), (LONG, 1.5)):
            expected.append((f"GLA LoRA vs Llama LoRA, {shape} shape, T={seq}", job, {"model": "llama", "seq": seq},
                             {"model": "gla", "seq": seq}, f"speed >= {speed:g}x, memory <= 1x", (ge, speed)))
    for student in ("llama", "discrete_mamba2"):
        expected.append((f"distill, {student} student, T={SHORT}: chunked vs naive KD loss", "distill_loss",
                         {"student": student, "loss": "naive"}, {"student": student, "loss": "chunked"},
                         "speed >= 1.2x, memory <= 0.5x", (ge, 1.2)))
    for mixer in ("discrete_mamba2", "gla"):
        for seq, goal, speed_goal in ((SHORT, "speed >= 1x", (ge, 1.0)), (LONG, "speed > 1x", (gt, 1.0))):
            expected.append((f"distill, {mixer} vs llama student, chunked loss, T={seq}", "distill_students",
                             {"student": "llama", "seq": seq}, {"student": mixer, "seq": seq}, goal, speed_goal))

    assert [row["workload"] for row in result["rows"]] == [f"{e[0]} (tiny stand-in)" for e in expected]
    for (workload, job, base_match, project_match, goal, (meets, target)), row in zip(expected, result["rows"]):
        baseline, project = bench_row(job, **base_match), bench_row(job, **project_match)
        speed = project["tokens_per_s"] / baseline["tokens_per_s"]
        assert row["ratio"] == f"speed x{speed:.2f}, memory n/a"  # no peak memory on CPU
        assert row["baseline"] == f"{baseline['tokens_per_s']:,.0f} tok/s"
        assert row["project"] == f"{project['tokens_per_s']:,.0f} tok/s"
        assert row["goal"] == goal
        # a missed speed goal is a no; a memory goal cannot be judged on CPU (n/a); speed alone can
        if not meets(speed, target):
            assert row["met"] == f"no: speed {speed:.2f}"
        else:
            assert row["met"] == ("n/a: no memory figure" if "memory" in goal else "yes")
        ckpt = [f"{str(r['checkpointing']).lower()} {r['checkpointed_layers']}/{r['decoder_layers']}" for r in (project, baseline)]
        assert row["config"] == (f"ckpt {ckpt[0]} vs {ckpt[1]}; "
                                 f"first step {project['first_step_s']:.1f} s vs {baseline['first_step_s']:.1f} s")
        # the printed table and the log carry the same row
        cells = table_line(proc.stdout, row["workload"])
        assert cells == [row["workload"], row["baseline"], row["project"], row["ratio"], row["goal"], row["met"],
                         row["config"]]
        assert f"| {row['workload']} | {row['baseline']} |" in log
    # every subprocess's output is in the log
    for name, job in jobs.items():
        assert f"## {name} (finished " in log and job["output"] in log
    assert "GLA / Llama tokens/s" in jobs["lora_374m"]["output"]


def run_all(*args, out_dir):
    return subprocess.run([sys.executable, "benchmarks/run_all.py", "--tiny", *args, "--out-dir", str(out_dir)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_run_all_failed_or_killed_benchmark_gives_failed_rows_and_merge_keeps_earlier_jobs(tmp_path):
    """A benchmark that exits with an error or is killed by --timeout: its rows say why, the run exits 1. --merge: a later run of
    other jobs keeps the earlier jobs' results in the table and the log."""
    proc = run_all("--only", "lora", "--checkpointing", "sometimes", out_dir=tmp_path)
    assert proc.returncode == 1, proc.stdout[-3000:]
    result = json.loads((tmp_path / "bench_all_cpu-tiny.json").read_text())
    assert [job["rc"] for job in result["jobs"]] == [2, 2]  # config error
    assert len(result["rows"]) == 4
    for row in result["rows"]:
        assert row["met"] == "failed"
        assert row["baseline"].startswith("failed: config error: ") and "memory.gradient_checkpointing" in row["baseline"]

    proc = run_all("--only", "first_step_cold", "--checkpointing", "never", "--merge", out_dir=tmp_path)
    assert proc.returncode == 1, proc.stdout[-3000:]
    result = json.loads((tmp_path / "bench_all_cpu-tiny.json").read_text())
    assert [job["name"] for job in result["jobs"]] == ["lora_374m", "lora_1.3b", "first_step_cold"]
    assert len(result["rows"]) == 5
    assert "'never'" in result["rows"][-1]["baseline"] and "'sometimes'" in result["rows"][0]["baseline"]
    log = (tmp_path / "bench_all_cpu-tiny.log").read_text()
    assert log.count("config error: memory.gradient_checkpointing") == 3 + 5  # each job's output, each table row

    proc = run_all("--only", "distill_loss", "--timeout", "0.5", "--merge", out_dir=tmp_path)
    assert proc.returncode == 1, proc.stdout[-3000:]
    result = json.loads((tmp_path / "bench_all_cpu-tiny.json").read_text())
    assert [job["name"] for job in result["jobs"]] == ["lora_374m", "lora_1.3b", "distill_loss", "first_step_cold"]
    killed = [row for row in result["rows"] if row["workload"].startswith("distill, ")]
    assert len(killed) == 2
    assert all(row["baseline"] == "failed: killed: still running after --timeout 0.5 s" for row in killed)


def test_bench_lora_profile_writes_operator_tables(tmp_path):
    """--profile: 2 more steps per row under torch.profiler, their operator tables in DIR, gpu_busy in the row."""
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, "benchmarks/bench_lora.py", "--tiny", "--seqs", "32", "--profile",
                           str(tmp_path / "prof"), "--json", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["model"] for r in rows} == {"gla", "llama"}
    for r in rows:
        assert r["gpu_busy"] == 0 and r["profiled_step_ms"] > 0  # CPU: no kernel time
        text = (tmp_path / "prof" / f"profile_tiny_{r['model']}_32.txt").read_text()
        assert text.startswith("2 steps, ") and "by GPU time:" in text and "by host time:" in text
        assert "aten::mm" in text or "aten::addmm" in text


@pytest.mark.slow
def test_bench_multi_gpu_tiny_runs_each_setup_through_the_launcher(tmp_path):
    """benchmarks/bench_multi_gpu.py --tiny on CPU: one process and two (DDP on CPU: accelerate runs FSDP on GPUs
    only) through ./launch_training.sh, their figures read back from each run's run.json and training log."""
    proc = subprocess.run([sys.executable, "benchmarks/bench_multi_gpu.py", "--tiny", "--setups", "1gpu,ddp2",
                           "--out-dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "bench_multi_gpu_cpu.json").read_text())
    rows = {r["setup"]: r for r in result["rows"]}
    assert rows["1gpu"]["distributed_type"] == "NO" and rows["ddp2"]["distributed_type"] == "MULTI_CPU"
    for row in rows.values():
        assert row["tokens_per_sec"] > 0 and row["base_gib_whole"] > 0 and row["loss_last"] > 0
        assert row["base_gib_per_gpu"] == row["base_gib_whole"]  # DDP: every process holds the whole base
    table = (tmp_path / "bench_multi_gpu_cpu.md").read_text()
    assert "| ddp2 | 2 | MULTI_CPU |" in table and "x1.000" in table

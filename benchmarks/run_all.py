#!/usr/bin/env python
"""Every benchmark pair of issue 13 in one command: runs the benchmarks, prints one table of ratios and goals.

    python benchmarks/run_all.py                          # GPU: every pair (tens of minutes on an H200)
    python benchmarks/run_all.py --quick                  # fewer steps: a smoke run of the GPU paths
    python benchmarks/run_all.py --only lora,first_step   # some groups: lora, qlora, distill, first_step
    python benchmarks/run_all.py --tiny                   # CPU: every benchmark in its --tiny mode
    python benchmarks/run_all.py --checkpointing false    # memory.gradient_checkpointing of every project side
    python benchmarks/run_all.py --only qlora_moe --merge # one job; the table keeps the other jobs' earlier results
    python benchmarks/run_all.py --only qlora --set memory.activation_memory_budget_gib=2.5   # a config key

Each benchmark runs as a subprocess (`python benchmarks/bench_X.py ... --json TMP`), its lines printed as they
come, prefixed with the job's name. Every figure of the table comes from those JSON files: tokens/s and peak
memory of the baseline and the project side, their ratios, the issue's goal and whether the ratio meets it,
and the configuration that ran (activation checkpointing: the config value and how many decoder layers it
checkpointed; first-step time). A benchmark that fails gives rows saying `failed: <its last output line>`
(rows it wrote before failing still count) and makes the exit status 1; the other benchmarks still run.

Written to --out-dir (default docs/): bench_all_<device>.log (the header, the table, then every subprocess's
full output) and bench_all_<device>.json (header, rows, and every job's command, exit status and JSON);
<device> is the GPU's name as a slug, plus -quick or -tiny. With --merge the jobs of the existing JSON that
this run does not repeat are kept (their output too), so several short commands build one table. Both files
are rewritten after every job; --timeout kills a job that runs too long (its rows then say so).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import operator
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
GROUPS = ("lora", "qlora", "distill", "first_step")
PACKAGES = ("torch", "transformers", "flash-linear-attention", "peft", "bitsandbytes", "triton", "accelerate")
# (timed steps, warm-up steps) per benchmark and mode
STEPS = {"full": {"lora": (5, 2), "qlora": (8, 3), "distill": (10, 3)},
         "quick": {"lora": (2, 1), "qlora": (3, 1), "distill": (3, 1)},
         "tiny": {"lora": (1, 0), "qlora": (1, 0), "distill": (1, 0)}}
SEQS = {"full": (2048, 8192), "quick": (2048, 8192), "tiny": (32, 64)}  # the short and long sequence
OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt}


@dataclass
class Job:
    name: str
    group: str
    script: str
    args: list[str]
    env: dict = field(default_factory=dict)


@dataclass
class Goal:
    metric: str        # speed or memory (project / baseline)
    op: str            # >=, <=, >
    target: float

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.target:g}" + ("x" if self.metric in ("speed", "memory") else " s")


@dataclass
class Row:
    workload: str
    baseline: str
    project: str
    ratio: str
    goal: str
    met: str
    config: str


def jobs_for(mode: str, selected: list[str], checkpointing: str | None, cache_dir: Path,
             autotune_table: str | None = None, settings: list[str] = ()) -> list[Job]:
    """The subprocesses to run, in order: those of the selected groups, and the selected jobs by name."""
    short, long = SEQS[mode]
    tiny = ["--tiny"] if mode == "tiny" else []
    ckpt = ["--checkpointing", checkpointing] if checkpointing is not None else []
    ckpt += [arg for setting in settings for arg in ("--set", setting)]

    def steps(bench):
        timed, warmup = STEPS[mode][bench]
        return ["--steps", str(timed), "--warmup", str(warmup)]

    dump = ["--dump-autotune-table", autotune_table] if autotune_table else []
    lora = [*tiny, *ckpt, *dump, *steps("lora"), "--seqs", str(short), str(long)]
    first = [*tiny, *ckpt, "--shape", "374m", "--models", "gla", "--seqs", str(short), "--steps", "1", "--warmup", "0"]
    qlora = [*tiny, *ckpt, *steps("qlora")]
    distill = [*tiny, *ckpt, *steps("distill")]
    cache_env = {"TRITON_CACHE_DIR": str(cache_dir), "TRITON_CACHE_AUTOTUNING": "1"}
    jobs = {
        "lora": [Job("lora_374m", "lora", "bench_lora.py", [*lora, "--shape", "374m"]),
                 Job("lora_1.3b", "lora", "bench_lora.py", [*lora, "--shape", "1.3b"])],
        "qlora": [Job("qlora_dense", "qlora", "bench_qlora.py", [*qlora, "--models", "dense",
                                                                  "--order", "standard,bf16_lora,trainkit"]),
                  Job("qlora_moe", "qlora", "bench_qlora.py", [*qlora, "--models", "moe", "--order", "standard,trainkit"])],
        "distill": [Job("distill_loss", "distill", "bench_distill.py", [*distill, "--students", "llama,discrete_mamba2",
                                                                          "--seqs", str(short), "--variants", "naive,chunked"]),
                    Job("distill_students", "distill", "bench_distill.py",
                        [*distill, "--students", "llama,discrete_mamba2,gla", "--seqs", f"{short},{long}",
                         "--variants", "chunked"])],
        # the same fresh Triton cache for both: empty for the first process, filled by it for the second
        "first_step": [Job("first_step_cold", "first_step", "bench_lora.py", first, cache_env),
                       Job("first_step_warm", "first_step", "bench_lora.py", first, cache_env)],
    }
    every = [job for group in GROUPS for job in jobs[group]]
    return [job for job in every if job.group in selected or job.name in selected]


def run_job(job: Job, json_path: Path, timeout: float | None) -> dict:
    """Run one benchmark, echoing its output with a prefix; returns its result (command, rc, seconds, finish
    time, last line, its JSON, its whole output). A job running longer than `timeout` seconds is killed."""
    command = [sys.executable, str(HERE / job.script), *job.args, "--json", str(json_path)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1", **job.env}
    shown = " ".join(f"{k}={v}" for k, v in job.env.items()) + (" " if job.env else "") + " ".join(command)
    print(f"[{job.name}] $ {shown}", flush=True)
    started = time.perf_counter()
    lines = []
    with subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1, errors="replace") as proc:
        watchdog = threading.Timer(timeout, proc.kill) if timeout else None
        if watchdog:
            watchdog.start()
        try:
            for line in proc.stdout:
                print(f"[{job.name}] {line}", end="", flush=True)
                lines.append(line)
        finally:
            if watchdog:
                watchdog.cancel()
    seconds = time.perf_counter() - started
    if timeout and seconds >= timeout and proc.returncode != 0:
        lines.append(f"killed: still running after --timeout {timeout:g} s\n")
    last = next((line.strip() for line in reversed(lines) if line.strip()), "no output")
    data = json.loads(json_path.read_text()) if json_path.is_file() else None
    print(f"[{job.name}] exit status {proc.returncode} after {seconds:.0f} s", flush=True)
    return {"name": job.name, "command": shown, "rc": proc.returncode, "seconds": round(seconds, 1),
            "finished": utc_now(), "last_line": last[:300], "data": data, "output": "".join(lines)}


# ---------------------------------------------------------------------------------------------- table rows

class Missing(Exception):
    """A row the table needs is not in a benchmark's JSON (the benchmark failed before writing it)."""


def find(result: dict, **match) -> dict:
    rows = (result["data"] or {}).get("rows", [])
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()):
            return row
    raise Missing(", ".join(f"{k}={v}" for k, v in match.items()))


def figure(row: dict) -> str:
    text = f"{row['tokens_per_s']:,.0f} tok/s"
    return text + (f", {row['peak_gib']:.2f} GiB" if row.get("peak_gib") is not None else "")


def ratios(project: dict, baseline: dict) -> dict:
    memory = (project["peak_gib"] / baseline["peak_gib"]
              if project.get("peak_gib") is not None and baseline.get("peak_gib") else None)
    return {"speed": project["tokens_per_s"] / baseline["tokens_per_s"], "memory": memory}


def verdict(values: dict, goals: list[Goal]) -> str:
    """yes, no (naming what missed) or n/a (a figure the goal needs is missing, e.g. memory on CPU)."""
    missed, unknown = [], []
    for goal in goals:
        value = values.get(goal.metric)
        if value is None:
            unknown.append(goal.metric)
        elif not OPS[goal.op](value, goal.target):
            missed.append(f"{goal.metric} {value:.2f}")
    if missed:
        return "no: " + ", ".join(missed)
    return f"n/a: no {', '.join(unknown)} figure" if unknown else "yes"


def checkpointing(row: dict) -> str:
    return f"{str(row['checkpointing']).lower()} {row['checkpointed_layers']}/{row['decoder_layers']}"


def pair_row(workload: str, baseline: dict, project: dict, goals: list[Goal]) -> Row:
    values = ratios(project, baseline)
    memory = f"x{values['memory']:.2f}" if values["memory"] is not None else "n/a"
    config = (f"ckpt {checkpointing(project)} vs {checkpointing(baseline)}; "
              f"first step {project['first_step_s']:.1f} s vs {baseline['first_step_s']:.1f} s")
    return Row(workload, figure(baseline), figure(project), f"speed x{values['speed']:.2f}, memory {memory}",
               ", ".join(map(str, goals)), verdict(values, goals), config)


def failed_row(workload: str, goals: list[Goal], result: dict, missing: str) -> Row:
    """The row of a pair whose figures are missing: the benchmark's last output line when it failed."""
    reason = (f"failed: {result['last_line']}" if result["rc"] != 0
              else f"failed: no row {missing} in {result['name']}'s JSON")
    return Row(workload, reason, "", "", ", ".join(map(str, goals)), "failed", "")


def table_rows(mode: str, results: dict[str, dict]) -> list[tuple[Row, bool]]:
    """(row, ok) for every pair of the selected jobs, in the issue's order."""
    short, long = SEQS[mode]
    out: list[tuple[Row, bool]] = []

    def add(workload, job, goals, make):
        """The row `make(result)` builds from `job`'s result, or a failed row; nothing when `job` did not run."""
        if job not in results:
            return
        result = results[job]
        try:
            out.append((make(result), True))
        except Missing as e:
            out.append((failed_row(workload, goals, result, str(e)), False))

    for shape, job in (("374M", "lora_374m"), ("1.3B (fla-hub/gla-1.3B-100B)", "lora_1.3b")):
        for seq, speed in ((short, 1.0), (long, 1.5)):
            goals = [Goal("speed", ">=", speed), Goal("memory", "<=", 1.0)]
            name = f"GLA LoRA vs Llama LoRA, {shape} shape, T={seq}"
            add(name, job, goals, lambda r, seq=seq, goals=goals, name=name:
                pair_row(name, find(r, model="llama", seq=seq), find(r, model="gla", seq=seq), goals))
    for key, job in (("1.1B dense", "qlora_dense"), ("Mixtral-shaped MoE", "qlora_moe")):
        goals = [Goal("speed", ">=", 4.0), Goal("memory", "<=", 0.6)]
        name = f"QLoRA {key}: trainkit vs HF standard recipe"
        add(name, job, goals, lambda r, goals=goals, name=name:
            pair_row(name, find(r, side="standard"), find(r, side="trainkit"), goals))
    goals = [Goal("speed", ">=", 1.0)]
    name = "QLoRA 1.1B dense: trainkit vs unquantized HF bf16 LoRA"
    add(name, "qlora_dense", goals, lambda r: pair_row(name, find(r, side="bf16_lora"), find(r, side="trainkit"), goals))
    for student in ("llama", "discrete_mamba2"):
        goals = [Goal("speed", ">=", 1.2), Goal("memory", "<=", 0.5)]
        name = f"distill, {student} student, T={short}: chunked vs naive KD loss"
        add(name, "distill_loss", goals, lambda r, student=student, goals=goals, name=name:
            pair_row(name, find(r, student=student, loss="naive"), find(r, student=student, loss="chunked"), goals))
    for mixer in ("discrete_mamba2", "gla"):
        for seq, goal in ((short, Goal("speed", ">=", 1.0)), (long, Goal("speed", ">", 1.0))):
            name = f"distill, {mixer} vs llama student, chunked loss, T={seq}"
            add(name, "distill_students", [goal], lambda r, mixer=mixer, seq=seq, goal=goal, name=name:
                pair_row(name, find(r, student="llama", seq=seq), find(r, student=mixer, seq=seq), [goal]))
    for job, cache, limit in (("first_step_cold", "empty", 60.0), ("first_step_warm", "warm", 10.0)):
        goal = Goal("first step", "<=", limit)
        name = f"first GLA LoRA step, 374M shape, T={short}, Triton cache {cache}"

        def first_step(r, cache=cache, goal=goal, name=name):
            row = find(r, model="gla")
            seen = "cold" if cache == "empty" else "warm"
            met = verdict({"first step": row["first_step_s"]}, [goal])
            if r["data"]["device"] == "cpu":  # the reference GLA backend compiles no Triton kernels
                met = "n/a: no Triton kernels on CPU"
            elif row["triton_cache"] != seen:
                met = f"invalid: the cache was {row['triton_cache']}"
            return Row(name, "", f"{row['first_step_s']:.1f} s (cache {row['triton_cache']} at start)", "",
                       str(goal), met, f"ckpt {checkpointing(row)}")
        add(name, job, [goal], first_step)
    return out


def markdown(rows: list[Row]) -> str:
    lines = ["| workload | baseline | project | ratio (project / baseline) | goal | met? | config (project vs baseline) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        cells = [str(value).replace("|", "\\|") for value in asdict(row).values()]  # an error line may hold a |
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main

def device_name() -> str:
    """The GPU's name, asked in a subprocess (this process stays off the GPU); 'cpu' without one."""
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.get_device_name(0) "
                            "if torch.cuda.is_available() else 'cpu')"], capture_output=True, text=True)
    return probe.stdout.strip().splitlines()[-1] if probe.returncode == 0 and probe.stdout.strip() else "unknown device"


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def job_log(result: dict) -> str:
    return (f"\n## {result['name']} (finished {result['finished']})\n$ {result['command']}\n{result['output']}"
            f"exit status {result['rc']} after {result['seconds']:.0f} s\n")


def versions() -> dict:
    found = {}
    for package in PACKAGES:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer timed and warm-up steps (smoke run on a GPU)")
    mode.add_argument("--tiny", action="store_true", help="every benchmark in its --tiny mode (CPU smoke test)")
    parser.add_argument("--only", default=",".join(GROUPS),
                        help=f"comma list of groups ({', '.join(GROUPS)}) or jobs (e.g. lora_374m, qlora_dense)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the other jobs' results from the existing bench_all_<device>.json: the table and "
                             "log then cover every job run so far (for machines that allow only short commands)")
    parser.add_argument("--checkpointing", default=None,
                        help="memory.gradient_checkpointing of every project side (auto, true, false); default: the config's")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a trainkit config key of every project side (repeatable), e.g. "
                             "memory.activation_memory_budget_gib=2.5; the job's command in the log shows it")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds a job may run before it is killed (its rows then say so); default: no limit")
    parser.add_argument("--out-dir", default=str(REPO / "docs"), help="where the log and JSON go (default docs/)")
    parser.add_argument("--dump-autotune-table", metavar="DIR", default=None,
                        help="the lora jobs write the kernel configs fla's autotuners chose to DIR (bench_lora.py "
                             "--dump-autotune-table; how trainkit/fla_autotune/<GPU>/ is made)")
    args = parser.parse_args(argv)
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    selected = [name.strip() for name in args.only.split(",") if name.strip()]
    known = {*GROUPS, *(job.name for job in jobs_for(mode, list(GROUPS), None, Path()))}
    unknown = sorted(set(selected) - known)
    if not selected:
        parser.error("--only: no group or job given")
    if unknown:
        parser.error(f"--only: unknown {unknown} (groups: {', '.join(GROUPS)}; jobs: "
                     f"{', '.join(sorted(known - set(GROUPS)))})")

    device = device_name()
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-") + ("" if mode == "full" else f"-{mode}")
    out_dir = Path(args.out_dir)
    log_path, json_path = out_dir / f"bench_all_{slug}.log", out_dir / f"bench_all_{slug}.json"
    found = versions()
    header = {"device": device, "date": utc_now(), "mode": mode, "versions": found,
              "command": " ".join(["python", "benchmarks/run_all.py", *sys.argv[1:]])}
    header_text = (f"Device: {device}; {header['date']}; "
                   + ", ".join(f"{name} {version}" for name, version in found.items())
                   + f"; mode {mode}\n$ {header['command']}")
    print(header_text, flush=True)

    results: dict[str, dict] = {}
    if args.merge and json_path.is_file():
        earlier = json.loads(json_path.read_text())
        results = {job["name"]: job for job in earlier["jobs"]}
        print(f"merging with the jobs in {json_path}: {', '.join(results)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_all_") as tmp:
        for job in jobs_for(mode, selected, args.checkpointing, Path(tmp) / "triton-cache", args.dump_autotune_table,
                            args.set):
            results[job.name] = run_job(job, Path(tmp) / f"{job.name}.json", args.timeout)
            # written after every job: a run stopped from outside keeps what finished (--merge continues it)
            summary, failed = write_outputs(mode, header, header_text, results, log_path, json_path, args.merge)
    print(f"\n{summary}", flush=True)
    print(f"wrote {log_path} and {json_path}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def write_outputs(mode: str, header: dict, header_text: str, results: dict[str, dict], log_path: Path,
                  json_path: Path, merge: bool) -> tuple[str, list[str]]:
    """Write the log and the JSON of `results`; returns (the header and the table, what failed: jobs, rows)."""
    order = [job.name for job in jobs_for(mode, list(GROUPS), None, Path())]
    results = {name: results[name] for name in order if name in results}
    rows = table_rows(mode, results)
    if mode == "tiny":  # the workloads' names are the GPU shapes; say that tiny models stood in for them
        for row, _ in rows:
            row.workload += " (tiny stand-in)"
    table = markdown([row for row, _ in rows])
    if merge:
        header_text += "\njobs finished: " + ", ".join(f"{name} {r['finished']}" for name, r in results.items())
    log_path.parent.mkdir(parents=True, exist_ok=True)
    summary = f"{header_text}\n\n{table}\n"
    log_path.write_text(f"{summary}\n# Output of every benchmark\n" + "".join(job_log(r) for r in results.values()))
    json_path.write_text(json.dumps({"header": header, "rows": [asdict(row) for row, _ in rows],
                                     "jobs": list(results.values())}, indent=1))
    failed_jobs = [r["name"] for r in results.values() if r["rc"] != 0]
    failed_rows = sum(not ok for _, ok in rows)
    failed = ([f"jobs {', '.join(failed_jobs)}"] if failed_jobs else []) + ([f"{failed_rows} rows without figures"]
                                                                            if failed_rows else [])
    return summary, failed


if __name__ == "__main__":
    sys.exit(main())

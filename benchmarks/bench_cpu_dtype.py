"""The default QLoRA job on a CPU: bf16 vs fp32 compute, side by side in one run.

    python benchmarks/bench_cpu_dtype.py [--steps 12] [--rounds 2] [--config training_config.yaml]

Runs train_qlora.py as users do (its own process, the default config) for `--steps` optimizer
steps with `quantization.compute_dtype=bfloat16` and `=float32`, alternating the order each
round so that a machine getting busier or quieter does not favour one side. Prints, per dtype,
the mean seconds per optimizer step (from training_log.jsonl's step_time, steps 3.. so that
the first steps' warm-up does not count), the loss at the last step and the ratio. This is the
measurement behind `compute_dtype: auto` choosing float32 on CPUs (trainkit.runtime.resolve_dtype);
run it on a CPU with AVX512-bf16 or AMX to see whether bf16 wins there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def run_once(config: str, dtype: str, steps: int, workdir: Path) -> dict:
    out = workdir / dtype
    cmd = [sys.executable, str(REPO / "train_qlora.py"), "--config", config,
           f"quantization.compute_dtype={dtype}", f"training.max_steps={steps}", f"paths.output_dir={out}",
           "paths.run_name=bench", "logging.log_interval=1", f"logging.eval_interval={steps + 1}",
           f"logging.checkpoint_interval={steps + 1}", "logging.progress_bar=false"]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"train_qlora.py ({dtype}) failed:\n{result.stderr[-2000:]}")
    lines = [json.loads(line) for line in (out / "bench" / "logs" / "training_log.jsonl").read_text().splitlines()]
    timed = [r["step_time"] for r in lines if r["step"] >= 3]
    return {"step_time": statistics.mean(timed), "loss": lines[-1]["loss"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "training_config.yaml"))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    results: dict[str, list[dict]] = {"bfloat16": [], "float32": []}
    with tempfile.TemporaryDirectory(prefix="bench-cpu-dtype-") as tmp:
        for r in range(args.rounds):
            order = ["bfloat16", "float32"] if r % 2 == 0 else ["float32", "bfloat16"]
            for dtype in order:
                res = run_once(args.config, dtype, args.steps, Path(tmp) / f"round{r}")
                results[dtype].append(res)
                print(f"round {r + 1} {dtype:8s}: {res['step_time']:.3f} s/step, loss at step {args.steps} "
                      f"{res['loss']:.4f}", flush=True)

    flags = cpu_flags()
    native = [f for f in ("avx512_bf16", "amx_bf16") if f in flags] or ["none"]
    print(f"\nCPU: {cpu_model()}, {os.cpu_count()} cores; native bf16 flags: {', '.join(native)}")
    print(f"default config, {args.steps} steps, {args.rounds} rounds (order alternated)\n")
    print("| compute dtype | s / step (mean of rounds) | loss at last step |")
    print("| --- | ---: | ---: |")
    means = {}
    for dtype, runs in results.items():
        means[dtype] = statistics.mean(r["step_time"] for r in runs)
        losses = ", ".join(f"{r['loss']:.4f}" for r in runs)
        print(f"| {dtype} | {means[dtype]:.3f} | {losses} |")
    print(f"\nbf16 / fp32 step time: x{means['bfloat16'] / means['float32']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

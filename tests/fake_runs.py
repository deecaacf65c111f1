"""Realistic run directories for the dashboard's tests, demos and benchmark.

    python tests/fake_runs.py OUT_DIR                 # five runs: dense/MoE, finished/running/failed/stalled, a resume
    python tests/fake_runs.py OUT_DIR --live          # ... then keep appending to the running run (Ctrl-C stops)
    python tests/fake_runs.py OUT_DIR --big-lines 1000000   # one run with a huge training_log.jsonl

Everything is written through trainkit.runlog (RunLog and its field names), the same
contract the trainers follow, so the dashboard is tested against what trainers write.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run as a script: trainkit from this checkout

from trainkit.fileio import write_json_atomic  # noqa: E402
from trainkit.runlog import (BEST_ADAPTER_DIR, CHECKPOINT_PREFIX, FINAL_CHECKPOINT_PREFIX,  # noqa: E402
                             TRAINER_STATE_FILE, RunLog)

RUN_NAMES = ("dense-qlora-finished", "moe-qlora-running", "dense-lora-failed", "moe-resumed", "dense-stalled")

OOM_TRACEBACK = """Traceback (most recent call last):
  File "train_qlora.py", line 512, in <module>
    main()
  File "train_qlora.py", line 468, in main
    loss = train_step(model, batch)
  File "train_qlora.py", line 301, in train_step
    accelerator.backward(loss)
torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.50 GiB. GPU 0 has a total capacity of 79.10 GiB of which 1.21 GiB is free."""


class SyntheticRun:
    """One fake training run; ``advance()`` writes the records of one more optimizer step."""

    def __init__(self, root: Path, name: str, *, moe: bool, total_steps: int, seed: int = 0,
                 eval_every: int = 50, checkpoint_every: int = 100, keep_top: int = 2,
                 log_every: int = 1, step_time: float = 0.8, start_time: float | None = None):
        self.run_dir = Path(root) / name
        self.log = RunLog(self.run_dir)
        self.name, self.moe, self.total_steps = name, moe, total_steps
        self.rng = random.Random(seed)
        self.eval_every, self.checkpoint_every, self.keep_top = eval_every, checkpoint_every, keep_top
        self.log_every, self.step_time = log_every, step_time
        self.clock = start_time if start_time is not None else time.time() - total_steps * step_time
        self.step = 0
        self.tokens = 0
        self.best: float | None = None
        self.kept: list[tuple[float, int]] = []   # (metric, step) of checkpoints on disk
        self.num_layers, self.num_experts, self.top_k = 6, 8, 2
        self.hot_expert = self.rng.randrange(self.num_experts)
        self.log.update_run_info(
            run_name=name, script="train_qlora.py", status="running", start_time=self.clock,
            last_start_time=self.clock, end_time=None, total_steps=total_steps, world_size=8, num_machines=1,
            mixed_precision="bf16", pid=os.getpid(), resumed_from=None,
            versions={"python": "3.11.9", "torch": "2.5.1", "transformers": "5.0.0", "peft": "0.14.0"},
            model={"name": "Qwen3-30B-A3B" if moe else "Llama-3.1-8B", "family": "qwen3_moe" if moe else "llama",
                   "is_moe": moe, "parameters": 30.5e9 if moe else 8.0e9, "trainable_parameters": 41.9e6},
            config={"training": {"learning_rate": 2e-4, "max_steps": total_steps}, "lora": {"r": 16, "alpha": 32}})
        self.log.event(0, "start", f"started {name}", total_steps=total_steps, world_size=8, time=self.clock)

    # the curves -----------------------------------------------------------------------------
    def loss_at(self, step: int) -> float:
        base = 1.9 + 8.6 * math.exp(-step / 60) + 0.6 * math.exp(-step / 400)
        return max(0.05, base + self.rng.gauss(0, 0.06 + 0.02 * math.exp(-step / 200)))

    def lr_at(self, step: int) -> float:
        warmup = max(1, self.total_steps // 20)
        if step < warmup:
            return 2e-4 * step / warmup
        progress = (step - warmup) / max(1, self.total_steps - warmup)
        return 2e-5 + (2e-4 - 2e-5) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def advance(self, now: float | None = None) -> None:
        self.step += 1
        step = self.step
        self.clock = now if now is not None else self.clock + self.step_time * self.rng.uniform(0.9, 1.1)
        tokens_per_sec = 11800 * self.rng.uniform(0.93, 1.05) * (0.8 if self.moe else 1.0)
        self.tokens += int(tokens_per_sec * self.step_time)
        if step % self.log_every == 0:
            spike = 4.0 if self.rng.random() < 0.01 else 1.0
            self.log.write("training", {
                "step": step, "time": self.clock, "epoch": round(step / 1200, 5),
                "loss": round(self.loss_at(step), 5), "lr": self.lr_at(step),
                "grad_norm": round((0.35 + 2.5 * math.exp(-step / 50)) * spike * self.rng.uniform(0.8, 1.25), 4),
                "tokens": self.tokens, "tokens_per_sec": round(tokens_per_sec, 1),
                "step_time": round(self.step_time, 4),
                "eta_seconds": round((self.total_steps - step) * self.step_time, 1),
                "total_steps": self.total_steps,
                "memory_allocated_gb": round(14.2 + self.rng.uniform(-0.2, 0.2), 3),
                "memory_peak_gb": 17.8,
                "router_aux_loss": round(0.012 + 0.02 * math.exp(-step / 150), 5) if self.moe else None})
        if self.moe and step % 20 == 0:
            self._expert_snapshot(step)
        if step % self.eval_every == 0:
            self._evaluate(step)
        if step % self.checkpoint_every == 0:
            self._checkpoint(step)

    def _expert_snapshot(self, step: int) -> None:
        layers = []
        for layer in range(self.num_layers):
            loads = [self.rng.uniform(0.6, 1.4) for _ in range(self.num_experts)]
            loads[(self.hot_expert + layer) % self.num_experts] *= 1.5 + 2.0 * math.exp(-step / 300)
            if layer == self.num_layers - 1 and step < 200:
                loads[-1] = 0.0   # a dead expert early in training
            total = 4096 * self.top_k
            counts = [int(total * x / sum(loads)) for x in loads]
            mean = sum(counts) / len(counts)
            probs = [c / max(1, sum(counts)) for c in counts]
            layers.append({"layer": layer, "tokens_per_expert": counts,
                           "load_imbalance": round(max(counts) / mean, 4),
                           "router_entropy": round(-sum(p * math.log(p) for p in probs if p > 0), 4),
                           "dead_experts": sum(1 for c in counts if c == 0)})
        self.log.write("experts", {
            "step": step, "time": self.clock, "num_experts": self.num_experts, "top_k": self.top_k,
            "tokens_routed": 4096 * self.top_k * self.num_layers,
            "mean_load_imbalance": round(sum(l["load_imbalance"] for l in layers) / len(layers), 4),
            "total_dead_experts": sum(l["dead_experts"] for l in layers), "layers": layers})

    def _evaluate(self, step: int) -> None:
        eval_loss = self.loss_at(step) + 0.12 + self.rng.uniform(-0.05, 0.05)
        is_best = self.best is None or eval_loss < self.best
        if is_best:
            self.best = eval_loss
        self.log.write("eval", {"step": step, "time": self.clock, "eval_loss": round(eval_loss, 5),
                                "perplexity": round(math.exp(eval_loss), 3), "eval_tokens": 65536,
                                "eval_seconds": round(self.rng.uniform(20, 30), 2), "metric": "eval_loss",
                                "metric_value": round(eval_loss, 5), "is_best": is_best})
        self.log.event(step, "eval", f"eval_loss {eval_loss:.4f}", time=self.clock, eval_loss=round(eval_loss, 5),
                       metric="eval_loss", metric_value=round(eval_loss, 5))
        self.last_eval = eval_loss
        if is_best:
            self.log.event(step, "new_best", f"new best eval_loss {eval_loss:.4f}", time=self.clock,
                           metric="eval_loss", metric_value=round(eval_loss, 5),
                           path=str(self.run_dir / f"{CHECKPOINT_PREFIX}{step}"))

    def _write_checkpoint(self, path: Path, step: int, metric: float | None) -> int:
        path.mkdir(parents=True, exist_ok=True)
        (path / "adapter_model.safetensors").write_bytes(b"\0" * (40_000 + step))
        (path / "adapter_config.json").write_text(json.dumps({"r": 16, "lora_alpha": 32}))
        write_json_atomic(path / TRAINER_STATE_FILE, {"step": step, "metric_name": "eval_loss",
                                                     "metric_value": metric})
        return sum(f.stat().st_size for f in path.iterdir())

    def _checkpoint(self, step: int) -> None:
        metric = round(getattr(self, "last_eval", self.loss_at(step)), 5)
        path = self.run_dir / f"{CHECKPOINT_PREFIX}{step}"
        size = self._write_checkpoint(path, step, metric)
        self.log.event(step, "checkpoint_saved", f"saved {path.name}", time=self.clock, path=str(path),
                       size_bytes=size, metric="eval_loss", metric_value=metric)
        self.kept.append((metric, step))
        self.kept.sort()
        if metric <= self.kept[0][0]:
            best = self.run_dir / BEST_ADAPTER_DIR
            shutil.rmtree(best, ignore_errors=True)
            shutil.copytree(path, best)
        while len(self.kept) > self.keep_top:
            _, old = self.kept.pop()
            old_path = self.run_dir / f"{CHECKPOINT_PREFIX}{old}"
            shutil.rmtree(old_path, ignore_errors=True)
            self.log.event(step, "checkpoint_deleted", f"deleted {old_path.name} (top-{self.keep_top})",
                           time=self.clock, path=str(old_path))

    # endings ----------------------------------------------------------------------------------
    def finish(self) -> None:
        path = self.run_dir / f"{FINAL_CHECKPOINT_PREFIX}{self.step}"
        size = self._write_checkpoint(path, self.step, self.best)
        self.log.event(self.step, "checkpoint_saved", f"saved {path.name}", time=self.clock, path=str(path),
                       size_bytes=size)
        self.log.event(self.step, "stop", "training finished", time=self.clock, reason="finished")
        self.log.update_run_info(status="finished", end_time=self.clock)

    def fail(self) -> None:
        self.error("OutOfMemoryError", "CUDA out of memory. Tried to allocate 2.50 GiB", OOM_TRACEBACK, fatal=True)
        self.log.event(self.step, "stop", "training failed: CUDA out of memory", time=self.clock, reason="failed")
        self.log.update_run_info(status="failed", end_time=self.clock,
                                 error="OutOfMemoryError: CUDA out of memory. Tried to allocate 2.50 GiB")

    def error(self, type_: str, message: str, traceback: str | None = None, fatal: bool = False) -> None:
        # RunLog.error stamps the wall clock; a simulated run needs its own clock
        self.log.write("errors", {"step": self.step, "time": self.clock, "type": type_, "message": message,
                                  "traceback": traceback, "fatal": fatal})

    def nan_skip(self) -> None:
        self.error("NonFiniteLoss", f"loss is nan at step {self.step}; optimizer step skipped")
        self.log.event(self.step, "nan_skip", "non-finite loss, step skipped", time=self.clock, consecutive=1)

    def resume_from(self, step: int) -> None:
        """Crash and resume from checkpoint ``step`` *without* truncating the logs: the reader drops the rest."""
        self.step = step
        self.clock += 45.0
        self.tokens = int(self.tokens * 0.9)
        path = self.run_dir / f"{CHECKPOINT_PREFIX}{step}"
        self.log.event(step, "resume", f"resumed from {path.name}", time=self.clock, path=str(path))
        self.log.update_run_info(last_start_time=self.clock, resumed_from=str(path))


def set_mtime(run_dir: Path, when: float) -> None:
    for path in [run_dir / "run.json", *sorted((run_dir / "logs").glob("*.jsonl"))]:
        os.utime(path, (when, when))


def generate(out_dir: str | os.PathLike, seed: int = 0, scale: float = 1.0) -> dict[str, SyntheticRun]:
    """Write the five standard runs; ``scale`` shrinks or stretches their lengths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    now = time.time()
    n = lambda steps: max(10, int(steps * scale))
    every = {"eval_every": max(5, int(50 * scale)), "checkpoint_every": max(10, int(100 * scale))}
    runs = {}

    run = SyntheticRun(out, "dense-qlora-finished", moe=False, total_steps=n(400), seed=seed, **every,
                       start_time=now - 7200)
    for _ in range(run.total_steps):
        run.advance()
    run.finish()
    runs[run.name] = run

    run = SyntheticRun(out, "dense-lora-failed", moe=False, total_steps=n(600), seed=seed + 1, **every,
                       start_time=now - 5400)
    for _ in range(n(180)):
        run.advance()
    run.fail()
    runs[run.name] = run

    run = SyntheticRun(out, "moe-resumed", moe=True, total_steps=n(350), seed=seed + 2, **every, start_time=now - 3600)
    for _ in range(n(260)):
        run.advance()
    run.error("RuntimeError", "NCCL watchdog timeout on rank 3",
              "Traceback (most recent call last):\n  ...\nRuntimeError: NCCL watchdog timeout on rank 3", fatal=True)
    run.resume_from(n(200))
    while run.step < run.total_steps:
        run.advance()
    run.finish()
    runs[run.name] = run

    run = SyntheticRun(out, "dense-stalled", moe=False, total_steps=n(500), seed=seed + 3, **every, start_time=now - 9000)
    for _ in range(n(120)):
        run.advance()
    set_mtime(run.run_dir, now - 3 * 3600)
    runs[run.name] = run

    # last, so it is the most recent run: the legacy /api/* endpoints answer for it
    run = SyntheticRun(out, "moe-qlora-running", moe=True, total_steps=n(1000), seed=seed + 4, **every,
                       start_time=now - n(300) * 0.8)
    for _ in range(n(300)):
        run.advance()
        if run.step == n(137):
            run.nan_skip()
    runs[run.name] = run
    return runs


def write_big_log(out_dir: str | os.PathLike, lines: int, name: str = "big-run", start_time: float | None = None) -> Path:
    """A run whose training_log.jsonl has ``lines`` lines, written fast (for the benchmark)."""
    run_dir = Path(out_dir) / name
    log = RunLog(run_dir)
    start = start_time if start_time is not None else time.time() - lines * 0.5
    log.update_run_info(run_name=name, script="train_qlora.py", status="running", start_time=start,
                        last_start_time=start, total_steps=lines * 2, world_size=8,
                        model={"name": "synthetic", "is_moe": False})
    rng = random.Random(0)
    with open(log.path("training"), "w") as f:
        chunk = []
        for step in range(1, lines + 1):
            chunk.append(big_log_line(step, start + step * 0.5, lines * 2, rng))
            if len(chunk) == 10000:
                f.write("".join(chunk))
                chunk = []
        f.write("".join(chunk))
    return run_dir


def big_log_line(step: int, when: float, total: int, rng: random.Random) -> str:
    loss = 2.0 + 8.0 * math.exp(-step / 20000) + rng.gauss(0, 0.05)
    return ('{"step":%d,"time":%.3f,"epoch":%.5f,"loss":%.5f,"lr":%.3e,"grad_norm":%.4f,"tokens":%d,'
            '"tokens_per_sec":%.1f,"step_time":0.5,"eta_seconds":%.1f,"total_steps":%d,'
            '"memory_allocated_gb":14.2,"memory_peak_gb":17.8,"router_aux_loss":null}\n'
            % (step, when, step / 1e5, loss, 2e-4, 0.4 + rng.random() * 0.1, step * 6000,
               12000 + rng.random() * 500, (total - step) * 0.5, total))


def live(runs: dict[str, SyntheticRun], rate: float, duration: float | None) -> None:
    """Keep the running run training: ``rate`` steps per second."""
    run = runs["moe-qlora-running"]
    ends = time.time() + duration if duration else math.inf
    print(f"appending to {run.run_dir} at {rate:g} steps/s (Ctrl-C stops)", flush=True)
    try:
        while time.time() < ends and run.step < run.total_steps:
            run.advance(now=time.time())
            time.sleep(1.0 / rate)
        if run.step >= run.total_steps:
            run.finish()
    except KeyboardInterrupt:
        pass


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python tests/fake_runs.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the runs' lengths")
    parser.add_argument("--live", action="store_true", help="then keep appending to moe-qlora-running")
    parser.add_argument("--rate", type=float, default=2.0, help="steps per second with --live")
    parser.add_argument("--duration", type=float, default=None, help="seconds of --live (default: until Ctrl-C)")
    parser.add_argument("--big-lines", type=int, default=0, help="only write one run with this many training lines")
    args = parser.parse_args(argv)
    if args.big_lines:
        print(write_big_log(args.out_dir, args.big_lines))
        return
    runs = generate(args.out_dir, seed=args.seed, scale=args.scale)
    print("\n".join(str(r.run_dir) for r in runs.values()), flush=True)
    if args.live:
        live(runs, args.rate, args.duration)


if __name__ == "__main__":
    main()

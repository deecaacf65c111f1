#!/usr/bin/env python
"""LoRA training speed: GLA (flash-linear-attention, Triton chunk kernels) vs a Llama of the same size (SDPA).

    python benchmarks/bench_lora.py                         # GPU: the 374M shape at 2,048 and 8,192 tokens per sequence
    python benchmarks/bench_lora.py --shape 1.3b            # the fla-hub/gla-1.3B-100B shape and its Llama twin
    python benchmarks/bench_lora.py --models gla --seqs 2048 --steps 5 --json out.json
    python benchmarks/bench_lora.py --checkpointing false --set lora.dropout=0.05
    python benchmarks/bench_lora.py --seqs 2048 --profile prof/   # where a step's GPU and host time go
    python benchmarks/bench_lora.py --tiny                  # CPU smoke test (tiny models, reference GLA backend)

Both models are random-init, built and adapted exactly as train_lora.py does (trainkit.models.load_model,
trainkit.adapters.apply_lora with the family preset, trainkit.gla.guard_adapter_paths) from a train_lora
config: LoRA r=16 (alpha 32, dropout 0) on every attention/mixer and MLP projection, the rest the config
defaults (bf16 base on a GPU, memory.gradient_checkpointing unless --checkpointing sets it, any key --set
names), AdamW. Shapes (--shape):

- 374m: GLA hidden 1024, 24 layers, 4 heads (fla's GLAConfig defaults otherwise); Llama hidden 1024,
  24 layers, 16 heads of 64, the GLA's MLP width (2816);
- 1.3b: fla-hub/gla-1.3B-100B, i.e. fla's GLAConfig defaults (hidden 2048, 24 layers, 4 heads, expand_k 0.5,
  expand_v 1, hidden_ratio 4, untied head); Llama hidden 2048, 24 layers, 16 heads of 128, the GLA's MLP width
  (2048 * 4 * 2/3 rounded up to a multiple of 256 = 5632).

Vocabulary 32,000. Each (model, sequence length) trains the same number of tokens per step (--tokens-per-step):
batch = tokens / sequence length.

Printed per row: the first step's time (for GLA it includes Triton's compile and autotuning of fla's
kernels for that shape: minutes on a cold cache), tokens/s and step time over the timed steps after
--warmup steps, peak GPU memory (torch.cuda.max_memory_allocated, reset per row) and the checkpointing
that ran (the config value and how many decoder layers it checkpointed). Compiled kernels and autotuning
results go to TRITON_CACHE_DIR with TRITON_CACHE_AUTOTUNING=1 (set here unless set), so a second run of
the benchmark starts fast: the `triton cache` column says whether the cache held kernels when the row started.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TRITON_CACHE_DIR", str(Path.home() / ".triton" / "cache"))
os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

from bench_common import (VocabOnly, add_config_args, apply_checkpointing, checkpointed_layers,  # noqa: E402
                          trainkit_config)

# (hidden, layers, Llama heads, MLP width): the GLA's MLP width is its hidden_ratio-4 SwiGLU width
# (hidden * 4 * 2/3, rounded up to a multiple of 256), given to both models so their MLPs match.
SHAPES = {"374m": (1024, 24, 16, 2816), "1.3b": (2048, 24, 16, 5632), "tiny": (64, 2, 4, 256)}
TINY = {"vocab": 1000, "tokens_per_step": 64, "seqs": [32, 64], "steps": 2, "warmup": 0}


def model_config(name: str, shape: str) -> dict:
    hidden, layers, llama_heads, intermediate = SHAPES[shape]
    if name == "gla":
        return {"model_type": "gla", "hidden_size": hidden, "num_hidden_layers": layers, "num_heads": 4,
                "intermediate_size": intermediate, "max_position_embeddings": 16384, "tie_word_embeddings": False}
    return {"model_type": "llama", "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": llama_heads, "num_key_value_heads": llama_heads,
            "intermediate_size": intermediate, "max_position_embeddings": 16384, "tie_word_embeddings": False}


def cache_state() -> str:
    cache = Path(os.environ["TRITON_CACHE_DIR"])
    return "warm" if cache.is_dir() and any(cache.iterdir()) else "cold"


def run_row(name: str, seq: int, args, device) -> dict:
    import torch

    from trainkit.adapters import apply_lora
    from trainkit.config.lora import LoRAConfig
    from trainkit.gla import guard_adapter_paths
    from trainkit.models import load_model

    cache = cache_state()
    cfg = trainkit_config({"paths": {"model_name_or_path": None, "cache_dir": None},
                           "model": {"config": model_config(name, args.shape)}, "training": {"seed": 0},
                           "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "auto"},
                           "logging": {"metric_for_best": "eval_loss", "greater_is_better": False}}, args, LoRAConfig)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model, info = load_model(cfg, device, VocabOnly(args.vocab), cfg.model.dtype)
    model = apply_lora(model, cfg.lora)
    if name == "gla":
        guard_adapter_paths(model)
    batch = max(1, args.tokens_per_step // seq)
    estimate = apply_checkpointing(model, cfg, device, tokens=batch * seq)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, args.vocab, (batch, seq), generator=generator).to(device)
    model.train()

    def step() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{name} seq {seq}: loss {loss.item()}")
        return time.perf_counter() - started

    first = step()
    for _ in range(args.warmup):
        step()
    times = [step() for _ in range(args.steps)]
    mean = sum(times) / len(times)
    profiled = profile_steps(step, device, Path(args.profile) / f"profile_{args.shape}_{name}_{seq}.txt") if args.profile else {}
    peak = round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None
    row = {"shape": args.shape, "model": name, "seq": seq, "batch": batch, "parameters": info["parameters"]["total"],
           "trainable": sum(p.numel() for p in params), "checkpointing": cfg.memory.gradient_checkpointing,
           **checkpointed_layers(model), **estimate, "first_step_s": round(first, 2), "step_ms": round(1000 * mean, 1),
           "tokens_per_s": round(batch * seq / mean), "peak_gib": peak, "triton_cache": cache, **profiled}
    model = optimizer = ids = None  # free before the next row (not `del`: step() closes over them)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def profile_steps(step, device, path: Path, steps: int = 2) -> dict:
    """`steps` more steps under torch.profiler: writes the operators by GPU time and by host time to `path`;
    returns how busy the GPU was (kernel time / wall time of those steps) for the row."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        wall = sum(step() for _ in range(steps))
    averages = prof.key_averages()
    kernel_us = sum(e.self_device_time_total for e in averages if e.device_type == torch.autograd.DeviceType.CUDA)
    busy = kernel_us / 1e6 / wall
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{steps} steps, {wall * 1000 / steps:.1f} ms per step, GPU kernels busy {busy:.0%} of the wall time\n\n"
                    "by GPU time:\n" + averages.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=70)
                    + "\nby host time:\n" + averages.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70))
    return {"profiled_step_ms": round(wall * 1000 / steps, 1), "gpu_busy": round(busy, 3)}


def write_autotune_table(folder: Path) -> None:
    """The configs fla's autotuners chose in this process, one fla config file per kernel."""
    from trainkit.patches.fla import autotune_table_entries
    folder.mkdir(parents=True, exist_ok=True)
    for kernel, table in autotune_table_entries().items():
        (folder / f"{kernel}.json").write_text(json.dumps(table, indent=1) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=["374m", "1.3b"], default="374m", help="model size (see the docstring)")
    parser.add_argument("--models", nargs="+", default=["gla", "llama"], choices=["gla", "llama"])
    parser.add_argument("--seqs", nargs="+", type=int, default=[2048, 8192], help="tokens per sequence")
    parser.add_argument("--tokens-per-step", type=int, default=16384, help="tokens per optimizer step (batch = this / seq)")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the first one")
    add_config_args(parser)
    parser.add_argument("--tiny", action="store_true",
                        help="tiny models on CPU (smoke test); unless given: vocab 1000, 64 tokens per step, "
                             "seqs 32 64, 2 timed steps, no warm-up")
    parser.add_argument("--json", help="also write the rows as JSON here (rewritten after each row)")
    parser.add_argument("--profile", metavar="DIR",
                        help="after the timed steps, 2 more under torch.profiler: DIR/profile_<shape>_<model>_<seq>.txt "
                             "lists the operators by GPU and by host time; the row gets gpu_busy (kernel time / wall time)")
    parser.add_argument("--dump-autotune-table", metavar="DIR",
                        help="GPU: write the kernel configs fla's autotuners chose to DIR/<module.kernel>.json after each "
                             "row (the format trainkit/fla_autotune/<GPU>/ ships; see README)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.shape = "tiny"
        for key, value in TINY.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)

    import torch
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.tiny:
        print("bench_lora: no GPU: use --tiny for a CPU smoke test", file=sys.stderr)
        return 2
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device: {device_name}; torch {torch.__version__}; shape {args.shape}; "
          f"TRITON_CACHE_DIR={os.environ['TRITON_CACHE_DIR']}", flush=True)
    rows = []
    for seq in args.seqs:
        for name in args.models:
            rows.append(run_row(name, seq, args, device))
            print(json.dumps(rows[-1]), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps({"device": device_name, "rows": rows}, indent=2))
            if args.dump_autotune_table and device.type == "cuda" and "gla" in args.models:
                write_autotune_table(Path(args.dump_autotune_table))
    print("\n| model | params | seq | batch | checkpointing (layers) | first step (s) | triton cache | step (ms) | tokens/s | peak memory (GiB) |")
    print("| --- | ---: | ---: | ---: | --- | ---: | --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['model']} | {r['parameters'] / 1e6:.0f}M | {r['seq']} | {r['batch']} | "
              f"{r['checkpointing']} ({r['checkpointed_layers']}/{r['decoder_layers']}) | {r['first_step_s']} | "
              f"{r['triton_cache']} | {r['step_ms']} | {r['tokens_per_s']:,} | {r['peak_gib']} |")
    for seq in args.seqs:
        by = {r["model"]: r for r in rows if r["seq"] == seq}
        if {"gla", "llama"} <= by.keys():
            memory = (f", peak memory x{by['gla']['peak_gib'] / by['llama']['peak_gib']:.2f}"
                      if by["llama"]["peak_gib"] else "")
            print(f"seq {seq}: GLA / Llama tokens/s x{by['gla']['tokens_per_s'] / by['llama']['tokens_per_s']:.2f}{memory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

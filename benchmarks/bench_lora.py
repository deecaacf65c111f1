#!/usr/bin/env python
"""LoRA training speed: GLA (flash-linear-attention, Triton chunk kernels) vs a Llama of the same size (SDPA).

    python benchmarks/bench_lora.py                         # GPU: both models at 2,048 and 8,192 tokens per sequence
    python benchmarks/bench_lora.py --models gla --seqs 2048 --steps 5 --json out.json
    python benchmarks/bench_lora.py --tiny                  # CPU smoke test (tiny models, reference GLA backend)

Both models are random-init, built and adapted exactly as train_lora.py does (trainkit.models.load_model,
trainkit.adapters.apply_lora with the family preset, trainkit.gla.guard_adapter_paths): bf16 base,
LoRA r=16 on every attention/mixer and MLP projection, non-reentrant gradient checkpointing, AdamW.
GLA: hidden 1024, 24 layers, 4 heads (fla's GLAConfig defaults otherwise). Llama: hidden 1024, 24 layers,
16 heads of 64, the GLA's MLP width, SDPA attention. Each (model, sequence length) trains the same number
of tokens per step (--tokens-per-step): batch = tokens / sequence length.

Printed per row: the first step's time (for GLA it includes Triton's compile and autotuning of fla's
kernels for that shape: minutes on a cold cache), tokens/s and step time over the timed steps after
--warmup steps, and peak GPU memory (torch.cuda.max_memory_allocated, reset per row). Compiled kernels
and autotuning results go to TRITON_CACHE_DIR with TRITON_CACHE_AUTOTUNING=1 (set here unless set), so a
second run of the benchmark starts fast: the `triton cache` column says whether the cache held kernels
when the row started.
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


def model_config(name: str, tiny: bool) -> dict:
    hidden, layers = (64, 2) if tiny else (1024, 24)
    intermediate = 256 if tiny else 2816  # GLA's default MLP width at hidden 1024 (hidden_ratio 4, x2/3, multiple of 256)
    if name == "gla":
        return {"model_type": "gla", "hidden_size": hidden, "num_hidden_layers": layers, "num_heads": 4,
                "intermediate_size": intermediate, "max_position_embeddings": 16384, "tie_word_embeddings": False}
    return {"model_type": "llama", "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": 4 if tiny else 16, "num_key_value_heads": 4 if tiny else 16,
            "intermediate_size": intermediate, "max_position_embeddings": 16384, "tie_word_embeddings": False}


def cache_state() -> str:
    cache = Path(os.environ["TRITON_CACHE_DIR"])
    return "warm" if cache.is_dir() and any(cache.iterdir()) else "cold"


def run_row(name: str, seq: int, args, device) -> dict:
    import torch

    from trainkit.adapters import apply_lora
    from trainkit.gla import guard_adapter_paths
    from trainkit.config import validate
    from trainkit.config.lora import LoRAConfig
    from trainkit.models import load_model

    class VocabOnly:  # load_model needs only the vocabulary size (and special ids) of a tokenizer
        pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

        def __len__(self):
            return args.vocab

    cache = cache_state()
    cfg = validate({"paths": {"model_name_or_path": None, "cache_dir": None},
                    "model": {"config": model_config(name, args.tiny), "attn_implementation": "sdpa", "attn_mode": "chunk",
                              "fused_swiglu": False, "dtype": "float32" if device.type == "cpu" else "bfloat16"},
                    "memory": {"gradient_checkpointing": True}, "training": {"seed": 0},
                    "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "auto", "modules_to_save": []},
                    "logging": {"metric_for_best": "eval_loss", "greater_is_better": False}}, LoRAConfig)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model, info = load_model(cfg, device, VocabOnly(), cfg.model.dtype)
    model = apply_lora(model, cfg.lora)
    if name == "gla":
        guard_adapter_paths(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    batch = max(1, args.tokens_per_step // seq)
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
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    row = {"model": name, "seq": seq, "batch": batch, "parameters": info["parameters"]["total"],
           "trainable": sum(p.numel() for p in params), "first_step_s": round(first, 2),
           "step_ms": round(1000 * mean, 1), "tokens_per_s": round(batch * seq / mean), "peak_gib": round(peak, 2),
           "triton_cache": cache}
    del model, optimizer, ids
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["gla", "llama"], choices=["gla", "llama"])
    parser.add_argument("--seqs", nargs="+", type=int, default=[2048, 8192], help="tokens per sequence")
    parser.add_argument("--tokens-per-step", type=int, default=16384, help="tokens per optimizer step (batch = this / seq)")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the first one")
    parser.add_argument("--tiny", action="store_true", help="tiny models (CPU smoke test)")
    parser.add_argument("--json", help="also write the rows as JSON here")
    args = parser.parse_args(argv)

    import torch
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.tiny:
        print("bench_lora: no GPU: use --tiny for a CPU smoke test", file=sys.stderr)
        return 2
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}; "
          f"TRITON_CACHE_DIR={os.environ['TRITON_CACHE_DIR']}", flush=True)
    rows = []
    for seq in args.seqs:
        for name in args.models:
            rows.append(run_row(name, seq, args, device))
            print(json.dumps(rows[-1]), flush=True)
    print("\n| model | params | seq | batch | first step (s) | triton cache | step (ms) | tokens/s | peak memory (GiB) |")
    print("| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['model']} | {r['parameters'] / 1e6:.0f}M | {r['seq']} | {r['batch']} | {r['first_step_s']} | "
              f"{r['triton_cache']} | {r['step_ms']} | {r['tokens_per_s']:,} | {r['peak_gib']} |")
    for seq in args.seqs:
        by = {r["model"]: r for r in rows if r["seq"] == seq}
        if {"gla", "llama"} <= by.keys():
            print(f"seq {seq}: GLA / Llama tokens/s x{by['gla']['tokens_per_s'] / by['llama']['tokens_per_s']:.2f}, "
                  f"peak memory x{by['gla']['peak_gib'] / by['llama']['peak_gib']:.2f}" if device.type == "cuda" else
                  f"seq {seq}: GLA / Llama tokens/s x{by['gla']['tokens_per_s'] / by['llama']['tokens_per_s']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

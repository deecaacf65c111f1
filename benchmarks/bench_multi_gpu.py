#!/usr/bin/env python
"""QLoRA on a GLM-4.5-Air-shaped MoE on 1 and several GPUs: DDP vs FSDP, per-GPU memory and tokens/s.

    python benchmarks/bench_multi_gpu.py                                  # 1 GPU, DDP and FSDP on 2 GPUs
    python benchmarks/bench_multi_gpu.py --setups 1gpu,ddp4,fsdp4         # any of 1gpu, ddpN, fsdpN
    python benchmarks/bench_multi_gpu.py --layers 4 --steps 16 --out-dir docs
    python benchmarks/bench_multi_gpu.py --tiny --setups 1gpu,ddp2 --out-dir /tmp/b   # CPU smoke run (tiny layers)

Each setup is one `./launch_training.sh` run of train_qlora.py, as users start it (`--accelerate-config
single_gpu | ddp | fsdp`, `--num-processes N`, `--gpus 0,..,N-1`), on a config written to --out-dir: the default
training_config.yaml's QLoRA (NF4 + double quant, the fused experts as NF4 banks, LoRA r=16 on attention,
`lora.expert_targets` as --expert-targets says) over a random-init model with GLM-4.5-Air's layer shape (hidden
4096, 96 heads of 128 with 8 KV heads, 128 routed experts of width 1408 plus one shared, top-8, the first layer
dense with width 10944) and --layers decoder layers, micro batch 1 x --seq tokens per GPU (weak scaling: N GPUs
take N sequences per step). The tokenizer is the project's byte-level one, so the embeddings are small: the
figures are the decoder layers'.

Read from each run's files: tokens/s (the mean of the training log's `tokens_per_sec` after the first logged
interval, all processes together), peak memory (`memory_peak_gb` of the main process's last log line:
torch.cuda.max_memory_allocated), and base-weight bytes per GPU (run.json: `model.base_weight_bytes` for one GPU
and DDP, where every GPU holds the whole base; `model.sharding.base_bytes_largest_process` under FSDP). Prints a
table and the ratios of issue 15 (FSDP base bytes per GPU over one GPU's; tokens/s over one GPU's), writes
bench_multi_gpu_<device>.{md,json} and keeps each run's launcher output next to them.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

GLM45_AIR_LAYER = {
    "model_type": "glm4_moe", "hidden_size": 4096, "intermediate_size": 10944, "moe_intermediate_size": 1408,
    "num_attention_heads": 96, "num_key_value_heads": 8, "head_dim": 128, "n_routed_experts": 128,
    "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
    "norm_topk_prob": True, "routed_scaling_factor": 1.0, "partial_rotary_factor": 0.5, "use_qk_norm": False,
    "max_position_embeddings": 8192, "router_aux_loss_coef": 0.001,
}


def parse_setup(name: str) -> tuple[str, int]:
    match = re.fullmatch(r"(1gpu|ddp|fsdp)(\d*)", name)
    if not match or (match.group(1) != "1gpu" and not match.group(2)):
        raise SystemExit(f"--setups: {name!r} is not 1gpu, ddpN or fsdpN")
    return match.group(1), int(match.group(2) or 1)


TINY_LAYER = {**GLM45_AIR_LAYER, "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "n_routed_experts": 8,
              "num_experts_per_tok": 2, "max_position_embeddings": 256}


def write_config(out_dir: Path, name: str, args) -> Path:
    config = {
        "script": "train_qlora.py",
        "model": {"config": {**(TINY_LAYER if args.tiny else GLM45_AIR_LAYER), "num_hidden_layers": args.layers}},
        "paths": {"data_path": str(REPO / "data" / "tiny_corpus.jsonl"), "output_dir": str(out_dir / "runs"),
                  "run_name": name},
        "training": {"max_steps": args.steps, "max_seq_length": args.seq, "val_split": 0.0, "seed": 7},
        "optimization": {"micro_batch_size": 1, "gradient_accumulation_steps": 1, "learning_rate": 1e-4,
                         "warmup_steps": 1},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "expert_targets": args.expert_targets},
        "memory": {"gradient_checkpointing": {"true": True, "false": False}.get(args.checkpointing, args.checkpointing)},
        "logging": {"log_interval": args.log_interval, "checkpoint_interval": 10 ** 6, "progress_bar": False},
    }
    path = out_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_setup(name: str, kind: str, gpus: int, args, out_dir: Path) -> dict:
    config = write_config(out_dir, name, args)
    accelerate_config = {"1gpu": "single_gpu", "ddp": "ddp", "fsdp": "fsdp"}[kind]
    command = [str(REPO / "launch_training.sh"), "--config", str(config), "--accelerate-config", accelerate_config,
               "--num-processes", str(gpus), "--no-resume"]
    if not args.tiny:
        command[-1:-1] = ["--gpus", ",".join(map(str, range(gpus)))]
    print(f"[{name}] {' '.join(command)}", flush=True)
    started = time.time()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=args.timeout)
    (out_dir / f"{name}.log").write_text(result.stdout + result.stderr)
    run_dir = out_dir / "runs" / name
    row = {"setup": name, "kind": kind, "gpus": gpus, "exit_code": result.returncode,
           "wall_s": round(time.time() - started, 1)}
    if result.returncode != 0:
        row["error"] = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        print(f"[{name}] failed: {row['error']}", flush=True)
        return row
    info = json.loads((run_dir / "run.json").read_text())
    logs = [json.loads(line) for line in (run_dir / "logs" / "training_log.jsonl").read_text().splitlines()]
    timed = logs[1:] or logs  # the first interval holds the first step (allocation, cuBLAS setup)
    sharding = info["model"].get("sharding") or {}
    row.update(distributed_type=info.get("distributed_type"),
               tokens_per_sec=sum(r["tokens_per_sec"] for r in timed) / len(timed),
               peak_gib=logs[-1].get("memory_peak_gb"),
               base_gib_per_gpu=(sharding.get("base_bytes_largest_process") or info["model"]["base_weight_bytes"]) / 2**30,
               base_gib_whole=info["model"]["base_weight_bytes"] / 2**30,
               loss_first=logs[0]["loss"], loss_last=logs[-1]["loss"],
               checkpointed_layers=info["model"]["activation_checkpointing"]["layers"])
    print(f"[{name}] {row['tokens_per_sec']:,.0f} tok/s, peak {row['peak_gib']} GiB, base {row['base_gib_per_gpu']:.3f} "
          f"GiB per GPU ({row['distributed_type']})", flush=True)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", default="1gpu,ddp2,fsdp2", help="comma list: 1gpu, ddpN, fsdpN")
    parser.add_argument("--layers", type=int, default=3, help="decoder layers (the first is dense, as in GLM-4.5-Air)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--log-interval", type=int, default=3)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--expert-targets", default="auto", help="lora.expert_targets (none: attention LoRA only)")
    parser.add_argument("--checkpointing", default="true", help="memory.gradient_checkpointing")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per setup")
    parser.add_argument("--out-dir", default="docs")
    parser.add_argument("--tiny", action="store_true", help="tiny layers, 64 tokens, 4 steps: a smoke run on CPU")
    args = parser.parse_args(argv)
    if args.tiny:
        args.seq, args.steps, args.log_interval = 64, 4, 2
    setups = [(name, *parse_setup(name)) for name in args.setups.split(",")]
    import torch
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    out_dir = Path(args.out_dir)
    work = out_dir / f"bench_multi_gpu_{slug}"
    work.mkdir(parents=True, exist_ok=True)
    rows = [run_setup(name, kind, gpus, args, work) for name, kind, gpus in setups]
    one = next((r for r in rows if r["kind"] == "1gpu" and r["exit_code"] == 0), None)
    lines = [f"Device: {device} x {torch.cuda.device_count()}; GLM-4.5-Air layer shape, {args.layers} layers, micro batch 1 x "
             f"{args.seq} tokens per GPU, {args.steps} steps, lora.expert_targets {args.expert_targets}, "
             f"gradient checkpointing {args.checkpointing}", "",
             "| setup | GPUs | distributed | tokens/s | x 1 GPU | peak memory per GPU (GiB) | base weights per GPU (GiB) "
             "| x 1 GPU | loss first -> last |", "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        if r["exit_code"] != 0:
            lines.append(f"| {r['setup']} | {r['gpus']} | failed: {r['error']} | | | | | | |")
            continue
        speed = f"x{r['tokens_per_sec'] / one['tokens_per_sec']:.2f}" if one else ""
        base = f"x{r['base_gib_per_gpu'] / one['base_gib_per_gpu']:.3f}" if one else ""
        lines.append(f"| {r['setup']} | {r['gpus']} | {r['distributed_type']} | {r['tokens_per_sec']:,.0f} | {speed} | "
                     f"{r['peak_gib']} | {r['base_gib_per_gpu']:.3f} | {base} | {r['loss_first']:.3f} -> {r['loss_last']:.3f} |")
    table = "\n".join(lines)
    print("\n" + table)
    (out_dir / f"bench_multi_gpu_{slug}.md").write_text(table + "\n")
    (out_dir / f"bench_multi_gpu_{slug}.json").write_text(json.dumps({"device": device, "args": vars(args), "rows": rows},
                                                                      indent=1))
    return 0 if all(r["exit_code"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""QLoRA training step: this project vs the standard recipe, side by side in one run (GPU).

    python benchmarks/bench_qlora.py [--models dense,moe] [--steps 8] [--warmup 3] [--out FILE.md]

Both sides train the same random-init models (built once from a config, saved, and
loaded through from_pretrained), batch 4 x 2048 tokens, gradient checkpointing on, AdamW,
PEFT LoRA r=16 (alpha 32, dropout 0.05) on q/k/v/o:

- standard: bitsandbytes NF4 + double quant (bf16 compute), `peft.prepare_model_for_kbit_training`
  (its default reentrant checkpointing, fp32 upcast of the non-quantized weights), plain loop;
- trainkit: `trainkit.models.load_model` + `trainkit.adapters.apply_lora` as train_qlora.py
  uses them: bf16 norms/embeddings, no fp32 upcast, non-reentrant checkpointing, SDPA, and on
  the MoE model the fused experts quantized to NF4 too.

Prints tokens/s and peak memory for both and the ratios, the MoE base-weight memory vs
bf16, and writes the table as markdown (--out).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainkit.adapters import apply_lora  # noqa: E402
from trainkit.config import validate  # noqa: E402
from trainkit.config.qlora import QLoRAConfig  # noqa: E402
from trainkit.models import build_random_model_dir, load_model  # noqa: E402
from trainkit.quantization import base_weight_bytes, bf16_weight_bytes, count_parameters  # noqa: E402

MODELS = {
    "dense": {"label": "1.1B Llama-shaped dense", "config": {
        "model_type": "llama", "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
        "num_attention_heads": 32, "num_key_value_heads": 4, "max_position_embeddings": 4096,
        "tie_word_embeddings": False}},
    "moe": {"label": "Mixtral-shaped MoE (8 experts, top-2)", "config": {
        "model_type": "mixtral", "hidden_size": 1024, "intermediate_size": 3584, "num_hidden_layers": 12,
        "num_attention_heads": 16, "num_key_value_heads": 4, "num_local_experts": 8, "num_experts_per_tok": 2,
        "max_position_embeddings": 4096, "router_aux_loss_coef": 0.02}},
}
VOCAB = 32000
LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "variant": "lora", "bias": "none"}
GIB = 1024 ** 3


class _Tok:
    pad_token_id, eos_token_id, bos_token_id = 0, 2, 1

    def __len__(self):
        return VOCAB


def _free():
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def load_standard(model_dir: str):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb, dtype=torch.bfloat16,
                                                 device_map={"": 0}, attn_implementation="sdpa")
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                             task_type="CAUSAL_LM"))
    return model


def load_ours(model_dir: str):
    cfg = validate({"paths": {"model_name_or_path": model_dir, "cache_dir": None},
                    "model": {"config": None, "attn_implementation": "sdpa", "trust_remote_code": False,
                              "local_files_only": True},
                    "training": {"seed": 0},
                    "quantization": {"load_in_4bit": True, "quant_type": "nf4", "double_quant": True,
                                     "compute_dtype": "bfloat16", "quantize_moe_experts": True},
                    "memory": {"gradient_checkpointing": True}, "lora": LORA}, QLoRAConfig)
    model, info = load_model(cfg, torch.device("cuda", 0), _Tok(), cfg.quantization.compute_dtype, cfg.quantization)
    return apply_lora(model, cfg.lora), info


def run_steps(model, batch_size, seq, steps, warmup, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch_size, seq), device="cuda", generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    losses = []
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        out = model(**batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.detach())
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    losses = [float(v) for v in losses]
    return {"tokens_per_s": steps * batch_size * seq / dt, "step_s": dt / steps,
            "peak_gib": torch.cuda.max_memory_allocated() / GIB, "first_loss": losses[0], "last_loss": losses[-1],
            "finite": all(v == v and abs(v) != float("inf") for v in losses)}


def bench_model(key, args):
    spec = MODELS[key]
    torch.manual_seed(0)
    model_dir = build_random_model_dir(spec["config"], VOCAB, seed=0, dtype=torch.bfloat16)
    res = {"model": spec["label"], "key": key}
    for side in args.order.split(","):
        _free()
        t0 = time.perf_counter()
        if side == "standard":
            model = load_standard(model_dir)
            info = None
        else:
            model, info = load_ours(model_dir)
        load_s = time.perf_counter() - t0
        base_bytes = base_weight_bytes(model)
        counts = count_parameters(model)
        r = run_steps(model, args.batch, args.seq, args.steps, args.warmup)
        r.update(load_s=load_s, base_weight_gib=base_bytes / GIB, bf16_weight_gib=bf16_weight_bytes(model) / GIB,
                 fraction_4bit=counts["fraction_4bit"], trainable=counts["trainable"])
        if info:
            r["summary"] = info["summary"]
        res[side] = r
        print(f"[{key}] {side:8s} {r['tokens_per_s']:9.0f} tok/s  step {r['step_s'] * 1000:7.1f} ms  "
              f"peak {r['peak_gib']:6.2f} GiB  base weights {r['base_weight_gib']:.3f} GiB "
              f"(bf16 {r['bf16_weight_gib']:.3f})  4-bit {100 * r['fraction_4bit']:.1f}%  "
              f"loss {r['first_loss']:.3f}->{r['last_loss']:.3f}", flush=True)
        del model
    _free()
    s, o = res["standard"], res["trainkit"]
    res["speed_ratio"] = o["tokens_per_s"] / s["tokens_per_s"]
    res["memory_ratio"] = o["peak_gib"] / s["peak_gib"]
    res["base_vs_bf16"] = o["base_weight_gib"] / o["bf16_weight_gib"]
    print(f"[{key}] trainkit/standard: speed x{res['speed_ratio']:.2f}, peak memory x{res['memory_ratio']:.2f}; "
          f"trainkit base weights = {res['base_vs_bf16']:.3f}x bf16", flush=True)
    return res


def markdown(results, args) -> str:
    dev = torch.cuda.get_device_name(0)
    import peft
    import transformers
    try:
        import bitsandbytes
        bnb_v = bitsandbytes.__version__
    except Exception:
        bnb_v = "?"
    lines = [f"Device: {dev}; torch {torch.__version__}, transformers {transformers.__version__}, "
             f"peft {peft.__version__}, bitsandbytes {bnb_v}, Python {platform.python_version()}.",
             f"Batch {args.batch} x {args.seq} tokens, gradient checkpointing on, LoRA r=16 on q/k/v/o, AdamW; "
             f"{args.warmup} warm-up steps, then the mean of {args.steps} timed steps.", "",
             "| model | recipe | tokens/s | step (ms) | peak memory (GiB) | base weights (GiB) | 4-bit share of params |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        for side, name in (("standard", "standard (bnb NF4 + prepare_model_for_kbit_training)"),
                           ("trainkit", "trainkit (models + adapters)")):
            x = r[side]
            lines.append(f"| {r['model']} | {name} | {x['tokens_per_s']:,.0f} | {x['step_s'] * 1000:.0f} | "
                         f"{x['peak_gib']:.2f} | {x['base_weight_gib']:.3f} | {100 * x['fraction_4bit']:.1f}% |")
        lines.append(f"| {r['model']} | **trainkit / standard** | **x{r['speed_ratio']:.2f}** | | "
                     f"**x{r['memory_ratio']:.2f}** | trainkit = {r['base_vs_bf16']:.3f}x bf16 "
                     f"({r['trainkit']['bf16_weight_gib']:.3f} GiB) | |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="dense,moe")
    ap.add_argument("--order", default="standard,trainkit")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--out", default=None, help="write the markdown table here")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_qlora.py needs a CUDA GPU")
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    results = [bench_model(k, args) for k in args.models.split(",")]
    md = markdown(results, args)
    print(md)
    if args.out:
        Path(args.out).write_text(md)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

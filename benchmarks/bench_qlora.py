"""QLoRA training step: this project vs the standard recipe (and vs unquantized bf16 LoRA), side by side in one run.

    python benchmarks/bench_qlora.py [--models dense,moe] [--order standard,bf16_lora,trainkit] [--steps 8]
        [--warmup 3] [--checkpointing auto|true|false] [--set section.key=value] [--out FILE.md] [--json FILE]
    python benchmarks/bench_qlora.py --tiny      # CPU smoke test: tiny dense and MoE models, fp32 compute

Every side trains the same random-init models (built once from a config, saved, and loaded through
from_pretrained), batch 4 x 2048 tokens, AdamW, PEFT LoRA r=16 (alpha 32, dropout 0.05) on q/k/v/o.
The sides (--order, each run for every model of --models):

- standard: bitsandbytes NF4 + double quant (bf16 compute), `peft.prepare_model_for_kbit_training`
  (its default reentrant checkpointing, fp32 upcast of the non-quantized weights), plain loop;
- bf16_lora: unquantized LoRA the usual HF way: bf16 weights, SDPA, `gradient_checkpointing_enable`
  (non-reentrant), `peft.get_peft_model`, plain loop;
- trainkit: `trainkit.models.load_model` + `trainkit.adapters.apply_lora` as train_qlora.py uses them,
  from a train_qlora config with the defaults (bf16 norms/embeddings, no fp32 upcast, SDPA, on the MoE
  model the fused experts quantized to NF4 too; memory.gradient_checkpointing the config default unless
  --checkpointing sets it; any key --set names);
- trainkit_experts: trainkit + LoRA on the routed experts (lora.expert_targets auto, r=16, trainkit.expert_lora)
  over the NF4 expert banks; MoE models only;
- trainkit_experts_bf16: the same with the experts in bf16 (quantization.quantize_moe_experts false);
- peft_experts_bf16: the usual HF way for expert LoRA: bf16 weights, PEFT `target_parameters` on
  mlp.experts.gate_up_proj / down_proj (PEFT's forward folds W + BA per forward), `gradient_checkpointing_enable`
  (non-reentrant).
The expert sides run at LoRA dropout 0 (PEFT's target_parameters adapters refuse dropout), so the three compute
the same function; the plain sides keep 0.05.

Prints tokens/s, first-step time, peak memory and the checkpointing that ran for every side, the ratios
of trainkit to the others, the MoE base-weight memory vs bf16, and writes the table as markdown (--out)
and the rows as JSON (--json, rewritten after each side).
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

from bench_common import (VocabOnly, add_config_args, apply_checkpointing, checkpointed_layers,  # noqa: E402
                          trainkit_config)
from trainkit.adapters import apply_lora  # noqa: E402
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
    "moe128": {"label": "Qwen3-MoE-shaped (64 experts, top-8)", "config": {
        "model_type": "qwen3_moe", "hidden_size": 1024, "intermediate_size": 3072, "moe_intermediate_size": 384,
        "num_hidden_layers": 12, "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 64,
        "num_experts": 64, "num_experts_per_tok": 8, "max_position_embeddings": 4096, "router_aux_loss_coef": 0.001}},
}
TINY_MODELS = {
    "dense": {"label": "tiny Llama-shaped dense", "config": {
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "tie_word_embeddings": False}},
    "moe": {"label": "tiny Mixtral-shaped MoE (4 experts, top-2)", "config": {
        "model_type": "mixtral", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2,
        "max_position_embeddings": 256, "router_aux_loss_coef": 0.02}},
    "moe128": {"label": "tiny Qwen3-MoE-shaped (8 experts, top-4)", "config": {
        "model_type": "qwen3_moe", "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_experts": 8,
        "num_experts_per_tok": 4, "max_position_embeddings": 256, "router_aux_loss_coef": 0.001}},
}
TINY = {"vocab": 1000, "batch": 2, "seq": 64, "steps": 2, "warmup": 1}
SIDES = ("standard", "bf16_lora", "trainkit", "trainkit_experts", "trainkit_experts_bf16", "peft_experts_bf16")
EXPERT_SIDES = ("trainkit_experts", "trainkit_experts_bf16", "peft_experts_bf16")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": TARGETS, "variant": "lora", "bias": "none"}
EXPERT_LORA = {**LORA, "dropout": 0.0, "expert_targets": "auto"}
GIB = 1024 ** 3


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peft_lora():
    from peft import LoraConfig
    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none", target_modules=TARGETS, task_type="CAUSAL_LM")


def load_standard(model_dir: str, device, compute_dtype):
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=compute_dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb, dtype=compute_dtype,
                                                 device_map={"": str(device)}, attn_implementation="sdpa")
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    return get_peft_model(model, _peft_lora())


def load_bf16_lora(model_dir: str, device, compute_dtype):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=compute_dtype, device_map={"": str(device)},
                                                 attn_implementation="sdpa")
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return get_peft_model(model, _peft_lora())


def load_peft_experts_bf16(model_dir: str, device, compute_dtype):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=compute_dtype, device_map={"": str(device)},
                                                 attn_implementation="sdpa")
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, bias="none", target_modules=TARGETS,
                        target_parameters=EXPERT_TARGETS, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def load_ours(model_dir: str, device, args, side: str = "trainkit"):
    raw = {"paths": {"model_name_or_path": model_dir, "cache_dir": None},
           "model": {"config": None, "local_files_only": True}, "training": {"seed": 0},
           "lora": EXPERT_LORA if side in EXPERT_SIDES else LORA}
    if side == "trainkit_experts_bf16":
        raw["quantization"] = {"quantize_moe_experts": False}
    cfg = trainkit_config(raw, args, QLoRAConfig)
    model, info = load_model(cfg, device, VocabOnly(args.vocab), cfg.quantization.compute_dtype, cfg.quantization)
    model = apply_lora(model, cfg.lora)
    return model, info, cfg, apply_checkpointing(model, cfg, device, tokens=args.batch * args.seq)


def run_steps(model, device, args, seed=0):
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, args.vocab, (args.batch, args.seq), generator=g).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    losses = []
    sync()
    started = time.perf_counter()
    for i in range(1 + args.warmup + args.steps):
        if i == 1:
            sync()
            first_step_s = time.perf_counter() - started
        if i == 1 + args.warmup:
            sync()
            t0 = time.perf_counter()
        out = model(**batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.detach())
    sync()
    dt = time.perf_counter() - t0
    losses = [float(v) for v in losses]
    return {"tokens_per_s": args.steps * args.batch * args.seq / dt, "step_ms": 1000 * dt / args.steps,
            "first_step_s": first_step_s,
            "peak_gib": torch.cuda.max_memory_allocated() / GIB if device.type == "cuda" else None,
            "first_loss": losses[0], "last_loss": losses[-1],
            "finite": all(v == v and abs(v) != float("inf") for v in losses)}


def bench_model(key, models, args, device, compute_dtype, rows, device_name):
    spec = models[key]
    torch.manual_seed(0)
    model_dir = build_random_model_dir(spec["config"], args.vocab, seed=0, dtype=compute_dtype)
    is_moe = any(k in spec["config"] for k in ("num_local_experts", "num_experts", "n_routed_experts"))
    for side in args.order.split(","):
        if side in EXPERT_SIDES and not is_moe:
            continue
        _free(device)
        t0 = time.perf_counter()
        checkpointing, estimate = True, {}  # the recipes of the baselines
        if side == "standard":
            model = load_standard(model_dir, device, compute_dtype)
        elif side == "bf16_lora":
            model = load_bf16_lora(model_dir, device, compute_dtype)
        elif side == "peft_experts_bf16":
            model = load_peft_experts_bf16(model_dir, device, compute_dtype)
        else:
            model, info, cfg, estimate = load_ours(model_dir, device, args, side)
            checkpointing = cfg.memory.gradient_checkpointing
        load_s = time.perf_counter() - t0
        base_bytes = base_weight_bytes(model)
        counts = count_parameters(model)
        layers = checkpointed_layers(model)
        r = {"model": key, "label": spec["label"], "side": side, "checkpointing": checkpointing, **layers, **estimate,
             **run_steps(model, device, args), "load_s": load_s, "base_weight_gib": base_bytes / GIB,
             "bf16_weight_gib": bf16_weight_bytes(model) / GIB, "fraction_4bit": counts["fraction_4bit"],
             "trainable": counts["trainable"]}
        rows.append(r)
        peak = f"{r['peak_gib']:6.2f} GiB" if r["peak_gib"] is not None else "n/a"
        print(f"[{key}] {side:21s} {r['tokens_per_s']:9.0f} tok/s  step {r['step_ms']:7.1f} ms  first step "
              f"{r['first_step_s']:.1f} s  peak {peak}  checkpointing {checkpointing} "
              f"({layers['checkpointed_layers']}/{layers['decoder_layers']} layers)  base weights "
              f"{r['base_weight_gib']:.3f} GiB (bf16 {r['bf16_weight_gib']:.3f})  4-bit {100 * r['fraction_4bit']:.1f}%  "
              f"loss {r['first_loss']:.3f}->{r['last_loss']:.3f}", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({"device": device_name, "rows": rows}, indent=1))
        del model
    _free(device)
    by = {r["side"]: r for r in rows if r["model"] == key}
    if "trainkit" in by:
        o = by["trainkit"]
        for side in ("standard", "bf16_lora"):
            if side in by:
                memory = (f", peak memory x{o['peak_gib'] / by[side]['peak_gib']:.2f}" if o["peak_gib"] else "")
                print(f"[{key}] trainkit/{side}: speed x{o['tokens_per_s'] / by[side]['tokens_per_s']:.2f}{memory}", flush=True)
        print(f"[{key}] trainkit base weights = {o['base_weight_gib'] / o['bf16_weight_gib']:.3f}x bf16", flush=True)
    for ours, other in (("trainkit_experts", "trainkit"), ("trainkit_experts", "peft_experts_bf16"),
                        ("trainkit_experts_bf16", "peft_experts_bf16")):
        if ours in by and other in by:
            o, t = by[ours], by[other]
            memory = f", peak memory x{o['peak_gib'] / t['peak_gib']:.2f}" if o["peak_gib"] else ""
            print(f"[{key}] {ours}/{other}: speed x{o['tokens_per_s'] / t['tokens_per_s']:.2f}{memory}, trainable "
                  f"{o['trainable']:,} vs {t['trainable']:,}", flush=True)


def markdown(rows, args, device_name) -> str:
    import peft
    import transformers
    try:
        import bitsandbytes
        bnb_v = bitsandbytes.__version__
    except Exception:
        bnb_v = "?"
    names = {"standard": "standard (bnb NF4 + prepare_model_for_kbit_training)",
             "bf16_lora": "bf16 LoRA (HF + PEFT, unquantized)", "trainkit": "trainkit (models + adapters)",
             "trainkit_experts": "trainkit + expert LoRA (NF4 experts)",
             "trainkit_experts_bf16": "trainkit + expert LoRA (bf16 experts)",
             "peft_experts_bf16": "PEFT target_parameters expert LoRA (bf16, HF)"}
    lines = [f"Device: {device_name}; torch {torch.__version__}, transformers {transformers.__version__}, "
             f"peft {peft.__version__}, bitsandbytes {bnb_v}, Python {platform.python_version()}.",
             f"Batch {args.batch} x {args.seq} tokens, LoRA r=16 on q/k/v/o, AdamW; "
             f"{args.warmup} warm-up steps after the first, then the mean of {args.steps} timed steps.", "",
             "Expert sides: LoRA r=16 also on every routed expert's gate_up_proj and down_proj, dropout 0.",
             "| model | recipe | checkpointing (layers) | tokens/s | step (ms) | first step (s) | peak memory (GiB) | "
             "base weights (GiB) | 4-bit share of params | trainable params |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "n/a"
        lines.append(f"| {r['label']} | {names[r['side']]} | {r['checkpointing']} ({r['checkpointed_layers']}/"
                     f"{r['decoder_layers']}) | {r['tokens_per_s']:,.0f} | {r['step_ms']:.0f} | {r['first_step_s']:.1f} | "
                     f"{peak} | {r['base_weight_gib']:.3f} | {100 * r['fraction_4bit']:.1f}% | {r['trainable']:,} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="dense,moe")
    ap.add_argument("--order", default="standard,bf16_lora,trainkit", help=f"comma list of sides: {', '.join(SIDES)}")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000)
    add_config_args(ap)
    ap.add_argument("--tiny", action="store_true", help="tiny dense and MoE models on CPU, fp32 compute (smoke test); "
                                                        "unless given: vocab 1000, batch 2 x 64, 2 timed steps, 1 warm-up")
    ap.add_argument("--out", default=None, help="write the markdown table here")
    ap.add_argument("--json", default=None, help="write the rows as JSON here (rewritten after each side)")
    args = ap.parse_args(argv)
    unknown = set(args.order.split(",")) - set(SIDES)
    if unknown:
        ap.error(f"--order: unknown sides {sorted(unknown)} (known: {', '.join(SIDES)})")
    models = TINY_MODELS if args.tiny else MODELS
    if args.tiny:
        for key, value in TINY.items():
            if getattr(args, key) == ap.get_default(key):
                setattr(args, key, value)
    elif not torch.cuda.is_available():
        print("bench_qlora.py needs a CUDA GPU (--tiny: CPU smoke test)", file=sys.stderr)
        return 2
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    # bf16 on GPUs; fp32 on CPUs, where bf16 matmuls are emulated on many (trainkit's compute_dtype auto agrees)
    compute_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    device_name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    rows = []
    for key in args.models.split(","):
        bench_model(key, models, args, device, compute_dtype, rows, device_name)
    md = markdown(rows, args, device_name)
    print(md)
    if args.out:
        Path(args.out).write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

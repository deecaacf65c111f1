"""Distillation training step: chunked KD loss (trainkit.kd.chunked_kd_loss) vs the naive full-logit KL,
side by side in one process (GPU; --tiny runs anywhere).

    python benchmarks/bench_distill.py [--student linear|llama] [--steps 10] [--warmup 3] [--seq 2048]
        [--batch 2] [--vocab 128256] [--layers 22] [--chunk-sizes auto,1024] [--json out.json] [--tiny]

Teacher: random-init Llama, TinyLlama 1.1B shape (hidden 2048, 22 layers, 32 heads, 4 kv heads,
intermediate 5632) with Llama-3's vocab 128,256, bf16, frozen. Student: the same shape, bf16, either
trainkit.students' linear-attention student (--student linear, default: Discrete Mamba-2 mixers built
from the teacher) or a plain Llama (--student llama, to isolate the loss). Gradient checkpointing on,
AdamW (fused on CUDA), one fresh optimizer per variant, warmup steps then timed steps. Variants:

- naive: student logits = hidden @ lm_head.T (bf16, autograd), teacher logits likewise under no_grad,
  trainkit.kd.naive_kd_loss (fp32 log-softmax, KL, mean over tokens);
- chunked[@N]: trainkit.kd.chunked_kd_loss on the final hidden states and both lm_head weights, N tokens
  per chunk (auto: trainkit.kd.auto_chunk_size).

Reports tokens/s, step time, peak memory (torch.cuda.max_memory_allocated over the timed steps, reset
between variants) and the part of it above the memory held between steps (weights, optimizer state),
as a Markdown table; --json writes the rows.

--freeze-mlp freezes the student's MLPs (trainkit.students.freeze, distill.py's student.freeze_mlp), the
setting of Llamba-style distillation where the MLPs are copied from the teacher. Results: README
("Distillation: chunked vs naive KD loss"); rerun this script to reproduce them.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainkit.kd import auto_chunk_size, chunked_kd_loss, naive_kd_loss  # noqa: E402
from trainkit.models import enable_activation_checkpointing  # noqa: E402
from trainkit.students import build_student  # noqa: E402

TINY = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 128, "vocab": 1000, "seq": 64,
        "batch": 2, "steps": 2, "warmup": 1}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--student", choices=("linear", "llama"), default="linear")
    p.add_argument("--mixer", default="discrete_mamba2", help="mixer of the linear student")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--variants", default="naive,chunked", help="comma list of naive, chunked")
    p.add_argument("--chunk-sizes", default="auto", help="comma list of tokens per chunk for the chunked variant (auto or ints)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--ce-weight", type=float, default=0.0)
    p.add_argument("--no-checkpointing", action="store_true")
    p.add_argument("--freeze-mlp", action="store_true", help="freeze the student's MLPs (Llamba-style; distill.py student.freeze_mlp)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes that run on CPU in seconds (smoke test)")
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None, help="write the rows and settings here")
    args = p.parse_args(argv)
    if args.tiny:
        for key, value in TINY.items():
            if p.get_default(key.replace("-", "_")) == getattr(args, key):
                setattr(args, key, value)
    return args


def llama_config(args):
    from transformers import LlamaConfig
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                      max_position_embeddings=max(4096, args.seq), tie_word_embeddings=False, use_cache=False)
    cfg._attn_implementation = "sdpa"
    return cfg


def build_models(args, device, dtype):
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    cfg = llama_config(args)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the training dtype directly
    try:
        with torch.device(device):
            teacher = LlamaForCausalLM(cfg)
            if args.student == "llama":
                torch.manual_seed(1)
                student, info = LlamaForCausalLM(cfg), "Llama (softmax attention), random init"
            else:
                student, report = build_student(teacher, mixer=args.mixer, dtype=dtype, device=device)
                info = f"linear student: {report['summary']}"
    finally:
        torch.set_default_dtype(previous)
    teacher.eval().requires_grad_(False)
    if args.freeze_mlp:
        from trainkit.students import freeze
        if args.student == "llama":
            for name, p in student.named_parameters():
                p.requires_grad_(".mlp." not in name)
        else:
            freeze(student, freeze_mlp=True)
        info += "; MLPs frozen"
    student.train()
    if not args.no_checkpointing:
        enable_activation_checkpointing(student)
    return teacher, student, info


def make_loss(variant, chunk, args):
    options = {"temperature": args.temperature, "top_k": args.top_k, "ce_weight": args.ce_weight}

    def loss_fn(student, teacher, input_ids, labels):
        with torch.no_grad():
            t_hidden = teacher.model(input_ids=input_ids, use_cache=False).last_hidden_state.flatten(0, 1)
        hidden = student.model(input_ids=input_ids, use_cache=False).last_hidden_state.flatten(0, 1)
        if variant == "naive":
            with torch.no_grad():
                t_logits = teacher.lm_head(t_hidden)
            return naive_kd_loss(student.lm_head(hidden), t_logits, labels.flatten(), **options)
        return chunked_kd_loss(hidden, student.lm_head.weight, t_hidden, teacher.lm_head.weight, labels.flatten(),
                               chunk_size=chunk, **options)
    return loss_fn


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_variant(name, loss_fn, teacher, student, batches, args, device):
    student.zero_grad(set_to_none=True)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-5,
                                  fused=device.type == "cuda")
    cuda = device.type == "cuda"

    def step(input_ids, labels):
        out = loss_fn(student, teacher, input_ids, labels)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out

    for i in range(args.warmup):
        step(*batches[i % len(batches)])
    sync(device)
    held = torch.cuda.memory_allocated() if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    losses = []
    started = time.perf_counter()
    for i in range(args.steps):
        out = step(*batches[i % len(batches)])
        losses.append(out.loss.detach())
    sync(device)
    elapsed = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    tokens = args.batch * args.seq * args.steps
    row = {"variant": name, "tokens_per_s": tokens / elapsed, "step_ms": 1000 * elapsed / args.steps,
           "peak_gib": peak / 2 ** 30, "peak_above_held_gib": (peak - held) / 2 ** 30, "held_gib": held / 2 ** 30,
           "final_loss": float(losses[-1]), "top1_agreement": float(out.top1_agreement)}
    optimizer = out = losses = None  # free the optimizer state before the next variant
    student.zero_grad(set_to_none=True)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def markdown(rows, cuda):
    lines = ["| loss variant | tokens/s | step time (ms) | peak memory (GiB) | peak above weights+optimizer (GiB) |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        mem = (f"{r['peak_gib']:.2f}", f"{r['peak_above_held_gib']:.2f}") if cuda else ("n/a", "n/a")
        lines.append(f"| {r['variant']} | {r['tokens_per_s']:,.0f} | {r['step_ms']:.1f} | {mem[0]} | {mem[1]} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not args.tiny:
        print("no CUDA device: use --tiny for a CPU smoke test", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    teacher, student, info = build_models(args, device, dtype)
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2):
        ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=gen)
        batches.append((ids[:, :-1].to(device), ids[:, 1:].to(device)))
    variants = []
    for name in args.variants.split(","):
        name = name.strip()
        if name == "naive":
            variants.append(("naive", None))
        elif name == "chunked":
            for size in args.chunk_sizes.split(","):
                size = size.strip()
                chunk = auto_chunk_size(args.vocab) if size == "auto" else int(size)
                variants.append((f"chunked@{chunk}" + (" (auto)" if size == "auto" else ""), chunk))
        else:
            raise SystemExit(f"unknown variant {name!r}")
    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'}; "
          f"teacher Llama hidden {args.hidden} x {args.layers} layers, vocab {args.vocab}; student: {info}; "
          f"batch {args.batch} x {args.seq}, {dtype}, checkpointing {not args.no_checkpointing}, "
          f"{args.warmup} warmup + {args.steps} timed steps", flush=True)
    rows = []
    for name, chunk in variants:
        variant = "naive" if chunk is None else "chunked"
        row = run_variant(name, make_loss(variant, chunk, args), teacher, student, batches, args, device)
        rows.append(row)
        print(f"  {name}: {row['tokens_per_s']:,.0f} tok/s, {row['step_ms']:.1f} ms/step, "
              f"peak {row['peak_gib']:.2f} GiB (above held {row['peak_above_held_gib']:.2f})", flush=True)
    print()
    print(markdown(rows, device.type == "cuda"))
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "device": str(device), "student": info,
                                               "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

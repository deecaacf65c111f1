"""Distillation training step: chunked KD loss vs the naive full-logit KL, and linear-attention students vs a
Llama student, side by side in one process (GPU; --tiny runs anywhere).

    python benchmarks/bench_distill.py [--students llama,discrete_mamba2,gla] [--seqs 2048,8192]
        [--variants naive,chunked] [--chunk-sizes auto,1024] [--steps 10] [--warmup 3] [--batch 2]
        [--vocab 128256] [--layers 22] [--checkpointing auto|true|false] [--set section.key=value]
        [--json out.json] [--tiny]

Teacher: random-init Llama, TinyLlama 1.1B shape (hidden 2048, 22 layers, 32 heads, 4 kv heads,
intermediate 5632) with Llama-3's vocab 128,256, bf16, frozen, built once. Students (--students, built one
after the other, bf16): `llama`, a plain random-init Llama of the same shape (softmax attention, the
baseline), or a trainkit.students linear-attention student with that mixer (discrete_mamba2, gla), built from
the teacher by build_student as distill.py does. Each student is set up from a distill.py config with the
defaults (student.freeze_mlp, memory.gradient_checkpointing, the distill.* loss options), changed by
--checkpointing and --set (e.g. --set student.freeze_mlp=true --set distill.temperature=2). AdamW (fused on
CUDA), one fresh optimizer per row, the first step timed on its own, --warmup more steps, then --steps
timed steps. For every student and sequence length (--seqs; batch --batch) the loss variants:

- naive: trainkit.kd.StudentKD(loss="naive"): full student and teacher logits, fp32 log-softmax, KL;
- chunked[@N]: trainkit.kd.StudentKD(loss="chunked"): trainkit.kd.chunked_kd_loss on the final hidden
  states and both lm_head weights, N tokens per chunk (auto: distill.chunk_size, else trainkit.kd.auto_chunk_size).

Reports tokens/s, step time, first-step time, peak memory (torch.cuda.max_memory_allocated over the timed
steps, reset per row), the part of it above the memory held between steps (weights, optimizer state) and the
checkpointing that ran, as a Markdown table; --json writes the rows (rewritten after each row). Results:
README ("Distillation: chunked vs naive KD loss, linear vs Llama student").
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

from bench_common import add_config_args, apply_checkpointing, checkpointed_layers, trainkit_config  # noqa: E402
from trainkit.config.distill import DistillConfig  # noqa: E402
from trainkit.kd import StudentKD, auto_chunk_size  # noqa: E402
from trainkit.students import MIXERS, build_student, freeze  # noqa: E402

STUDENTS = ("llama", *MIXERS)
TINY = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 128, "vocab": 1000, "seqs": "32,64",
        "batch": 1, "steps": 2, "warmup": 1}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--students", default="llama,discrete_mamba2", help=f"comma list of {', '.join(STUDENTS)}")
    p.add_argument("--seqs", default="2048", help="comma list of tokens per sequence")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--variants", default="naive,chunked", help="comma list of naive, chunked")
    p.add_argument("--chunk-sizes", default="auto", help="comma list of tokens per chunk for the chunked variant (auto or ints)")
    add_config_args(p)
    p.add_argument("--tiny", action="store_true", help="tiny shapes that run on CPU in seconds (smoke test)")
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None, help="write the rows and settings here")
    args = p.parse_args(argv)
    if args.tiny:
        for key, value in TINY.items():
            if p.get_default(key) == getattr(args, key):
                setattr(args, key, value)
    unknown = set(args.students.split(",")) - set(STUDENTS)
    if unknown:
        p.error(f"--students: unknown {sorted(unknown)} (known: {', '.join(STUDENTS)})")
    return args


def llama_config(args, seq):
    from transformers import LlamaConfig
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                      max_position_embeddings=max(4096, seq), tie_word_embeddings=False, use_cache=False)
    cfg._attn_implementation = "sdpa"
    return cfg


def build_teacher(args, device, dtype):
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    with torch.device(device):
        teacher = LlamaForCausalLM(llama_config(args, max(int(s) for s in args.seqs.split(",")))).to(dtype)
    return teacher.eval().requires_grad_(False)


def build_student_model(kind, teacher, cfg, device, dtype):
    """The student as distill.py sets it up (build_student, freeze; checkpointing per row), or a plain Llama."""
    from transformers import LlamaForCausalLM
    torch.manual_seed(1)
    if kind == "llama":
        with torch.device(device):
            student = LlamaForCausalLM(teacher.config).to(dtype)
        for name, p in student.named_parameters():
            p.requires_grad_(not (cfg.student.freeze_mlp and ".mlp." in name))
        info = "Llama (softmax attention), random init"
    else:
        student, report = build_student(teacher, mixer=kind, attention_layers=cfg.student.attention_layers,
                                        init_from_teacher=cfg.student.init_from_teacher, dtype=dtype, device=device,
                                        **cfg.student.mixer_options)
        freeze(student, freeze_mlp=cfg.student.freeze_mlp, attention_layers=cfg.student.attention_layers,
               freeze_replaced_layers=cfg.student.freeze_replaced_layers)
        info = f"{kind} student: {report['summary']}"
    student.train()
    return student, info + ("; MLPs frozen" if cfg.student.freeze_mlp else "")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_variant(kd_model, teacher_hidden, teacher_head, batches, args, device):
    student = kd_model.student
    student.zero_grad(set_to_none=True)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-5,
                                  fused=device.type == "cuda")
    cuda = device.type == "cuda"

    def step(input_ids, labels):
        out = kd_model(input_ids, labels, teacher_hidden(input_ids), teacher_head)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out

    sync(device)
    started = time.perf_counter()
    step(*batches[0])
    sync(device)
    first_step_s = time.perf_counter() - started
    for i in range(args.warmup):
        step(*batches[(i + 1) % len(batches)])
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
    peak = torch.cuda.max_memory_allocated() if cuda else None
    tokens = batches[0][0].numel() * args.steps
    row = {"tokens_per_s": tokens / elapsed, "step_ms": 1000 * elapsed / args.steps, "first_step_s": first_step_s,
           "peak_gib": peak / 2 ** 30 if cuda else None, "peak_above_held_gib": (peak - held) / 2 ** 30 if cuda else None,
           "held_gib": held / 2 ** 30 if cuda else None, "final_loss": float(losses[-1]),
           "top1_agreement": float(out.top1_agreement)}
    optimizer = out = losses = None  # free the optimizer state before the next row
    student.zero_grad(set_to_none=True)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def markdown(rows):
    lines = ["| student | seq | loss variant | checkpointing (layers) | tokens/s | step time (ms) | first step (s) | "
             "peak memory (GiB) | peak above weights+optimizer (GiB) |",
             "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        mem = (f"{r['peak_gib']:.2f}", f"{r['peak_above_held_gib']:.2f}") if r["peak_gib"] is not None else ("n/a", "n/a")
        lines.append(f"| {r['student']} | {r['seq']} | {r['variant']} | {r['checkpointing']} ({r['checkpointed_layers']}/"
                     f"{r['decoder_layers']}) | {r['tokens_per_s']:,.0f} | {r['step_ms']:.1f} | {r['first_step_s']:.1f} | "
                     f"{mem[0]} | {mem[1]} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not args.tiny:
        print("no CUDA device: use --tiny for a CPU smoke test", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = trainkit_config({}, args, DistillConfig)
    kd = cfg.distill
    variants = []
    for name in args.variants.split(","):
        name = name.strip()
        if name == "naive":
            variants.append(("naive", "naive", None))
        elif name == "chunked":
            for size in args.chunk_sizes.split(","):
                size = size.strip()
                chunk = (kd.chunk_size or auto_chunk_size(args.vocab)) if size == "auto" else int(size)
                variants.append((f"chunked@{chunk}" + (" (auto)" if size == "auto" else ""), "chunked", chunk))
        else:
            raise SystemExit(f"unknown variant {name!r}")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    teacher = build_teacher(args, device, dtype)
    print(f"device {device_name if device.type == 'cuda' else platform.processor() or 'cpu'}; teacher Llama hidden "
          f"{args.hidden} x {args.layers} layers, vocab {args.vocab}; batch {args.batch}, seqs {args.seqs}, {dtype}, "
          f"checkpointing {cfg.memory.gradient_checkpointing}, {args.warmup} warmup + {args.steps} timed steps", flush=True)
    teacher_head = teacher.lm_head.weight

    def teacher_hidden(input_ids):
        with torch.no_grad():
            return teacher.model(input_ids=input_ids, use_cache=False).last_hidden_state

    gen = torch.Generator().manual_seed(0)
    rows = []
    for kind in args.students.split(","):
        student, info = build_student_model(kind, teacher, cfg, device, dtype)
        print(f"student {kind}: {info}", flush=True)
        for seq in (int(s) for s in args.seqs.split(",")):
            batches = []
            for _ in range(2):
                ids = torch.randint(0, args.vocab, (args.batch, seq + 1), generator=gen)
                batches.append((ids[:, :-1].to(device), ids[:, 1:].to(device)))
            for name, loss, chunk in variants:
                kd_model = StudentKD(student, loss=loss, temperature=kd.temperature, top_k=kd.top_k,
                                     ce_weight=kd.ce_weight, chunk_size=chunk)
                # as distill.py: measured on the KD loss that runs, teacher forward included, per row (tokens differ)
                estimate = apply_checkpointing(student, cfg, device, tokens=args.batch * seq,
                                               loss_fn=lambda ids: kd_model(ids, ids, teacher_hidden(ids), teacher_head).loss)
                row = {"student": kind, "seq": seq, "batch": args.batch, "variant": name, "loss": loss, "chunk": chunk,
                       "checkpointing": cfg.memory.gradient_checkpointing, **checkpointed_layers(student), **estimate,
                       **run_variant(kd_model, teacher_hidden, teacher_head, batches, args, device)}
                rows.append(row)
                peak = (f"peak {row['peak_gib']:.2f} GiB (above held {row['peak_above_held_gib']:.2f})"
                        if row["peak_gib"] is not None else "peak n/a")
                print(f"  {kind} seq {seq} {name}: {row['tokens_per_s']:,.0f} tok/s, {row['step_ms']:.1f} ms/step, "
                      f"first step {row['first_step_s']:.1f} s, {peak}", flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps({"device": device_name, "settings": vars(args), "rows": rows},
                                                          indent=2))
        student = kd_model = None  # free this student before the next one is built
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print()
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""CUDA checks of the student mixers and the chunked KD loss (marked gpu; skipped without CUDA).

fla's Triton chunk kernels against the fp32 reference recurrences on the same CUDA bf16 tensors,
outputs and gradients; whole mixers through both paths; chunked KD at Llama-3 vocab size.
Run: python -m pytest -q -s tests/test_gpu_students.py   (-s shows the max errors)
"""

from __future__ import annotations

import pytest
import torch

import trainkit.students as students
from trainkit import linear_attention as la
from trainkit.kd import chunked_kd_loss, naive_kd_loss

pytestmark = pytest.mark.gpu

DEV = "cuda"


def backward_or_skip(loss, what):
    """fla 0.6 refuses the gated backward kernel on Hopper with Triton >= 3.4, < 3.7.1 (fla issue #640):
    skip with its message (the forward was checked before this is called)."""
    try:
        loss.backward()
    except RuntimeError as error:
        if "Triton" in str(error) and "#640" in str(error):
            pytest.skip(f"{what}: forward matched; backward refused by fla on this Triton: {error}")
        raise


def rel_err(a, b):
    """max |a - b| / max |b|: one number per tensor, robust to bf16's relative rounding."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6)).item()


def op_inputs(gate: str, B=2, T=200, H=4, K=64, V=64, seed=0):
    g_ = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(B, T, H, K, device=DEV, generator=g_).bfloat16()
    k = torch.randn(B, T, H, K, device=DEV, generator=g_).bfloat16() * K ** -0.5
    v = torch.randn(B, T, H, V, device=DEV, generator=g_).bfloat16()
    shape = (B, T, H) if gate == "simple" else (B, T, H, K)
    g = torch.nn.functional.logsigmoid(torch.randn(*shape, device=DEV, generator=g_) + 3.0) / 4
    return [x.requires_grad_() for x in (q, k, v, g)]


@pytest.mark.parametrize("op,ref,gate", [(la.simple_gla, la.reference_simple_gla, "simple"),
                                         (la.gla, la.reference_gla, "full")], ids=["simple_gla", "gla"])
@pytest.mark.parametrize("T", [64, 200])
def test_kernel_matches_reference(op, ref, gate, T):
    inputs = op_inputs(gate, T=T)
    dout = torch.randn(2, T, 4, 64, device=DEV).bfloat16()
    results = []
    for fn in (ref, op):
        for x in inputs:
            x.grad = None
        out, _ = fn(*inputs)
        if fn is op:
            err = rel_err(out, results[0][0])
            print(f"\n{gate} T={T} kernel vs reference forward, max rel err: o {err:.2e}")
            assert err < 2e-2
        loss = (out.float() * dout.float()).sum()
        backward_or_skip(loss, f"{gate} kernel") if fn is op else loss.backward()
        results.append([out.detach()] + [x.grad.clone() for x in inputs])
    results.reverse()
    errors = {name: rel_err(a, b) for name, a, b in zip(("o", "dq", "dk", "dv", "dg"), *results)}
    print(f"\n{gate} T={T} kernel vs reference, max rel err: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    for name, err in errors.items():
        assert err < (5e-2 if name == "dg" else 2e-2), (name, err)


def tiny_teacher():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=1000, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).to(DEV)


@pytest.mark.parametrize("mixer", students.MIXERS)
def test_mixer_kernel_path_matches_reference_path(mixer, monkeypatch):
    student, _ = students.build_student(tiny_teacher(), mixer=mixer, dtype=torch.bfloat16)
    layer = student.model.layers[0].self_attn
    x = (torch.randn(2, 150, 256, device=DEV) * 0.5).bfloat16().requires_grad_()
    results = []
    kernel_op, kernel_gla = students.simple_gla, students.gla
    for use_reference in (True, False):
        monkeypatch.setattr(students, "simple_gla", la.reference_simple_gla if use_reference else kernel_op)
        monkeypatch.setattr(students, "gla", la.reference_gla if use_reference else kernel_gla)
        layer.zero_grad(set_to_none=True)
        x.grad = None
        out, _ = layer(x)
        loss = out.float().square().mean()
        if use_reference:
            loss.backward()
        else:
            err = rel_err(out, results[0]["out"])
            print(f"\n{mixer} module kernel vs reference forward, max rel err: {err:.1e}")
            assert err < 5e-2
            backward_or_skip(loss, f"{mixer} module")
        results.append({"out": out.detach(), "dx": x.grad.clone(),
                        **{n: p.grad.clone() for n, p in layer.named_parameters()}})
    reference, kernel = results
    errors = {name: rel_err(kernel[name], reference[name]) for name in kernel}
    print(f"\n{mixer} module kernel vs reference path, max rel err: "
          + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    for name, err in errors.items():
        assert err < 5e-2, (name, err)


def test_chunked_kd_llama3_vocab():
    torch.manual_seed(0)
    n, hidden, vocab = 8192, 2048, 128256
    weight = (torch.randn(vocab, hidden, device=DEV) * 0.02).bfloat16().requires_grad_()
    t_weight = (torch.randn(vocab, hidden, device=DEV) * 0.02).bfloat16()
    h = torch.randn(n, hidden, device=DEV).bfloat16().requires_grad_()
    t_h = torch.randn(n, hidden, device=DEV).bfloat16()
    labels = torch.randint(0, vocab, (n,), device=DEV)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = chunked_kd_loss(h, weight, t_h, t_weight, labels, temperature=2.0, ce_weight=0.1)
    out.loss.backward()
    torch.cuda.synchronize()
    extra = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
    full_logits = n * vocab * 4 / 2 ** 30
    print(f"\nchunked KD 8192 x 128256: loss {out.loss.item():.4f}, peak extra {extra:.2f} GiB "
          f"(one fp32 logits tensor: {full_logits:.2f} GiB)")
    assert torch.isfinite(out.loss) and torch.isfinite(h.grad).all() and torch.isfinite(weight.grad).all()
    # fp32 lm_head-gradient accumulator (0.98 GiB) + its bf16 copy (0.49) + ~3 chunk x vocab fp32 buffers
    # (1024-token chunks: 0.49 GiB each); measured 2.97 GiB on an H100. The naive loss holds several
    # full logits tensors of 3.9 GiB (fp32) each.
    assert extra < full_logits

    # a slice against the full-logit reference (same bf16 inputs)
    m = 1024
    hs = h.detach()[:m].clone().requires_grad_()
    ws = weight.detach().clone().requires_grad_()
    ref = naive_kd_loss(hs.float() @ ws.float().T, t_h[:m].float() @ t_weight.float().T, labels[:m],
                        temperature=2.0, ce_weight=0.1)
    ref.loss.backward()
    hc = h.detach()[:m].clone().requires_grad_()
    wc = weight.detach().clone().requires_grad_()
    got = chunked_kd_loss(hc, wc, t_h[:m], t_weight, labels[:m], temperature=2.0, ce_weight=0.1, chunk_size=300)
    got.loss.backward()
    errors = {"loss": abs(got.loss.item() - ref.loss.item()) / abs(ref.loss.item()),
              "d_hidden": rel_err(hc.grad, hs.grad), "d_weight": rel_err(wc.grad, ws.grad)}
    print("chunked vs naive (fp32 logits) on 1024 tokens, rel err: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    assert errors["loss"] < 1e-3 and errors["d_hidden"] < 2e-2 and errors["d_weight"] < 2e-2
    assert abs(got.top1_agreement.item() - ref.top1_agreement.item()) < 0.01

"""trainkit.kd: the chunked KD loss equals the full-logit reference, values and gradients (CPU, fp64)."""

from __future__ import annotations


import pytest
import torch

from trainkit.kd import auto_chunk_size, chunked_kd_loss, naive_kd_loss

N, H, HT, V = 37, 16, 24, 101


def make(seed=0, dtype=torch.float64, ignore=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=dtype)
    weight = torch.randn(V, H, generator=g, dtype=dtype) * 0.5
    t_hidden = torch.randn(N, HT, generator=g, dtype=dtype)
    t_weight = torch.randn(V, HT, generator=g, dtype=dtype) * 0.5
    labels = torch.randint(0, V, (N,), generator=g)
    if ignore:
        labels[[0, 5, 6, 30]] = -100
    return hidden, weight, t_hidden, t_weight, labels


def run_both(chunk_size, labels_on=True, **kw):
    hidden, weight, t_hidden, t_weight, labels = make()
    labels = labels if labels_on else None
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = naive_kd_loss(h1 @ w1.T, t_hidden @ t_weight.T, labels, **kw)
    ref.loss.backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = chunked_kd_loss(h2, w2, t_hidden, t_weight, labels, chunk_size=chunk_size, **kw)
    (out.loss * 1.0).backward()
    return ref, out, (h1.grad, w1.grad), (h2.grad, w2.grad)


CASES = [
    {},
    {"temperature": 2.0},
    {"top_k": 5},
    {"top_k": 5, "temperature": 2.0},
    {"ce_weight": 0.3},
    {"ce_weight": 0.3, "temperature": 2.0},
    {"ce_weight": 0.5, "top_k": 7, "temperature": 2.0},
    {"ce_weight": 1.0},
]


@pytest.mark.parametrize("chunk_size", [1, 8, 10, 37, 64])
@pytest.mark.parametrize("kw", CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "plain")
def test_chunked_matches_naive(chunk_size, kw):
    ref, out, (gh_ref, gw_ref), (gh, gw) = run_both(chunk_size, **kw)
    for name in ("loss", "kd_loss", "ce_loss", "top1_agreement"):
        torch.testing.assert_close(getattr(out, name), getattr(ref, name).to(out.loss.dtype), rtol=1e-10, atol=1e-12,
                                   msg=name)
    assert int(out.tokens) == int(ref.tokens) == N - 4
    torch.testing.assert_close(gh, gh_ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-9, atol=1e-12)
    assert out.loss.item() > 0


@pytest.mark.parametrize("kw", [{}, {"top_k": 3, "temperature": 2.0}])
def test_without_labels(kw):
    ref, out, (gh_ref, gw_ref), (gh, gw) = run_both(10, labels_on=False, **kw)
    assert int(out.tokens) == N
    assert out.ce_loss.item() == 0.0
    torch.testing.assert_close(out.loss, ref.loss)
    torch.testing.assert_close(gh, gh_ref)
    torch.testing.assert_close(gw, gw_ref)


def test_definitions():
    hidden, weight, t_hidden, t_weight, labels = make(ignore=False)
    s, t = hidden @ weight.T, t_hidden @ t_weight.T
    # identical models: zero KD, full agreement
    same = chunked_kd_loss(hidden, weight, hidden, weight, labels, chunk_size=7)
    assert abs(same.kd_loss.item()) < 1e-12 and same.top1_agreement.item() == 1.0
    # full KL at T = 2 by hand
    p, q = torch.softmax(t / 2, -1), torch.softmax(s / 2, -1)
    kl = (p * (p.log() - q.log())).sum(-1).mean() * 4
    out = chunked_kd_loss(hidden, weight, t_hidden, t_weight, labels, temperature=2.0, chunk_size=9)
    torch.testing.assert_close(out.kd_loss, kl)
    torch.testing.assert_close(out.ce_loss, torch.nn.functional.cross_entropy(s, labels))
    torch.testing.assert_close(out.top1_agreement, (s.argmax(-1) == t.argmax(-1)).double().mean())
    # top-k: teacher renormalised over its top k, student's full distribution evaluated on those ids
    vals, ids = t.topk(4, -1)
    pk = torch.softmax(vals, -1)
    klk = (pk * (pk.log() - torch.log_softmax(s, -1).gather(1, ids))).sum(-1).mean()
    out = chunked_kd_loss(hidden, weight, t_hidden, t_weight, labels, top_k=4, chunk_size=9)
    torch.testing.assert_close(out.kd_loss, klk)
    assert out.kd_loss.item() >= 0


def test_all_ignored_and_only_weight_grad():
    hidden, weight, t_hidden, t_weight, labels = make()
    w = weight.clone().requires_grad_()
    out = chunked_kd_loss(hidden, w, t_hidden, t_weight, torch.full_like(labels, -100), chunk_size=8)
    out.loss.backward()
    assert out.loss.item() == 0.0 and int(out.tokens) == 0
    assert torch.count_nonzero(w.grad) == 0
    # frozen lm_head: only the hidden states get a gradient
    h = hidden.clone().requires_grad_()
    chunked_kd_loss(h, weight, t_hidden, t_weight, labels, chunk_size=8).loss.backward()
    assert h.grad is not None and torch.isfinite(h.grad).all()


def test_no_grad_eval_and_grad_output_scaling():
    hidden, weight, t_hidden, t_weight, labels = make()
    with torch.no_grad():
        ev = chunked_kd_loss(hidden, weight, t_hidden, t_weight, labels, chunk_size=8)
    h = hidden.clone().requires_grad_()
    out = chunked_kd_loss(h, weight, t_hidden, t_weight, labels, chunk_size=8)
    torch.testing.assert_close(ev.loss, out.loss.detach())
    (out.loss * 3.0).backward()
    h2 = hidden.clone().requires_grad_()
    naive_kd_loss(h2 @ weight.T, t_hidden @ t_weight.T, labels).loss.mul(3.0).backward()
    torch.testing.assert_close(h.grad, h2.grad)


def test_fp32_and_bf16_autocast_close():
    hidden, weight, t_hidden, t_weight, labels = (x.float() if x.is_floating_point() else x for x in make())
    ref = naive_kd_loss(hidden @ weight.T, t_hidden @ t_weight.T, labels, temperature=2.0)
    out = chunked_kd_loss(hidden, weight, t_hidden, t_weight, labels, temperature=2.0, chunk_size=16)
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    w = weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = chunked_kd_loss(hidden, w, t_hidden, t_weight, labels, temperature=2.0, chunk_size=16)
    low.loss.backward()
    assert w.grad.dtype == torch.float32
    assert abs(low.loss.item() - ref.loss.item()) < 0.05 * ref.loss.item()


def test_auto_chunk_size_and_errors():
    assert auto_chunk_size(128256) == 1024
    assert auto_chunk_size(101) % 128 == 0
    hidden, weight, t_hidden, t_weight, labels = make()
    with pytest.raises(ValueError, match="tokens"):
        chunked_kd_loss(hidden[None], weight, t_hidden[None], t_weight)
    with pytest.raises(ValueError, match="vocab"):
        chunked_kd_loss(hidden, weight[:-1], t_hidden, t_weight)
    out = chunked_kd_loss(hidden, weight, t_hidden, t_weight, labels)  # default chunk size
    torch.testing.assert_close(out.loss, naive_kd_loss(hidden @ weight.T, t_hidden @ t_weight.T, labels).loss)

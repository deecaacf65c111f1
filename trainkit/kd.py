"""Knowledge-distillation losses on logits, computed in chunks over tokens.

The loss (both implementations below compute exactly this):

    valid_i   = labels_i != ignore_index          (every token when labels is None)
    n         = number of valid tokens            (clamped to >= 1)
    p_i       = softmax(teacher_logits_i / T)     teacher distribution at temperature T
    q_i       = softmax(student_logits_i / T)     student distribution at temperature T
    kd_loss   = T^2 * sum_{valid i} KL(p_i || q_i) / n
    ce_loss   = sum_{valid i} -log softmax(student_logits_i)[labels_i] / n     (T = 1; 0 without labels)
    loss      = (1 - ce_weight) * kd_loss + ce_weight * ce_loss

top_k (sparse teacher): S_i = the k ids with the largest teacher logits of token i. The teacher's
distribution is renormalised over S_i, p_i = softmax(teacher_logits_i[S_i] / T) (zero elsewhere), and
the student keeps its FULL-vocabulary distribution q_i = softmax(student_logits_i / T):

    KL_k(p_i || q_i) = sum_{j in S_i} p_ij * (log p_ij - log q_ij)

It is >= 0 (sum_{j in S} q_ij <= 1) and its gradient w.r.t. the student logits is (q_i - p_i) / T, the
same form as the full KL: student mass outside the teacher's top-k is pushed down, not ignored.
top1_agreement = fraction of valid tokens where argmax student logits == argmax teacher logits.
Every mean is over this call's valid tokens (per micro-batch, per rank).

`chunked_kd_loss` takes the final hidden states and the lm_head weights of both models and never
materialises either model's (tokens x vocab) logits: a torch.autograd.Function loops over chunks of
tokens, computes both logit chunks (bf16/fp16 matmul with fp32 output on CUDA, then fp32 softmax),
the loss terms and, right there, the gradient w.r.t. the student hidden chunk and the lm_head weight
(accumulated over chunks), as Liger-Kernel's fused linear cross-entropy does. Only those gradients
are kept for backward, which scales them by grad_output. Peak extra memory is about three
chunk x vocab fp32 buffers plus one gradient the size of lm_head.

`naive_kd_loss` is the same definition on full logits with plain autograd: the reference for tests
and the baseline of benchmarks/bench_distill.py.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["KDOutput", "chunked_kd_loss", "naive_kd_loss", "auto_chunk_size"]

# Budget for one chunk x vocab fp32 buffer when chunk_size is None (about three such buffers live at
# once). 2**29 bytes = 512 MiB: 1024 tokens at vocab 128,256. Measured on an H100 (bench_distill.py,
# 1.1B Llama student, batch 2 x 2048): 1024-token chunks ran fastest (19.4k tok/s vs 17.9k at 512 and
# 18.8k at 4096) at the same peak as 512; 4096 costs 4.4 GiB more.
CHUNK_BUFFER_BYTES = 2 ** 29


class KDOutput(NamedTuple):
    loss: torch.Tensor            # (1 - ce_weight) * kd_loss + ce_weight * ce_loss; the only one with a gradient
    kd_loss: torch.Tensor         # T^2 * mean KL(p_teacher || p_student) over valid tokens
    ce_loss: torch.Tensor         # mean hard-label cross-entropy of the student at T = 1 (0 without labels)
    top1_agreement: torch.Tensor  # fraction of valid tokens where the argmaxes agree
    tokens: torch.Tensor          # number of valid tokens (int64)


def auto_chunk_size(vocab_size: int, budget_bytes: int = CHUNK_BUFFER_BYTES) -> int:
    """Tokens per chunk such that one chunk x vocab fp32 buffer takes about `budget_bytes` (multiple of 128)."""
    return max(128, (budget_bytes // (4 * vocab_size)) // 128 * 128)


# ---------------------------------------------------------------------------------------------- helpers

def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _logits(hidden: torch.Tensor, weight: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """hidden @ weight.T with `acc` output: low-precision inputs accumulate and store in fp32 (CUDA)."""
    if hidden.dtype == acc:
        return hidden @ weight.T
    if hidden.is_cuda:
        return torch.mm(hidden, weight.T, out_dtype=acc)
    return (hidden @ weight.T).to(acc)


def _addmm_(acc_tensor: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc_tensor += a @ b, with acc_tensor possibly wider (fp32) than a and b (bf16/fp16)."""
    if a.dtype == acc_tensor.dtype:
        acc_tensor.addmm_(a, b)
    elif a.is_cuda:  # cuBLAS reads and writes the fp32 accumulator directly: no temporary
        torch.addmm(acc_tensor, a, b, out_dtype=acc_tensor.dtype, out=acc_tensor)
    else:
        acc_tensor.add_((a @ b).to(acc_tensor.dtype))


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The matmul dtype: autocast's when it is on for this device, else the hidden states' own."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type) and hidden.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.get_autocast_dtype(device_type)
    return hidden.dtype


def _valid_mask(labels, n_tokens, ignore_index, device):
    if labels is None:
        return torch.ones(n_tokens, dtype=torch.bool, device=device)
    return labels != ignore_index


# ---------------------------------------------------------------------------------------------- the chunk loop

def _kd_chunks(hidden, weight, t_hidden, t_weight, labels, temperature, top_k, ce_weight, chunk_size,
               ignore_index, compute_dtype, need_grad_hidden, need_grad_weight):
    """Loss sums and (optionally) gradients of `loss` w.r.t. hidden and weight, chunk by chunk."""
    n_tokens = hidden.shape[0]
    device = hidden.device
    acc = _acc_dtype(compute_dtype)
    t_compute = t_hidden.dtype if t_hidden.dtype in (torch.float16, torch.bfloat16, torch.float64) else compute_dtype
    inv_t = 1.0 / temperature
    w_kd, w_ce = 1.0 - ce_weight, ce_weight
    need_grad = need_grad_hidden or need_grad_weight

    valid = _valid_mask(labels, n_tokens, ignore_index, device)
    count = valid.sum()
    inv_n = 1.0 / count.clamp(min=1).to(acc)
    safe_labels = labels.clamp(min=0) if labels is not None else None

    w_c = weight.to(compute_dtype)
    tw_c = t_weight.to(t_compute)
    kd_sum = torch.zeros((), dtype=acc, device=device)
    ce_sum = torch.zeros((), dtype=acc, device=device)
    agree = torch.zeros((), dtype=torch.int64, device=device)
    grad_hidden = torch.empty_like(hidden) if need_grad_hidden else None
    grad_weight = None
    if need_grad_weight:  # accumulated over chunks in fp32 (fp64 for fp64 weights), cast at the end
        grad_weight = torch.zeros(weight.shape, dtype=_acc_dtype(weight.dtype), device=device)

    for start in range(0, n_tokens, chunk_size):
        end = min(start + chunk_size, n_tokens)
        rows = slice(start, end)
        v = valid[rows]
        h_c = hidden[rows].to(compute_dtype)

        # ---- teacher: p (dense or top-k), sum p log p, argmax  (no autograd anywhere in here)
        t = _logits(t_hidden[rows].to(t_compute), tw_c, acc)
        if top_k is not None:
            top_vals, top_ids = t.topk(min(top_k, t.shape[-1]), dim=-1)
            del t
            t_arg = top_ids[:, 0]
            log_p = torch.log_softmax(top_vals * inv_t, dim=-1)
            p = log_p.exp()
            neg_entropy = (p * log_p).sum(-1)
            del log_p, top_vals
        else:
            if temperature != 1.0:
                t.mul_(inv_t)
            t_arg = t.argmax(-1)
            log_p = torch.log_softmax(t, dim=-1)
            del t
            p = log_p.exp()
            neg_entropy = torch.mul(p, log_p, out=log_p).sum(-1)
            del log_p

        # ---- student
        s = _logits(h_c, w_c, acc)
        s_arg = s.argmax(-1)
        agree += ((s_arg == t_arg) & v).sum()
        soft1 = None  # softmax(s) at T = 1 when its gradient is needed and T != 1
        if safe_labels is not None:
            lab = safe_labels[rows, None]
            s_lab = s.gather(1, lab).squeeze(1)
        if temperature == 1.0:
            log_q = torch.log_softmax(s, dim=-1)
            if safe_labels is not None:
                ce_tok = -log_q.gather(1, lab).squeeze(1)
            del s
        else:
            if safe_labels is not None:
                lse1 = torch.logsumexp(s, dim=-1)
                ce_tok = lse1 - s_lab
            log_q = torch.log_softmax(s * inv_t, dim=-1)
            if need_grad and w_ce > 0 and safe_labels is not None:
                soft1 = s.sub_(lse1[:, None]).exp_()
            del s
        if top_k is not None:
            cross = (p * log_q.gather(1, top_ids)).sum(-1)
        else:
            cross = (p * log_q).sum(-1)
        kl = neg_entropy - cross
        vf = v.to(acc)
        kd_sum += (kl * vf).sum()
        if safe_labels is not None:
            ce_sum += (ce_tok * vf).sum()

        if not need_grad:
            del p, log_q
            continue
        # ---- d loss / d student logits = a (q - p) + b (softmax(s) - onehot), per token scale a, b
        a = (w_kd * temperature) * vf * inv_n       # T^2 * d/dlogits of KL(p||softmax(s/T)) = T (q - p)
        b = w_ce * vf * inv_n if safe_labels is not None else None
        grad = log_q.exp_()                          # q, in place
        del log_q
        if top_k is not None:
            if b is not None and temperature == 1.0:
                grad.mul_((a + b)[:, None])
            else:
                grad.mul_(a[:, None])
            grad.scatter_add_(1, top_ids, p * -a[:, None])
        else:
            if b is not None and temperature == 1.0:
                grad.mul_((a + b)[:, None])
            else:
                grad.mul_(a[:, None])
            grad.addcmul_(p, a[:, None], value=-1.0)
        del p
        if b is not None and w_ce > 0:
            if soft1 is not None:
                grad.addcmul_(soft1, b[:, None])
                del soft1
            grad.scatter_add_(1, lab, -b[:, None])
        g_c = grad.to(compute_dtype)
        del grad
        if need_grad_hidden:
            grad_hidden[rows] = (g_c @ w_c).to(hidden.dtype)
        if need_grad_weight:
            _addmm_(grad_weight, g_c.T, h_c)
        del g_c

    kd_loss = kd_sum * inv_n * (temperature ** 2)
    ce_loss = ce_sum * inv_n
    loss = w_kd * kd_loss + w_ce * ce_loss
    top1 = agree.to(acc) * inv_n
    stats = (loss, kd_loss, ce_loss, top1, count)
    return stats, grad_hidden, grad_weight


class _ChunkedKDFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, t_hidden, t_weight, labels, temperature, top_k, ce_weight, chunk_size,
                ignore_index, compute_dtype):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(hidden.device.type, enabled=False):
            stats, grad_hidden, grad_weight = _kd_chunks(
                hidden, weight, t_hidden, t_weight, labels, temperature, top_k, ce_weight, chunk_size,
                ignore_index, compute_dtype, need_h, need_w)
        if grad_weight is not None and grad_weight.dtype != weight.dtype:
            grad_weight = grad_weight.to(weight.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.mark_non_differentiable(*stats[1:])
        return stats

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight * grad_loss.to(grad_weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None, None


def _check(hidden, weight, t_hidden, t_weight, labels, temperature, ce_weight, top_k):
    if hidden.ndim != 2 or t_hidden.ndim != 2:
        raise ValueError(f"hidden states must be (tokens, hidden): got {tuple(hidden.shape)} and {tuple(t_hidden.shape)}"
                         " (flatten batch and time first)")
    if hidden.shape[0] != t_hidden.shape[0]:
        raise ValueError(f"student has {hidden.shape[0]} tokens, teacher {t_hidden.shape[0]}")
    if weight.shape[0] != t_weight.shape[0]:
        raise ValueError(f"vocab sizes differ: student lm_head {tuple(weight.shape)}, teacher {tuple(t_weight.shape)}")
    if weight.shape[1] != hidden.shape[1] or t_weight.shape[1] != t_hidden.shape[1]:
        raise ValueError("lm_head weight (vocab, hidden) does not match the hidden states")
    if labels is not None and labels.shape != (hidden.shape[0],):
        raise ValueError(f"labels must be (tokens,) = ({hidden.shape[0]},), got {tuple(labels.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= ce_weight <= 1.0:
        raise ValueError(f"ce_weight must be in [0, 1], got {ce_weight}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")


def chunked_kd_loss(student_hidden: torch.Tensor, lm_head_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                    teacher_lm_head_weight: torch.Tensor, labels: torch.Tensor | None = None, *,
                    temperature: float = 1.0, top_k: int | None = None, ce_weight: float = 0.0,
                    chunk_size: int | None = None, ignore_index: int = -100) -> KDOutput:
    """KD loss (module docstring) from final hidden states and lm_head weights, without full logits.

    student_hidden (N, H), lm_head_weight (V, H), teacher_hidden (N, Ht), teacher_lm_head_weight (V, Ht),
    labels (N,) or None. No lm_head bias. The teacher side gets no gradient. chunk_size: tokens per
    chunk; None picks auto_chunk_size(V) (1024 tokens at V = 128,256). Matmuls run in autocast's dtype
    when autocast is on, else in the student hidden states' dtype; softmax and sums in fp32 (fp64 for
    fp64 inputs). Gradients are computed during forward, so backward is a multiply.
    """
    _check(student_hidden, lm_head_weight, teacher_hidden, teacher_lm_head_weight, labels, temperature, ce_weight,
           top_k)
    chunk = chunk_size or auto_chunk_size(lm_head_weight.shape[0])
    compute_dtype = _compute_dtype(student_hidden)
    teacher_hidden = teacher_hidden.detach()
    teacher_lm_head_weight = teacher_lm_head_weight.detach()
    if labels is not None:
        labels = labels.to(student_hidden.device)
    if torch.is_grad_enabled() and (student_hidden.requires_grad or lm_head_weight.requires_grad):
        stats = _ChunkedKDFunction.apply(student_hidden, lm_head_weight, teacher_hidden, teacher_lm_head_weight,
                                         labels, float(temperature), top_k, float(ce_weight), int(chunk),
                                         ignore_index, compute_dtype)
    else:
        ctx = torch.autocast(student_hidden.device.type, enabled=False)
        with torch.no_grad(), ctx:
            stats, _, _ = _kd_chunks(student_hidden, lm_head_weight, teacher_hidden, teacher_lm_head_weight, labels,
                                     float(temperature), top_k, float(ce_weight), int(chunk), ignore_index,
                                     compute_dtype, False, False)
    return KDOutput(*stats)


def naive_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None, *,
                  temperature: float = 1.0, top_k: int | None = None, ce_weight: float = 0.0,
                  ignore_index: int = -100) -> KDOutput:
    """The same loss on full (N, V) logits with plain autograd (fp32 softmax): reference and baseline."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    acc = _acc_dtype(student_logits.dtype)
    s = student_logits.to(acc)
    with torch.no_grad():
        t = teacher_logits.detach().to(acc)
    valid = _valid_mask(labels, s.shape[0], ignore_index, s.device)
    count = valid.sum()
    n = count.clamp(min=1).to(acc)
    log_q = torch.log_softmax(s / temperature, dim=-1)
    if top_k is not None:
        top_vals, top_ids = t.topk(min(top_k, t.shape[-1]), dim=-1)
        log_p = torch.log_softmax(top_vals / temperature, dim=-1)
        kl = (log_p.exp() * (log_p - log_q.gather(1, top_ids))).sum(-1)
        t_arg = top_ids[:, 0]
    else:
        log_p = torch.log_softmax(t / temperature, dim=-1)
        kl = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
        t_arg = t.argmax(-1)
    kd_loss = temperature ** 2 * (kl * valid).sum() / n
    if labels is not None:
        ce_loss = F.cross_entropy(s, labels, ignore_index=ignore_index, reduction="sum") / n
    else:
        ce_loss = s.new_zeros(())
    loss = (1.0 - ce_weight) * kd_loss + ce_weight * ce_loss
    with torch.no_grad():
        top1 = ((s.argmax(-1) == t_arg) & valid).sum().to(acc) / n
    return KDOutput(loss, kd_loss.detach(), ce_loss.detach(), top1, count)


# ---------------------------------------------------------------- the student with its loss, and its evaluation
class StudentKD(torch.nn.Module):
    """A student with its KD loss as one module, so that DDP sees the lm_head the chunked loss uses
    inside forward (accelerate.prepare wraps this module). `loss`: chunked (memory-lean) or naive
    (full logits; the baseline of benchmarks/bench_distill.py)."""

    def __init__(self, student, *, loss: str = "chunked", **kd_options):
        super().__init__()
        self.student, self.loss_kind, self.kd_options = student, loss, kd_options

    @property
    def _no_split_modules(self):
        # FSDP's TRANSFORMER_BASED_WRAP shards the modules the prepared model names here: the student's decoder
        # layers, each its own unit. The embeddings, final norm and lm_head stay in this root unit, gathered for
        # the whole forward: the chunked loss reads lm_head's weight directly, without calling lm_head.
        return self.student._no_split_modules

    def forward(self, input_ids, labels, teacher_hidden, teacher_head) -> KDOutput:
        hidden = self.student.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
        head = self.student.get_output_embeddings().weight
        if self.loss_kind == "naive":
            options = {k: v for k, v in self.kd_options.items() if k != "chunk_size"}
            return naive_kd_loss(hidden.flatten(0, 1) @ head.T, teacher_hidden.flatten(0, 1) @ teacher_head.T,
                                 labels.flatten(), **options)
        return chunked_kd_loss(hidden.flatten(0, 1), head, teacher_hidden.flatten(0, 1), teacher_head,
                               labels.flatten(), **self.kd_options)


def evaluate_kd(kd_model, eval_batches: list[torch.Tensor], teacher_hidden, teacher_head, accelerator) -> dict:
    """KD loss, cross-entropy, perplexity and top-1 agreement with the teacher on held-out windows
    (each a row of max_seq_length + 1 tokens), token-weighted and summed over processes.
    `teacher_hidden(input_ids)`: the frozen teacher's final hidden states on the student's device."""
    import math
    import time

    device = accelerator.device
    kd_model.eval()
    sums = torch.zeros(4, device=device, dtype=torch.float64)  # kd*tokens, ce*tokens, agree*tokens, tokens
    started = time.time()
    with torch.no_grad():
        for windows in eval_batches:
            windows = windows.to(device)
            inputs, labels = windows[:, :-1], windows[:, 1:]
            with accelerator.autocast():
                out = kd_model(inputs, labels, teacher_hidden(inputs), teacher_head)
            n = torch.as_tensor(out.tokens, device=device, dtype=torch.float64)  # no host sync per batch
            sums += torch.stack([out.kd_loss.double() * n, out.ce_loss.double() * n, out.top1_agreement.double() * n, n])
    kd_model.train()
    kd, ce, agree, tokens = accelerator.reduce(sums, "sum").tolist()
    tokens = max(tokens, 1)
    return {"eval_kd_loss": kd / tokens, "eval_loss": ce / tokens, "perplexity": math.exp(min(ce / tokens, 50)),
            "eval_top1_agreement": agree / tokens, "eval_tokens": int(tokens), "eval_seconds": round(time.time() - started, 3)}

"""Gated linear attention ops: fla's Triton kernels on GPU, pure PyTorch references on CPU.

Both recurrences keep a state S (per head, K x V) and emit o_t = scale * q_t . S_t:

    GLA         S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T      g_t: per head and key channel (B, T, H, K)
    simple GLA  S_t = exp(g_t) S_{t-1} + k_t v_t^T            g_t: one scalar per head       (B, T, H)

Discrete Mamba-2 (Llamba's mixer) is simple GLA with q=C, k=B, v=x. Tensors are (B, T, H, D) as in
fla. `cu_seqlens` (int64, (N+1,)) marks variable-length sequences packed along T with B == 1, which is
how fla's layers handle padded batches. The references are the recurrences above written as loops
in fp32: slow, exact, and what CPU training, tests and `generate()` run on.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["gla", "simple_gla", "reference_gla", "reference_simple_gla", "uses_kernels", "simple_gla_backward_is_refused"]


def uses_kernels(tensor: torch.Tensor) -> bool:
    """fla's kernels are Triton: they run only on CUDA tensors."""
    return tensor.is_cuda


def reference_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                  state_v_first=False):
    """GLA recurrence in fp32 (fla/ops/gla/naive.py with scale, varlen and the state layout of the kernels)."""
    return _reference(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, state_v_first, scalar_gate=False)


def reference_simple_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                         state_v_first=False):
    """Simple GLA (one decay per head) recurrence in fp32."""
    return _reference(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, state_v_first, scalar_gate=True)


def _reference(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, state_v_first, scalar_gate):
    dtype = q.dtype
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    scale = key_dim ** -0.5 if scale is None else scale
    if cu_seqlens is not None:
        if batch != 1:
            raise ValueError(f"cu_seqlens needs batch size 1 (packed sequences), got {batch}")
        bounds = cu_seqlens.tolist()
        segments = [(0, bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]
    else:
        segments = [(b, 0, length) for b in range(batch)]
    qf, kf, vf, gf = (x.float() for x in (q, k, v, g))
    out = torch.zeros(batch, length, heads, value_dim, dtype=torch.float32, device=q.device)
    finals = []
    for index, (b, start, end) in enumerate(segments):
        state = q.new_zeros(heads, key_dim, value_dim, dtype=torch.float32)
        if initial_state is not None:
            s0 = initial_state[index].float()
            state = state + (s0.transpose(-1, -2) if state_v_first else s0)
        rows = []
        for t in range(start, end):
            decay = gf[b, t].exp()  # (H,) or (H, K)
            decay = decay[:, None, None] if scalar_gate else decay[:, :, None]
            state = state * decay + kf[b, t, :, :, None] * vf[b, t, :, None, :]
            rows.append((qf[b, t, :, :, None] * scale * state).sum(-2))
        if rows:
            out[b, start:end] = torch.stack(rows)
        finals.append(state.transpose(-1, -2) if state_v_first else state)
    final_state = torch.stack(finals) if output_final_state else None
    return out.to(dtype), final_state


@functools.cache
def _load_kernels() -> None:
    """fla imported the way trainkit.gla does it (its tuned-config table for this GPU included), once."""
    from trainkit.gla import import_fla
    import_fla()


def gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None, state_v_first=False):
    """fla's chunked GLA kernel on CUDA, the reference elsewhere. Returns (o, final_state or None)."""
    if uses_kernels(q):
        _load_kernels()
        from fla.ops.gla import chunk_gla
        return chunk_gla(q=q, k=k, v=v, g=g, scale=scale, initial_state=initial_state,
                         output_final_state=output_final_state, state_v_first=state_v_first, cu_seqlens=cu_seqlens)
    return reference_gla(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, state_v_first)


@functools.cache  # asked on every mixer forward: the answer is fixed for the process
def simple_gla_backward_is_refused() -> bool:
    """fla 0.6 refuses the backward of gated chunk kernels (chunk_bwd_dqkwg) on Hopper with Triton
    >= 3.4 and < 3.7.1 (fla issue #640: wrong results), unless tilelang provides another backend."""
    import importlib.util

    from fla.utils import IS_NVIDIA_HOPPER, TRITON_ABOVE_3_4_0, TRITON_ABOVE_3_7_1
    return bool(IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0 and not TRITON_ABOVE_3_7_1
                and importlib.util.find_spec("tilelang") is None)


def simple_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
               state_v_first=False):
    """fla's chunked simple-GLA kernel on CUDA, the reference elsewhere. Returns (o, final_state or None).

    Where fla refuses simple GLA's backward (Hopper + Triton 3.4-3.7.0, see
    simple_gla_backward_is_refused), the same recurrence runs through the GLA kernel with the scalar
    decay repeated over the key channels: identical math, a slightly slower kernel."""
    if uses_kernels(q) and torch.is_grad_enabled() and simple_gla_backward_is_refused():
        gk = g[..., None].expand(*g.shape, q.shape[-1]).contiguous()
        return gla(q, k, v, gk, scale, initial_state, output_final_state, cu_seqlens, state_v_first)
    if uses_kernels(q):
        _load_kernels()
        from fla.ops.simple_gla import chunk_simple_gla
        return chunk_simple_gla(q=q, k=k, v=v, g=g, scale=scale, initial_state=initial_state,
                                output_final_state=output_final_state, state_v_first=state_v_first,
                                cu_seqlens=cu_seqlens)
    return reference_simple_gla(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, state_v_first)

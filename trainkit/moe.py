"""MoE router statistics through forward hooks, accumulated on the device.

``RouterStats(model)`` hooks, in every MoE layer, the fused experts module (class name
ending with ``Experts``; its forward receives ``top_k_index``) and its sibling router
(``gate`` / ``router``; its output, or first output, is the router logits). Each forward
adds the per-expert assignment counts and the sum of per-token router entropies to
tensors on the model's device: no host sync per forward. Only training forwards count:
forwards in eval mode (evaluations, generation) are left out, and recomputed forwards under
gradient checkpointing (which run inside backward) are not counted twice.

Across processes the trainer sums ``counts_tensor()`` (``accelerator.reduce(..., "sum")``)
and hands the result back with ``load_counts()`` before ``snapshot()``, whose dict has
exactly the EXPERT_FIELDS shape of trainkit/runlog.py (without step/time). The counts
pending since the last snapshot are saved with each checkpoint (``pending_counts`` /
``restore_pending_counts``), so a resumed run writes the snapshots an uninterrupted one does.
Snapshot fields:
num_experts, top_k, tokens_routed (token-expert assignments in the window, summed over
layers), mean_load_imbalance, total_dead_experts, layers: [{layer, tokens_per_expert,
load_imbalance (max/mean tokens per expert), router_entropy (mean per-token entropy of the
router distribution, nats), dead_experts (experts that got no token)}].

The router aux loss itself comes from the model output (``outputs.aux_loss``, present
when the config has ``output_router_logits=True``, which trainkit.models sets).
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from trainkit.quantization import iter_expert_modules

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")
_TOPK_KEYS = ("num_experts_per_tok", "top_k", "moe_topk")


def _in_backward() -> bool:
    """True inside autograd's backward (e.g. a checkpointed layer being recomputed)."""
    fn = getattr(torch._C, "_current_graph_task_id", None)
    return fn is not None and fn() != -1


def _find_router(parent: nn.Module, experts: nn.Module) -> nn.Module | None:
    for name in ("gate", "router"):
        m = getattr(parent, name, None)
        if isinstance(m, nn.Module) and m is not experts:
            return m
    return None


class RouterStats:
    def __init__(self, model: nn.Module):
        self.layers: list[dict] = []
        self._handles = []
        names = dict(model.named_modules())
        found = list(iter_expert_modules(model))
        if not found:
            raise ValueError("RouterStats: the model has no fused MoE experts module")
        self.num_experts = int(getattr(found[0][1], "num_experts", 0)) or self._bank_size(found[0][1])
        self.top_k = 0
        for pos, (name, experts) in enumerate(found):
            m = _LAYER_RE.search(name + ".")
            layer = int(m.group(1)) if m else pos
            # expert LoRA wraps the experts module in PEFT ParamWrappers (`experts.base_layer.base_layer`):
            # the router is a sibling of the outermost wrapper
            place = name.replace(".base_layer", "")
            parent = names.get(place.rsplit(".", 1)[0]) if "." in place else None
            router = _find_router(parent, experts) if parent is not None else None
            if router is not None and not self.top_k:
                self.top_k = int(getattr(router, "top_k", 0) or 0)
            self.layers.append({"layer": layer, "index": pos})
            self._handles.append(experts.register_forward_pre_hook(self._experts_hook(pos), with_kwargs=True))
            if router is not None:
                sigmoid = hasattr(router, "e_score_correction_bias")
                self._handles.append(router.register_forward_hook(self._router_hook(pos, sigmoid)))
        if not self.top_k:
            cfg = getattr(model, "config", None)
            cfg = getattr(cfg, "get_text_config", lambda: cfg)() if cfg is not None else None
            self.top_k = next((int(getattr(cfg, k)) for k in _TOPK_KEYS if isinstance(getattr(cfg, k, None), int)), 0)
        self._counts = None      # (L, E) int64 on device
        self._entropy = None     # (L, 2) float64: [sum of entropies, tokens]
        self._device = None

    @staticmethod
    def _bank_size(experts: nn.Module) -> int:
        for p in experts.parameters(recurse=False):
            if p.dim() == 3:
                return p.shape[0]
        for c in experts.children():
            if hasattr(c, "shape"):
                return c.shape[0]
        return 0

    # --- accumulation -------------------------------------------------------------------
    def _ensure(self, device):
        if self._counts is None:
            self._device = device
            self._counts = torch.zeros(len(self.layers), self.num_experts, dtype=torch.int64, device=device)
            self._entropy = torch.zeros(len(self.layers), 2, dtype=torch.float64, device=device)

    def _experts_hook(self, pos):
        def hook(module, args, kwargs):
            if not module.training or _in_backward():
                return None
            idx = kwargs.get("top_k_index") if "top_k_index" in kwargs else (args[1] if len(args) > 1 else None)
            if idx is None:
                return None
            idx = idx.detach().reshape(-1)
            self._ensure(idx.device)
            idx = idx.to(self._counts.device)
            valid = idx < self.num_experts          # expert-parallel sentinels are >= num_experts
            ones = valid.to(torch.int64)
            self._counts[pos].scatter_add_(0, idx.clamp(max=self.num_experts - 1), ones)
            return None
        return hook

    def _router_hook(self, pos, sigmoid: bool):
        def hook(module, args, output):
            if not module.training or _in_backward():
                return None
            logits = output[0] if isinstance(output, (tuple, list)) else output
            if not isinstance(logits, torch.Tensor) or logits.shape[-1] != self.num_experts:
                return None
            with torch.no_grad():
                logits = logits.detach().float().reshape(-1, self.num_experts)
                if sigmoid:
                    p = logits.sigmoid()
                    p = p / p.sum(-1, keepdim=True).clamp_min(1e-20)
                    ent = -(p * p.clamp_min(1e-20).log()).sum(-1)
                else:
                    logp = torch.log_softmax(logits, dim=-1)
                    ent = -(logp.exp() * logp).sum(-1)
                self._ensure(logits.device)
                self._entropy[pos, 0] += ent.sum().to(torch.float64).to(self._entropy.device)
                self._entropy[pos, 1] += ent.numel()
            return None
        return hook

    # --- cross-process reduction --------------------------------------------------------
    def counts_tensor(self, device=None) -> torch.Tensor:
        """(L, E + 2) float64: per-expert counts, entropy sum, entropy tokens (sum-reducible)."""
        if self._counts is None:
            dev = device or self._device or "cpu"
            return torch.zeros(len(self.layers), self.num_experts + 2, dtype=torch.float64, device=dev)
        return torch.cat([self._counts.to(torch.float64), self._entropy], dim=1)

    def load_counts(self, tensor: torch.Tensor) -> None:
        """Replace the accumulators by `tensor` (e.g. the sum over processes of counts_tensor())."""
        tensor = tensor.detach()
        self._ensure(tensor.device)
        self._counts.copy_(tensor[:, : self.num_experts].round().to(torch.int64).to(self._counts.device))
        self._entropy.copy_(tensor[:, self.num_experts:].to(self._entropy.device))

    # --- checkpoint / resume -------------------------------------------------------------
    def pending_counts(self, reduce, device=None) -> list[list[float]]:
        """Counts since the last snapshot, summed over processes by `reduce` (e.g.
        ``lambda t: accelerator.reduce(t, "sum")``; every process must call it), as JSON lists."""
        return reduce(self.counts_tensor(device)).cpu().tolist()

    def restore_pending_counts(self, counts: list[list[float]] | None, device, is_main: bool) -> None:
        """Put the pending counts of a checkpoint back: on the main process only, since the next
        snapshot sums over processes."""
        if counts and is_main:
            self.load_counts(torch.tensor(counts, dtype=torch.float64, device=device))

    def reset(self) -> None:
        if self._counts is not None:
            self._counts.zero_()
            self._entropy.zero_()

    # --- reporting ----------------------------------------------------------------------
    def snapshot(self, reset: bool = True) -> dict:
        counts = self.counts_tensor().cpu()   # the one host sync
        layers = []
        for spec, row in zip(self.layers, counts):
            per_expert = [int(v) for v in row[: self.num_experts].tolist()]
            total = sum(per_expert)
            mean = total / self.num_experts if self.num_experts else 0.0
            ent_sum, ent_tokens = float(row[self.num_experts]), float(row[self.num_experts + 1])
            layers.append({
                "layer": spec["layer"],
                "tokens_per_expert": per_expert,
                "load_imbalance": (max(per_expert) / mean) if mean > 0 else None,
                "router_entropy": (ent_sum / ent_tokens) if ent_tokens > 0 else None,
                "dead_experts": sum(1 for v in per_expert if v == 0),
            })
        imbalances = [l["load_imbalance"] for l in layers if l["load_imbalance"] is not None]
        out = {
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "tokens_routed": sum(sum(l["tokens_per_expert"]) for l in layers),
            "mean_load_imbalance": (sum(imbalances) / len(imbalances)) if imbalances else None,
            "total_dead_experts": sum(l["dead_experts"] for l in layers),
            "layers": layers,
        }
        if reset:
            self.reset()
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @staticmethod
    def max_entropy(num_experts: int) -> float:
        return math.log(num_experts) if num_experts > 0 else 0.0

"""Optimizer (AdamW) and learning-rate schedules (transformers' implementations), chosen by `optimization.*`."""

from __future__ import annotations

import torch
from transformers.optimization import (
    get_constant_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup,
    get_linear_schedule_with_warmup,
    get_polynomial_decay_schedule_with_warmup,
    get_wsd_schedule,
)

SCHEDULES = ("cosine", "linear", "constant", "polynomial", "wsd")


def warmup_steps(opt, total_steps: int) -> int:
    if opt.warmup_steps:
        return min(int(opt.warmup_steps), total_steps)
    return int(round(opt.warmup_ratio * total_steps))


def build_scheduler(optimizer: torch.optim.Optimizer, opt, total_steps: int):
    """LambdaLR for `opt.lr_scheduler`, stepped once per optimizer step."""
    name = opt.lr_scheduler
    warmup = warmup_steps(opt, total_steps)
    min_ratio = opt.min_lr_ratio
    if name == "cosine":
        return get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup, total_steps, min_lr_rate=min_ratio)
    if name == "linear":
        return get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
    if name == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup)
    if name == "polynomial":
        peak = optimizer.defaults["lr"]
        return get_polynomial_decay_schedule_with_warmup(optimizer, warmup, total_steps, lr_end=peak * min_ratio)
    if name == "wsd":
        decay = max(1, int(round(opt.decay_ratio * total_steps)))
        return get_wsd_schedule(optimizer, warmup, decay, num_training_steps=total_steps, min_lr_ratio=min_ratio)
    raise ValueError(f"unknown lr_scheduler {name!r} (one of {', '.join(SCHEDULES)})")


def build_staged_scheduler(optimizer: torch.optim.Optimizer, opt, stages: list[tuple[int, float]]):
    """One LambdaLR over consecutive stages (distill.py: pre-training text, then instruction data).

    stages: (steps, peak lr as a multiple of the optimizer's lr). Each stage runs its own
    `opt.lr_scheduler` shape (warmup_ratio, decay_ratio, min_lr_ratio apply per stage). Built
    from transformers' schedules so the shapes are theirs, then stitched by step offset.
    """
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    shapes = []
    for steps, scale in stages:
        lr_lambda = build_scheduler(probe, opt.model_copy(update={"warmup_steps": 0}), steps).lr_lambdas[0]
        shapes.append((steps, scale, lr_lambda))

    def staged(step: int) -> float:
        for steps, scale, lr_lambda in shapes:
            if step < steps:
                return scale * lr_lambda(step)
            step -= steps
        steps, scale, lr_lambda = shapes[-1]
        return scale * lr_lambda(steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, staged)


def build_optimizer(params, opt, device: torch.device) -> torch.optim.AdamW:
    """AdamW with the optimization.* hyperparameters (fused kernels on CUDA). `params`: tensors,
    or parameter groups that set their own weight_decay (weight_decay_groups)."""
    return torch.optim.AdamW(params, lr=opt.learning_rate, betas=(opt.adam_beta1, opt.adam_beta2),
                             eps=opt.adam_epsilon, weight_decay=opt.weight_decay, fused=device.type == "cuda")


def weight_decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices, none on norms, biases, embeddings and scalar/vector parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

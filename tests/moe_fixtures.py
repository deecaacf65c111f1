"""Tiny MoE / dense configs and a loader shared by test_models.py and test_moe.py."""

from __future__ import annotations

import copy

import torch

from trainkit.config import validate
from trainkit.config.qlora import QLoRAConfig
from trainkit.models import load_model

TINY = {
    "mixtral": {"model_type": "mixtral", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4,
                "num_experts_per_tok": 2, "max_position_embeddings": 128},
    "qwen3_moe": {"model_type": "qwen3_moe", "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 64,
                  "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                  "num_experts": 4, "num_experts_per_tok": 2, "max_position_embeddings": 128},
    "glm4_moe": {"model_type": "glm4_moe", "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 64,
                 "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                 "n_routed_experts": 4, "n_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 1,
                 "topk_group": 1, "first_k_dense_replace": 1, "max_position_embeddings": 128},
    "llama": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128},
}
VOCAB = 256


class ByteTok:
    """Just what load_model needs from a tokenizer."""
    pad_token_id = 0
    eos_token_id = 1
    bos_token_id = None

    def __len__(self):
        return VOCAB


def make_cfg(family: str, *, load_in_4bit=True, quantize_experts=True, seed=11,
             attn="sdpa", compute_dtype="bfloat16") -> QLoRAConfig:
    return validate({
        "paths": {"model_name_or_path": None, "cache_dir": None},
        "model": {"config": copy.deepcopy(TINY[family]), "attn_implementation": attn,
                  "trust_remote_code": False, "local_files_only": True},
        "training": {"seed": seed},
        "quantization": {"load_in_4bit": load_in_4bit, "quant_type": "nf4", "double_quant": True,
                         "compute_dtype": compute_dtype, "quantize_moe_experts": quantize_experts},
    }, QLoRAConfig)


def load(family: str, device="cpu", **kw):
    return load_quantized(make_cfg(family, **kw), device)


def load_quantized(cfg: QLoRAConfig, device="cpu"):
    """load_model as train_qlora.py calls it: the quantization section and its compute dtype."""
    return load_model(cfg, device, ByteTok(), cfg.quantization.compute_dtype, cfg.quantization)


def batch(seed=0, b=2, t=24, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (b, t), generator=g).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def loss_and_grads(model, inputs):
    """Train-mode loss and the gradient of every trainable tensor, by name."""
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def force_experts_0_1(model) -> list:
    """Forward hooks on every router that send each token to experts 0 and 1; returns the handles."""
    handles = []
    for name, mod in model.named_modules():
        if name.endswith("mlp.gate") and type(mod).__name__.lower().endswith("router"):
            def force(m, args, out):
                logits, weights, idx = out
                idx = torch.zeros_like(idx)
                idx[:, 1] = 1
                return logits, weights, idx
            handles.append(mod.register_forward_hook(force))
    assert handles
    return handles

"""Linear-attention students of Llama teachers (Llamba / MOHAWK style): the teacher's architecture with
its softmax-attention mixers replaced by linear-attention mixers, initialised from the teacher.

References: Llamba, "Scaling Distilled Recurrent Models for Efficient Language Processing"
(Bick et al., arXiv 2502.14458); MOHAWK, "Transformers to SSMs: Distilling Quadratic Knowledge to
Subquadratic Models" (Bick et al., arXiv 2408.10189); GLA, "Gated Linear Attention Transformers with
Hardware-Efficient Training" (Yang et al., arXiv 2312.06635) as implemented in flash-linear-attention.

    import trainkit.students  # registers model_type "trainkit_linear_llama" with the Auto classes
    student, report = build_student(teacher, mixer="discrete_mamba2", attention_layers=[])
    freeze(student, freeze_mlp=False, freeze_replaced_layers=False, attention_layers=[])
    student.save_pretrained(d); AutoModelForCausalLM.from_pretrained(d)   # same logits

The mixers are training-time modules: they ignore the KV cache (no recurrent-state cache), attention
masks and position ids. Feed packed windows without padding, use_cache=False (the config default).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers import initialization as hf_init

from trainkit.config import is_secret_name
from trainkit.linear_attention import gla, simple_gla

__all__ = ["DiscreteMamba2Mixer", "GLAMixer", "LinearLlamaConfig", "LinearLlamaForCausalLM", "MIXERS",
           "build_student", "freeze", "MIXER_DEFAULTS"]

# Mixer hyperparameters: LinearLlamaConfig fields (and build_student's **mixer_kwargs), with defaults.
MIXER_DEFAULTS = {
    # Discrete Mamba-2
    "dm2_use_gate": True,          # y <- y * silu(z_proj(h) + z_bias); z_proj starts at 0 and silu(z_bias) = 1
    "dm2_use_norm": False,         # per-head RMSNorm of y before the gate
    "dm2_use_d": True,             # D skip: y <- y + D * x
    "dm2_d_init": 1.0,
    "dm2_a_init": 1.0,             # A = exp(A_log) at init (one per head)
    "dm2_dt_min": 0.001,           # dt = softplus(dt_bias) at init is log-uniform in [dt_min, dt_max] (Mamba-2)
    "dm2_dt_max": 0.1,
    "dm2_dt_init_floor": 1e-4,
    # GLA (fla.layers.GatedLinearAttention)
    "gla_expand_k": 1.0,           # key dim = expand_k * hidden (1.0: the teacher's q/k shapes, so they transfer)
    "gla_expand_v": 1.0,           # value dim = expand_v * hidden
    "gla_gate_low_rank_dim": 16,
    "gla_gate_logit_normalizer": 16.0,
    "gla_use_output_gate": True,
}
MIXERS = ("discrete_mamba2", "gla")


class LinearLlamaConfig(LlamaConfig):
    """LlamaConfig plus `mixer`, `attention_layers` (indices that keep softmax attention) and MIXER_DEFAULTS."""

    model_type = "trainkit_linear_llama"

    def __init__(self, mixer: str = "discrete_mamba2", attention_layers=(), use_cache: bool = False, **kwargs):
        if mixer not in MIXERS:
            raise ValueError(f"mixer must be one of {MIXERS}, got {mixer!r}")
        for key, default in MIXER_DEFAULTS.items():
            setattr(self, key, kwargs.pop(key, default))
        self.mixer = mixer
        self.attention_layers = sorted({int(i) for i in attention_layers})
        super().__init__(use_cache=use_cache, **kwargs)
        bad = [i for i in self.attention_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(f"attention_layers {bad} out of range for {self.num_hidden_layers} layers")


def _heads(config):
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, head_dim


def _rms(x, eps):
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps).to(x.dtype)


class DiscreteMamba2Mixer(nn.Module):
    """Llamba's Discrete Mamba-2 mixer in its simple-GLA form (Llamba arXiv 2502.14458, MOHAWK arXiv 2408.10189).

    With H = num_attention_heads heads of size P = head_dim, for input u_t (hidden):

        x_t = x_proj(u_t), B_t = B_proj(u_t), C_t = C_proj(u_t)        (H, P) each: v, k, q of linear attention
        dt_t = softplus(dt_proj(u_t) + dt_bias)                          (H,)   one step size per head and token
        g_t  = -exp(A_log) * dt_t                                        (H,)   log-decay, A_t = exp(g_t) in (0, 1)
        S_t  = A_t S_{t-1} + B_t x_t^T                                   (H, P, P) state
        y_t  = P^-1/2 C_t^T S_t  (+ D * x_t)                             simple_gla(q=C, k=B, v=x, g) + D skip
        y_t  = RMSNorm_head(y_t) (optional) * silu(z_proj(u_t) + z_bias) (optional gate)
        out  = out_proj(y_t)

    i.e. the scalar-decay SSM (a = exp(-exp(A_log) dt)) materialised as masked linear attention, which is
    how MOHAWK aligns it with the teacher's attention matrix. Differences to the paper's mixer: no short
    convolution and no activation on x/B/C, so that the teacher's q/k/v/o projections transfer exactly
    (C <- q_proj, B <- k_proj, x <- v_proj, each kv head repeated over its query group, out_proj <- o_proj);
    RoPE is dropped. Run by trainkit.linear_attention.simple_gla (fla chunk kernel on CUDA, fp32 reference
    recurrence elsewhere).
    """

    def __init__(self, config: LinearLlamaConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.num_heads, self.head_dim = _heads(config)
        d, inner, bias = config.hidden_size, self.num_heads * self.head_dim, config.attention_bias
        self.C_proj = nn.Linear(d, inner, bias=bias)   # q
        self.B_proj = nn.Linear(d, inner, bias=bias)   # k
        self.x_proj = nn.Linear(d, inner, bias=bias)   # v
        self.dt_proj = nn.Linear(d, self.num_heads, bias=False)
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_heads))
        self.D = nn.Parameter(torch.empty(self.num_heads)) if config.dm2_use_d else None
        if config.dm2_use_gate:
            self.z_proj = nn.Linear(d, inner, bias=False)
            self.z_proj._trainkit_init = "zeros"
            self.z_bias = nn.Parameter(torch.empty(inner))
        else:
            self.z_proj = self.z_bias = None
        self.norm_weight = nn.Parameter(torch.ones(self.head_dim)) if config.dm2_use_norm else None
        self.out_proj = nn.Linear(inner, d, bias=bias)
        self.reset_mixer_parameters()

    @torch.no_grad()
    def reset_mixer_parameters(self):
        """Mamba-2 style init of dt_bias, A_log, D, gate (through transformers' init functions, which skip
        tensors already loaded by from_pretrained)."""
        c = self.config
        device = self.A_log.device
        if device.type == "meta":
            return
        dt = torch.exp(torch.rand(self.num_heads, device=device) * (math.log(c.dm2_dt_max) - math.log(c.dm2_dt_min))
                       + math.log(c.dm2_dt_min)).clamp(min=c.dm2_dt_init_floor)
        hf_init.copy_(self.dt_bias, dt + torch.log(-torch.expm1(-dt)))          # inverse softplus
        hf_init.constant_(self.A_log, math.log(c.dm2_a_init))
        if self.D is not None:
            hf_init.constant_(self.D, c.dm2_d_init)
        if self.z_proj is not None:
            hf_init.zeros_(self.z_proj.weight)
            hf_init.constant_(self.z_bias, 1.2784645427610738)                  # silu(z_bias) = 1
        if self.norm_weight is not None:
            hf_init.ones_(self.norm_weight)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                position_embeddings=None, **kwargs):
        batch, length, _ = hidden_states.shape
        shape = (batch, length, self.num_heads, self.head_dim)
        x = self.x_proj(hidden_states).view(shape)
        k = self.B_proj(hidden_states).view(shape)
        q = self.C_proj(hidden_states).view(shape)
        dt = F.softplus(self.dt_proj(hidden_states).float() + self.dt_bias.float())
        g = -torch.exp(self.A_log.float()) * dt                                  # (B, T, H) log-decay, fp32
        y, _ = simple_gla(q, k, x, g, scale=self.head_dim ** -0.5)
        if self.D is not None:
            y = y + x * self.D.to(x.dtype)[:, None]
        if self.norm_weight is not None:
            y = _rms(y, self.config.rms_norm_eps) * self.norm_weight.to(y.dtype)
        y = y.reshape(batch, length, -1)
        if self.z_proj is not None:
            y = y * F.silu(self.z_proj(hidden_states) + self.z_bias.to(y.dtype))
        return self.out_proj(y), None

    def transfer_from_attention(self, attn) -> list[str]:
        """C <- q_proj, B <- k_proj, x <- v_proj (GQA kv heads repeated), out_proj <- o_proj."""
        return _transfer(self, attn, {"C_proj": "q_proj", "B_proj": "k_proj", "x_proj": "v_proj", "out_proj": "o_proj"})


class GLAMixer(nn.Module):
    """Gated Linear Attention, the math of fla.layers.GatedLinearAttention (arXiv 2312.06635):

        q, k = q_proj(u), k_proj(u)           (H, K/H)         K = expand_k * hidden
        v    = v_proj(u)                       (H, V/H)         V = expand_v * hidden
        gk   = logsigmoid(W2 W1 u + b2) / gate_logit_normalizer     (H, K/H) per-channel log-decay (low rank W1)
        o    = gla(q, k, v, gk, scale=(K/H)^-1/2)                   S_t = diag(exp(gk_t)) S_{t-1} + k_t v_t^T
        o    = RMSNorm_head(o) * silu(g_proj(u))                     (output gate; plain RMSNorm without it)
        out  = o_proj(o)

    H = num_attention_heads; with expand_k = expand_v = 1 the teacher's q/k/v/o projections transfer
    (kv heads repeated over their query groups). No feature map, no short convolution, no RoPE.
    Run by trainkit.linear_attention.gla (fla chunk kernel on CUDA, reference recurrence elsewhere).
    """

    def __init__(self, config: LinearLlamaConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.key_dim, self.value_dim = int(d * config.gla_expand_k), int(d * config.gla_expand_v)
        if self.key_dim % self.num_heads or self.value_dim % self.num_heads:
            raise ValueError(f"GLA key dim {self.key_dim} / value dim {self.value_dim} not divisible by {self.num_heads} heads")
        self.head_k_dim, self.head_v_dim = self.key_dim // self.num_heads, self.value_dim // self.num_heads
        bias = config.attention_bias
        self.q_proj = nn.Linear(d, self.key_dim, bias=bias)
        self.k_proj = nn.Linear(d, self.key_dim, bias=bias)
        self.v_proj = nn.Linear(d, self.value_dim, bias=bias)
        rank = config.gla_gate_low_rank_dim
        self.gk_proj = nn.Sequential(nn.Linear(d, rank, bias=False), nn.Linear(rank, self.key_dim, bias=True))
        self.g_proj = nn.Linear(d, self.value_dim, bias=False) if config.gla_use_output_gate else None
        for lin in (*self.gk_proj, self.g_proj):
            if lin is not None:
                lin._trainkit_init = "xavier_small"
        self.g_norm_weight = nn.Parameter(torch.ones(self.head_v_dim))
        self.o_proj = nn.Linear(self.value_dim, d, bias=bias)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                position_embeddings=None, **kwargs):
        batch, length, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(batch, length, self.num_heads, self.head_k_dim)
        k = self.k_proj(hidden_states).view(batch, length, self.num_heads, self.head_k_dim)
        v = self.v_proj(hidden_states).view(batch, length, self.num_heads, self.head_v_dim)
        gk = F.logsigmoid(self.gk_proj(hidden_states).float()) / self.config.gla_gate_logit_normalizer
        gk = gk.view(batch, length, self.num_heads, self.head_k_dim)
        o, _ = gla(q, k, v, gk, scale=self.head_k_dim ** -0.5)
        o = _rms(o, self.config.rms_norm_eps) * self.g_norm_weight.to(o.dtype)
        o = o.reshape(batch, length, self.value_dim)
        if self.g_proj is not None:
            o = o * F.silu(self.g_proj(hidden_states))
        return self.o_proj(o), None

    def transfer_from_attention(self, attn) -> list[str]:
        """q/k/v/o projections from the teacher's attention where shapes allow (expand_k = expand_v = 1)."""
        return _transfer(self, attn, {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "o_proj": "o_proj"})


def _repeat_kv_rows(weight, n_kv, n_heads):
    """(n_kv * P, ...) -> (n_heads * P, ...): kv head j serves query heads j*g .. j*g+g-1 (HF repeat_kv order)."""
    if n_kv == n_heads:
        return weight
    groups = n_heads // n_kv
    rest = weight.shape[1:]
    return weight.reshape(n_kv, 1, -1, *rest).expand(n_kv, groups, -1, *rest).reshape(-1, *rest)


@torch.no_grad()
def _transfer(mixer, attn, mapping) -> list[str]:
    cfg = attn.config
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    copied = []
    for dst_name, src_name in mapping.items():
        dst, src = getattr(mixer, dst_name), getattr(attn, src_name, None)
        if src is None:
            continue
        w, b = src.weight, src.bias
        if src_name in ("k_proj", "v_proj"):
            w = _repeat_kv_rows(w, n_kv, n_heads)
            b = _repeat_kv_rows(b, n_kv, n_heads) if b is not None else None
        if w.shape != dst.weight.shape:
            continue
        dst.weight.copy_(w)
        copied.append(f"{dst_name}.weight<-{src_name}.weight")
        if dst.bias is not None and b is not None and b.shape == dst.bias.shape:
            dst.bias.copy_(b)
            copied.append(f"{dst_name}.bias<-{src_name}.bias")
    return copied


MIXER_CLASSES = {"discrete_mamba2": DiscreteMamba2Mixer, "gla": GLAMixer}


class LinearLlamaForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM whose layers not in config.attention_layers use config.mixer instead of self_attn."""

    config_class = LinearLlamaConfig
    _supports_flash_attn = True
    _supports_sdpa = True

    def __init__(self, config: LinearLlamaConfig):
        super().__init__(config)
        mixer_class = MIXER_CLASSES[config.mixer]
        for index, layer in enumerate(self.model.layers):
            if index not in config.attention_layers:
                layer.self_attn = mixer_class(config, index)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        special = getattr(module, "_trainkit_init", None)  # set on mixer sub-layers that need their own init
        if special == "zeros":
            hf_init.zeros_(module.weight)
            return
        if special == "xavier_small":  # fla's GLA init: xavier uniform with gain 2^-2.5, zero bias
            hf_init.xavier_uniform_(module.weight, gain=2 ** -2.5)
            if module.bias is not None:
                hf_init.zeros_(module.bias)
            return
        super()._init_weights(module)
        if isinstance(module, DiscreteMamba2Mixer):
            module.reset_mixer_parameters()
        elif isinstance(module, GLAMixer):
            hf_init.ones_(module.g_norm_weight)

    def mixer_layers(self) -> list[int]:
        return [i for i in range(self.config.num_hidden_layers) if i not in self.config.attention_layers]


AutoConfig.register(LinearLlamaConfig.model_type, LinearLlamaConfig, exist_ok=True)
AutoModelForCausalLM.register(LinearLlamaConfig, LinearLlamaForCausalLM, exist_ok=True)

_NOT_COPIED_CONFIG = {"model_type", "architectures", "transformers_version", "auto_map", "_name_or_path", "dtype",
                      "torch_dtype", "mixer", "attention_layers", "use_cache", *MIXER_DEFAULTS}


def student_config(teacher_config, mixer="discrete_mamba2", attention_layers=(), **mixer_kwargs) -> LinearLlamaConfig:
    """LinearLlamaConfig with the teacher's (Llama) shape and the given mixer settings."""
    unknown = sorted(set(mixer_kwargs) - set(MIXER_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown mixer options {unknown}; known: {sorted(MIXER_DEFAULTS)}")
    # Secret-named keys (an api_token given in model.config) stay with the teacher: the student's
    # config.json is written into every checkpoint.
    fields = {k: v for k, v in teacher_config.to_dict().items() if k not in _NOT_COPIED_CONFIG and not is_secret_name(k)}
    config = LinearLlamaConfig(mixer=mixer, attention_layers=list(attention_layers), **fields, **mixer_kwargs)
    config._attn_implementation = getattr(teacher_config, "_attn_implementation", None) or "sdpa"
    return config


@torch.no_grad()
def build_student(teacher, mixer: str = "discrete_mamba2", attention_layers=(), init_from_teacher: bool = True,
                  dtype: torch.dtype | None = None, device=None, **mixer_kwargs):
    """A LinearLlamaForCausalLM shaped like `teacher` (a Llama-architecture causal LM), and a report.

    init_from_teacher copies embed_tokens, each layer's input/post-attention norms and MLP, the final
    norm and lm_head one to one; each mixer's q/k/v/o-like projections from the layer's attention
    (DiscreteMamba2: C<-q, B<-k, x<-v, out<-o; GLA: q,k,v,o when expand_k = expand_v = 1; kv heads
    repeated for GQA); layers in attention_layers get copies of the teacher's attention. Everything else
    (decay/gate parameters) is freshly initialised. Built in `dtype` (default float32) on `device`
    (default: the teacher's device). Returns (student, report) with report keys copied, initialised,
    attention_layers, mixer_layers, mixer, summary.
    """
    t_model = getattr(teacher, "model", None)
    if t_model is None or not hasattr(t_model, "layers"):
        raise ValueError(f"{type(teacher).__name__}: expected a Llama-style causal LM with .model.layers")
    config = student_config(teacher.config, mixer=mixer, attention_layers=attention_layers, **mixer_kwargs)
    if device is None:
        device = next(teacher.parameters()).device
    dtype = dtype or torch.float32
    with torch.device(device):
        student = LinearLlamaForCausalLM(config)
    student.to(dtype)
    student.train()
    copied, initialised = [], []
    if init_from_teacher:
        t_state = teacher.state_dict()
        for name, tensor in student.state_dict().items():
            is_mixer = any(f"layers.{i}.self_attn." in name for i in student.mixer_layers())
            if not is_mixer and name in t_state and t_state[name].shape == tensor.shape:
                tensor.copy_(t_state[name])
                copied.append(name)
        for i in student.mixer_layers():
            for item in student.model.layers[i].self_attn.transfer_from_attention(t_model.layers[i].self_attn):
                dst, src = item.split("<-")
                copied.append(f"model.layers.{i}.self_attn.{dst} <- model.layers.{i}.self_attn.{src}")
    done = {c.split(" <- ")[0] for c in copied}
    initialised = [n for n, _ in student.named_parameters() if n not in done]
    if config.tie_word_embeddings:
        initialised = [n for n in initialised if n != "lm_head.weight"]
    summary = (f"{len(student.mixer_layers())} {mixer} mixer layers, {len(config.attention_layers)} attention layers; "
               f"{len(done)} tensors copied from the teacher, {len(initialised)} freshly initialised")
    report = {"mixer": mixer, "attention_layers": list(config.attention_layers), "mixer_layers": student.mixer_layers(),
              "copied": copied, "initialised": initialised, "summary": summary}
    return student, report


def freeze(student, freeze_mlp: bool = False, freeze_replaced_layers: bool = False, attention_layers=None) -> int:
    """Set requires_grad on every parameter: False for every MLP (freeze_mlp) and for the attention kept
    from the teacher in `attention_layers` (freeze_replaced_layers; default: the config's), True for
    everything else. Returns the number of trainable parameters."""
    layers = student.config.attention_layers if attention_layers is None else list(attention_layers)
    frozen_prefixes = []
    for i in range(student.config.num_hidden_layers):
        if freeze_mlp:
            frozen_prefixes.append(f"model.layers.{i}.mlp.")
        if freeze_replaced_layers and i in layers:
            frozen_prefixes.append(f"model.layers.{i}.self_attn.")
    trainable = 0
    for name, p in student.named_parameters():
        p.requires_grad_(not any(name.startswith(prefix) for prefix in frozen_prefixes))
        trainable += p.numel() if p.requires_grad else 0
    return trainable

"""trainkit.students on CPU: tiny Llama teacher, linear-attention students, transfer, freezing, save/load."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from trainkit.kd import chunked_kd_loss
from trainkit.students import (MIXERS, DiscreteMamba2Mixer, GLAMixer, LinearLlamaConfig, LinearLlamaForCausalLM,
                               build_student, freeze)

VOCAB = 261


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    return model


def ids(batch=2, length=70, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mixer", MIXERS)
@pytest.mark.parametrize("length", [1, 37, 70])
def test_mixer_forward_backward_finite(teacher, mixer, length):
    student, _ = build_student(teacher, mixer=mixer)
    layer = student.model.layers[0].self_attn
    assert isinstance(layer, DiscreteMamba2Mixer if mixer == "discrete_mamba2" else GLAMixer)
    x = torch.randn(2, length, 64, requires_grad=True)
    out, weights = layer(hidden_states=x, attention_mask=None, position_ids=None, past_key_values=None,
                         use_cache=False, position_embeddings=None)
    assert weights is None and out.shape == x.shape and torch.isfinite(out).all()
    out.square().mean().backward()
    assert torch.isfinite(x.grad).all()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # whole model: forward, backward with use_cache=False and default kwargs
    logits = student(input_ids=ids(length=length), use_cache=False).logits
    assert logits.shape == (2, length, VOCAB) and torch.isfinite(logits).all()
    logits.float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)


def test_mixer_is_causal(teacher):
    for mixer in MIXERS:
        student, _ = build_student(teacher, mixer=mixer)
        x = ids(1, 40)
        y = x.clone()
        y[0, 30:] = (y[0, 30:] + 1) % VOCAB
        with torch.no_grad():
            a, b = student(input_ids=x).logits, student(input_ids=y).logits
        torch.testing.assert_close(a[:, :30], b[:, :30])
        assert not torch.allclose(a[:, 30:], b[:, 30:])


def test_discrete_mamba2_matches_formula(teacher):
    """The docstring's recurrence written out by hand."""
    student, _ = build_student(teacher, mixer="discrete_mamba2", dm2_use_norm=True)
    m = student.model.layers[2].self_attn
    torch.nn.init.normal_(m.z_proj.weight, std=0.1)
    u = torch.randn(1, 9, 64)
    H, P = m.num_heads, m.head_dim
    x, B, C = (proj(u).view(9, H, P) for proj in (m.x_proj, m.B_proj, m.C_proj))
    a = torch.exp(-torch.exp(m.A_log) * torch.nn.functional.softplus(m.dt_proj(u)[0] + m.dt_bias))  # (T, H)
    S = torch.zeros(H, P, P)
    ys = []
    for t in range(9):
        S = a[t][:, None, None] * S + B[t][:, :, None] * x[t][:, None, :]
        ys.append((C[t][:, :, None] * S).sum(1) * P ** -0.5 + m.D[:, None] * x[t])
    y = torch.stack(ys)
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + student.config.rms_norm_eps) * m.norm_weight
    y = y.reshape(9, H * P) * torch.nn.functional.silu(m.z_proj(u)[0] + m.z_bias)
    expected = m.out_proj(y)
    got, _ = m(u)
    torch.testing.assert_close(got[0], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mixer", MIXERS)
def test_weight_transfer_is_exact(teacher, mixer):
    student, report = build_student(teacher, mixer=mixer, attention_layers=[1])
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(s_sd[name], t_sd[name]) and name in report["copied"]
    for i in range(4):
        for part in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"):
            name = f"model.layers.{i}.{part}.weight"
            assert torch.equal(s_sd[name], t_sd[name]), name
    # hybrid layer: the teacher's attention, a separate copy
    kept = student.model.layers[1].self_attn
    assert type(kept).__name__ == "LlamaAttention"
    for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert torch.equal(getattr(kept, p).weight, getattr(teacher.model.layers[1].self_attn, p).weight)
        assert getattr(kept, p).weight.data_ptr() != getattr(teacher.model.layers[1].self_attn, p).weight.data_ptr()
    # mixer projections: q/k/v/o with kv heads repeated over their query group (4 heads, 2 kv heads, dim 16)
    names = {"discrete_mamba2": ("C_proj", "B_proj", "x_proj", "out_proj"), "gla": ("q_proj", "k_proj", "v_proj", "o_proj")}
    q, k, v, o = names[mixer]
    for i in (0, 2, 3):
        mixer_mod, attn = student.model.layers[i].self_attn, teacher.model.layers[i].self_attn
        assert torch.equal(getattr(mixer_mod, q).weight, attn.q_proj.weight)
        assert torch.equal(getattr(mixer_mod, o).weight, attn.o_proj.weight)
        for dst, src in ((k, attn.k_proj), (v, attn.v_proj)):
            w = getattr(mixer_mod, dst).weight.view(4, 16, 64)
            src_w = src.weight.view(2, 16, 64)
            for head in range(4):
                assert torch.equal(w[head], src_w[head // 2])
    assert all("self_attn" in n for n in report["initialised"])
    assert "tensors copied" in report["summary"]


def test_gqa_repeat_matches_hf_repeat_kv(teacher):
    """The repeated k/v rows give the same per-head keys as transformers' repeat_kv."""
    from transformers.models.llama.modeling_llama import repeat_kv
    student, _ = build_student(teacher, mixer="gla")
    u = torch.randn(1, 5, 64)
    attn, m = teacher.model.layers[0].self_attn, student.model.layers[0].self_attn
    k_t = attn.k_proj(u).view(1, 5, 2, 16).transpose(1, 2)
    k_s = m.k_proj(u).view(1, 5, 4, 16).transpose(1, 2)
    torch.testing.assert_close(repeat_kv(k_t, 2), k_s)


def test_all_attention_layers_equals_teacher(teacher):
    for mixer in MIXERS:
        student, report = build_student(teacher, mixer=mixer, attention_layers=range(4))
        assert report["mixer_layers"] == [] and report["initialised"] == []
        student.eval()
        x = ids()
        with torch.no_grad():
            assert torch.equal(student(input_ids=x).logits, teacher(input_ids=x).logits)


def test_no_init_from_teacher(teacher):
    student, report = build_student(teacher, init_from_teacher=False)
    assert report["copied"] == []
    assert not torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)


def test_freeze(teacher):
    student, _ = build_student(teacher, attention_layers=[1])
    total = sum(p.numel() for p in student.parameters())
    assert freeze(student, False, False, [1]) == total
    mlp = sum(p.numel() for n, p in student.named_parameters() if ".mlp." in n)
    attn1 = sum(p.numel() for p in student.model.layers[1].self_attn.parameters())
    assert freeze(student, freeze_mlp=True, freeze_replaced_layers=False, attention_layers=[1]) == total - mlp
    assert not any(p.requires_grad for n, p in student.named_parameters() if ".mlp." in n)
    assert freeze(student, freeze_mlp=True, freeze_replaced_layers=True, attention_layers=[1]) == total - mlp - attn1
    assert not any(p.requires_grad for p in student.model.layers[1].self_attn.parameters())
    assert all(p.requires_grad for p in student.model.layers[0].self_attn.parameters())
    assert freeze(student, freeze_mlp=False, freeze_replaced_layers=True, attention_layers=[1]) == total - attn1
    assert all(p.requires_grad for n, p in student.named_parameters() if ".mlp." in n)


@pytest.mark.parametrize("mixer", MIXERS)
def test_save_from_pretrained_round_trip(teacher, mixer, tmp_path):
    student, _ = build_student(teacher, mixer=mixer, attention_layers=[2], dm2_use_norm=True, gla_gate_low_rank_dim=8)
    # move every parameter off its init so a silently re-initialised tensor would show
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    student.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, LinearLlamaConfig) and config.model_type == "trainkit_linear_llama"
    assert config.mixer == mixer and config.attention_layers == [2] and config.gla_gate_low_rank_dim == 8
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert isinstance(loaded, LinearLlamaForCausalLM)
    for (n1, p1), (n2, p2) in zip(student.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    student.eval()
    loaded.eval()
    x = ids()
    with torch.no_grad():
        assert torch.equal(student(input_ids=x).logits, loaded(input_ids=x).logits)


def test_gradient_checkpointing_and_kd(teacher):
    """The training path distill.py uses: checkpointed student hidden states into the chunked KD loss."""
    student, _ = build_student(teacher, attention_layers=[3])
    from trainkit.models import enable_activation_checkpointing
    enable_activation_checkpointing(student)
    student.train()
    x = ids(2, 33)
    labels = torch.roll(x, -1, 1)
    hidden = student.model(input_ids=x, use_cache=False).last_hidden_state
    with torch.no_grad():
        t_hidden = teacher.model(input_ids=x, use_cache=False).last_hidden_state
    out = chunked_kd_loss(hidden.flatten(0, 1), student.lm_head.weight, t_hidden.flatten(0, 1), teacher.lm_head.weight,
                          labels.flatten(), temperature=2.0, ce_weight=0.1, chunk_size=16)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.loss.item() > 0 and int(out.tokens) == 66
    assert student.lm_head.weight.grad is not None
    assert student.model.layers[0].self_attn.A_log.grad is not None


def test_config_validation(teacher):
    with pytest.raises(ValueError, match="mixer"):
        build_student(teacher, mixer="mamba")
    with pytest.raises(ValueError, match="unknown mixer options"):
        build_student(teacher, gla_rank=3)
    with pytest.raises(ValueError, match="out of range"):
        build_student(teacher, attention_layers=[9])

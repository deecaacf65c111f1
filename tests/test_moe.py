"""Router statistics on tiny 4-bit MoE models (CPU, real forwards)."""

from __future__ import annotations

import math

import pytest
import torch

from moe_fixtures import batch, force_experts_0_1, load
from trainkit.adapters import apply_lora
from trainkit.config.base import LoraSection
from trainkit.models import apply_activation_checkpointing
from trainkit.moe import RouterStats
from trainkit.runlog import EXPERT_FIELDS

LAYER_KEYS = {"layer", "tokens_per_expert", "load_imbalance", "router_entropy", "dead_experts"}


@pytest.fixture(scope="module", params=["mixtral", "qwen3_moe", "glm4_moe"])
def moe_model(request):
    model, info = load(request.param)
    model = apply_lora(model, LoraSection(r=4, alpha=8, dropout=0.0))
    apply_activation_checkpointing(model, True, device="cpu", tokens=40, trainable=[])  # as train_qlora.py with `true`
    return request.param, model, info


def test_counts_sum_to_tokens_times_top_k(moe_model):
    family, model, info = moe_model
    stats = RouterStats(model)
    b = batch(5, b=2, t=20)
    model(**b).loss.backward()           # recompute under checkpointing must not count twice
    model(**batch(6, b=1, t=12)).loss.backward()
    snap = stats.snapshot(reset=True)
    assert set(snap) == set(EXPERT_FIELDS) - {"step", "time"}
    assert snap["num_experts"] == 4 and snap["top_k"] == 2
    n_moe = len(snap["layers"])
    assert n_moe == (1 if family == "glm4_moe" else 2)
    tokens = 2 * 20 + 12
    for layer in snap["layers"]:
        assert set(layer) == LAYER_KEYS
        assert sum(layer["tokens_per_expert"]) == tokens * 2
        assert 1.0 <= layer["load_imbalance"] <= 4.0
        assert 0.0 < layer["router_entropy"] <= math.log(4) + 1e-6
        assert layer["dead_experts"] == sum(1 for c in layer["tokens_per_expert"] if c == 0)
    assert snap["tokens_routed"] == n_moe * tokens * 2
    assert snap["total_dead_experts"] == sum(l["dead_experts"] for l in snap["layers"])
    empty = stats.snapshot()
    assert empty["tokens_routed"] == 0 and empty["mean_load_imbalance"] is None
    stats.remove()


def test_forced_routing_detects_dead_experts(moe_model):
    family, model, _ = moe_model
    stats = RouterStats(model)
    handles = force_experts_0_1(model)
    with torch.no_grad():
        model(**batch(7, b=1, t=16))
    snap = stats.snapshot()
    for layer in snap["layers"]:
        assert layer["tokens_per_expert"] == [16, 16, 0, 0]
        assert layer["dead_experts"] == 2 and layer["load_imbalance"] == pytest.approx(2.0)
    assert snap["total_dead_experts"] == 2 * len(snap["layers"])
    for h in handles:
        h.remove()
    stats.remove()


def test_counts_tensor_round_trip_for_reduction(moe_model):
    _, model, _ = moe_model
    stats = RouterStats(model)
    with torch.no_grad():
        model(**batch(8, b=1, t=10))
    t = stats.counts_tensor()
    assert t.dtype == torch.float64 and t.shape == (len(stats.layers), 4 + 2)
    stats.load_counts(t * 2)               # what accelerator.reduce(..., "sum") gives on 2 equal ranks
    snap = stats.snapshot()
    assert all(sum(l["tokens_per_expert"]) == 2 * 10 * 2 for l in snap["layers"])
    stats.remove()
    with torch.no_grad():
        model(**batch(8, b=1, t=10))
    assert stats.snapshot()["tokens_routed"] == 0   # hooks removed


def test_aux_loss_in_outputs():
    model, _ = load("mixtral")
    out = model(**batch(9))
    assert out.aux_loss is not None and torch.isfinite(out.aux_loss) and out.aux_loss > 0

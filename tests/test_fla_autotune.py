"""fla's Triton autotuners: the shipped per-GPU config table, narrowed autotuning, and the table writer
(trainkit.patches.fla). The kernels cannot run without a GPU, but their autotuner objects, pruning functions and
fla's config-file lookup are plain Python: these tests drive them directly."""

from __future__ import annotations

import json

import pytest

from trainkit.gla import AUTOTUNE_TABLES, autotune_configs, import_fla
from trainkit.patches import fla as fla_patches

import_fla()  # defines every fla kernel (and its autotuner); on CPU nothing is launched

from fla.ops.utils import cache as fla_cache  # noqa: E402
from triton import Config  # noqa: E402


def autotuner(kernel: str):
    found = [a for a in fla_patches._fla_autotuners() if fla_patches._kernel_name(a) == kernel]
    assert len(found) == 1, kernel
    return found[0]


def test_fla_autotuners_are_found_with_unique_module_qualified_names():
    names = [fla_patches._kernel_name(a) for a in fla_patches._fla_autotuners()]
    assert len(names) > 50 and len(names) == len(set(names))
    assert "fla.ops.gla.chunk.chunk_gla_bwd_kernel_inter" in names
    assert "fla.ops.common.chunk_h.chunk_fwd_kernel_h" in names or any(n.startswith("fla.ops.common.chunk_h.") for n in names)


def test_shipped_h200_table_is_read_by_fla_and_names_existing_kernels():
    folder = AUTOTUNE_TABLES / "NVIDIA_H200"
    files = sorted(folder.glob("*.json"))
    assert files
    kernels = {fla_patches._kernel_name(a): a for a in fla_patches._fla_autotuners()}
    for file in files:
        table = fla_cache.KernelConfigFile.from_file(file)
        assert table is not None and table.autotune_entries, file.name
        assert file.stem in kernels, f"{file.stem}: no such fla kernel (renamed upstream?)"
        arg_names = set(kernels[file.stem].arg_names)
        for entry in table.autotune_entries.values():
            assert set(entry["config"]["kwargs"]) <= arg_names, (file.stem, entry)   # tile names the kernel takes


def test_narrowing_keeps_four_warp_configs_after_the_kernels_own_pruning():
    tuner = autotuner("fla.ops.gla.chunk.chunk_gla_bwd_kernel_inter")
    fla_patches.narrow_autotuning()
    assert getattr(tuner, "_trainkit_narrowed", False)
    assert fla_patches.narrow_autotuning() == 0  # idempotent
    for k, v, state_v_first in ((16, 16, False), (64, 64, True), (128, 256, True)):
        args = {"K": k, "V": v, "STATE_V_FIRST": state_v_first}
        kept = tuner.early_config_prune(tuner.configs, args)
        assert kept, args  # the H200 gpu tests once ended with none left
        assert all(c.num_warps == 4 for c in kept) and len(kept) < len(tuner.configs)
        assert all(c.kwargs["BK"] < k or c.kwargs["BK"] == min(x.kwargs["BK"] for x in tuner.configs) for c in kept)


def test_a_table_config_is_found_exactly_and_for_another_sequence_length(tmp_path, monkeypatch):
    kernel = "fla.ops.gla.chunk.chunk_gla_fwd_kernel_o"
    tuner = autotuner(kernel)
    key = (64, 4, True, 128, 256, "torch.bfloat16", "torch.float32")
    other = (64, 4, True, 128, 512, "torch.bfloat16", "torch.float32")   # numbers differ: fla's fuzzy match
    chosen = Config({"BK": 64, "BV": 64}, num_warps=4, num_stages=3)
    monkeypatch.setitem(tuner.cache, key, chosen)
    tables = fla_patches.autotune_table_entries()
    assert tables[kernel]["autotune_entries"][fla_cache.AutotuneKey.key_hash(key)]["config"]["kwargs"] == {"BK": 64, "BV": 64}
    (tmp_path / f"{kernel}.json").write_text(json.dumps(tables[kernel]))

    monkeypatch.setattr(fla_cache, "FLA_CACHE_MODE", fla_cache.FlaCacheMode.DISABLED)
    monkeypatch.delenv("FLA_CONFIG_DIR", raising=False)
    assert fla_patches.use_autotune_table(tmp_path) > 50
    assert fla_cache.FLA_CACHE_MODE is fla_cache.FlaCacheMode.FUZZY and type(tuner) is fla_cache.CachedAutotuner
    for wanted in (key, other):
        found = fla_cache.load_cached_config(tuner.kernel_name, fla_cache.AutotuneKey(wanted))
        assert found["kwargs"] == {"BK": 64, "BV": 64} and found["num_stages"] == 3, wanted
    assert fla_cache.load_cached_config("fla.ops.gla.chunk.chunk_gla_bwd_kernel_dv", fla_cache.AutotuneKey(key)) is None


def test_autotune_configs_setting(monkeypatch):
    monkeypatch.delenv("TRAINKIT_FLA_AUTOTUNE_CONFIGS", raising=False)
    assert autotune_configs() == "narrow"
    monkeypatch.setenv("TRAINKIT_FLA_AUTOTUNE_CONFIGS", "ALL")
    assert autotune_configs() == "all"
    monkeypatch.setenv("TRAINKIT_FLA_AUTOTUNE_CONFIGS", "fast")
    with pytest.raises(ValueError, match="TRAINKIT_FLA_AUTOTUNE_CONFIGS='fast': expected narrow or all"):
        autotune_configs()

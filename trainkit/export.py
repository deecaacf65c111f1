"""Merge a run's LoRA adapter into its base and write a standard HF checkpoint.

    python -m trainkit.export --checkpoint RUN/final-checkpoint-150 --out exported/ [--dtype bf16]
        [--max-shard-size 2GB] [--base-weights dequantized|original] [--overwrite]

The export loads with ``AutoModelForCausalLM.from_pretrained(out)`` and no import from trainkit
(GLA models: ``import fla`` first). It streams: the base's safetensors are read one tensor at a time
(``safe_open``), the adapter's update is merged into the tensors it targets in float32, the result is
cast to --dtype and written straight into its shard, whose header was written first from the known
shapes. Peak memory is about the largest tensor (a fused MoE expert bank: one layer's experts) times
a few transient copies, whatever the model's size; disk is the output's size.

The merge, per adapted weight W (out, in), as PEFT's ``merge_and_unload`` computes it:
    LoRA / rsLoRA   W + s * B @ A                         s = alpha / r, or alpha / sqrt(r) (rsLoRA)
    DoRA            m * (W + s B A) / ||W + s B A||_row    m: the trained magnitude (one per output row)
    PiSSA / OLoRA   as LoRA, into the residual base W - s B0 A0 that PEFT made at init (B0 A0: the top-r
                    SVD / QR part of W), recomputed by PEFT's own init as its from_pretrained does; PiSSA by
                    randomized SVD (pissa_niter_N) is refused: its residual cannot be recomputed.
    modules_to_save (and trained biases): the adapter's copy replaces the base tensor.

--base-weights (a run over a 4-bit base, train_qlora.py):
    dequantized (default): each base weight as the run held it: in the run's compute dtype, and where the
        run held it in 4 bit (bitsandbytes Linear4bit, trainkit's NF4ExpertBank) quantized and dequantized
        with the run's settings, so the adapter is merged into the weights it was trained against: the
        export computes what the run computed. A base that stores MoE experts one by one (transformers 5's
        save_pretrained layout) has each layer's bank stacked as transformers loads it, rounded as one NF4
        bank, and split back (CheckpointLayout, BaseAsTrained).
    original: the adapter is merged into the weights as the base checkpoint stores them (full precision),
        as most merge tools do; after a 4-bit run the result differs from the trained model by the 4-bit
        rounding error.

A distill.py checkpoint holds a whole student (trainkit.students): one whose mixer is GLA on every layer is
written as fla's GLA model (renamed tensors, fla's config: ``export_student``); others are refused with what
loads them.

Key mapping (``adapter_updates``): PEFT's adapter keys name modules of the wrapped model
(``base_model.model.<module>.lora_A.weight``); each becomes one ``Update`` of the base tensor
``<module>.weight`` (under the checkpoint's own name where transformers renames it while loading). An
adapter key that maps to no base tensor is an error that names it, never dropped.

Expert adapters (``target_parameters``: LoRA on fused MoE experts, trainkit.expert_lora): ``expert_updates`` maps
PEFT's nested ParamWrapper keys (``…mlp.experts.base_layer.lora_A.weight`` = gate_up_proj, ``…mlp.experts.lora_A
.weight`` = down_proj) to the fused expert tensor; per expert e, dW_e = s * B.view(out, r, E)[:, :, e] @
A.view(E, r, in)[e] is added to the fused (E, out, in) tensor, or, in a per-expert base layout, to each expert's
tensors (gate rows [0:I] to w1 / gate_proj, up rows [I:2I] to w3 / up_proj). The dequantized base is the rounded
whole bank (BaseAsTrained), so the export computes what the run computed; each expert update must land on every
tensor it targets, or the export fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import shutil
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from trainkit.checkpoints import atomic_directory
from trainkit.fileio import read_json

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}
SIZE_UNITS = {"B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
              "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}
ADAPTER_PREFIX = "base_model.model."
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
GLA_LOADER_NOTE = ("GLA model (flash-linear-attention): `pip install flash-linear-attention`, then `import fla` before "
                   "AutoModelForCausalLM.from_pretrained (fla registers model_type gla with transformers; its kernels "
                   "are Triton: a CUDA GPU)")


class ExportError(ValueError):
    """Bad input to the export: one line, exit code 2."""


# ---------------------------------------------------------------------------------------------------------
# the adapter: PEFT keys -> updates of base tensors


@dataclass
class Update:
    """What the adapter does to one base tensor. kind: lora (A, B; DoRA when `magnitude` is set), replace
    (`replacement`: a modules_to_save copy or a trained bias). The fields hold adapter keys; the tensors are
    read when the base tensor is merged. (Adapters on embeddings, which PEFT saves as lora_embedding_A/B, are
    not made by trainkit (lora.target_modules names linear layers) and are refused as unknown keys.)"""

    kind: str = "lora"
    a: str | None = None
    b: str | None = None
    magnitude: str | None = None
    replacement: str | None = None
    keys: list[str] = field(default_factory=list)


UNSUPPORTED_ADAPTER_OPTIONS = {
    # adapter_config.json key: (value that is fine, why the export refuses anything else)
    "lora_bias": (False, "a bias on lora_B"),
    "layer_replication": (None, "layer replication"),
    "alpha_pattern": ({}, "per-module alpha (alpha_pattern)"),
    "trainable_token_indices": (None, "trainable token indices"),
    "use_qalora": (False, "QA-LoRA"),
    "fan_in_fan_out": (False, "GPT-2 style Conv1D layers (fan_in_fan_out)"),
}


def read_adapter_config(checkpoint: Path) -> dict:
    path = checkpoint / "adapter_config.json"
    config = read_json(path)
    if not isinstance(config, dict):
        raise ExportError(f"{checkpoint}: no adapter_config.json (not a PEFT adapter checkpoint of train_qlora.py / "
                          "train_lora.py)")
    if config.get("peft_type") != "LORA":
        raise ExportError(f"{path}: peft_type {config.get('peft_type')!r}; only LORA adapters (LoRA, rsLoRA, DoRA, "
                          "PiSSA, OLoRA) are exported")
    init = str(config.get("init_lora_weights"))
    if init.startswith(("pissa_niter", "corda", "loftq")):
        raise ExportError(f"{path}: init_lora_weights {init!r}: PEFT changed the base weights at init by a "
                          "randomized or data-dependent decomposition that cannot be recomputed, and this checkpoint "
                          "holds neither that base nor the initial adapter; train with lora.init pissa and "
                          "lora.pissa_fast false (full SVD), olora, default or gaussian to export, or convert the "
                          "adapter to plain LoRA with PEFT (save_pretrained(..., path_initial_model_for_weight_conversion=<the adapter saved before "
                          "training>)) and export that")
    experts = list(config.get("target_parameters") or [])
    checked = {**config, "alpha_pattern": {k: v for k, v in (config.get("alpha_pattern") or {}).items()
                                           if k not in experts}}
    for key, (fine, what) in UNSUPPORTED_ADAPTER_OPTIONS.items():
        if checked.get(key, fine) not in (fine, None, [], {}, False):
            raise ExportError(f"{path}: {key} is set ({what}); the export does not merge that yet")
    if experts and config.get("rank_pattern") and any(k not in experts for k in config["rank_pattern"]):
        raise ExportError(f"{path}: rank_pattern names modules other than the expert parameters; the export does not "
                          "merge that yet")
    return config


def adapter_updates(adapter_keys: list[str], base_names: set[str]) -> dict[str, Update]:
    """The base tensor each adapter key changes: {base tensor name: Update}. Raises ExportError naming the
    adapter keys that match no base tensor (never drops one)."""
    updates: dict[str, Update] = {}
    unknown: list[str] = []
    for key in adapter_keys:
        name = key[len(ADAPTER_PREFIX):] if key.startswith(ADAPTER_PREFIX) else None
        target, role = _adapter_target(name) if name else (None, None)
        if target is None or target not in base_names:
            unknown.append(key)
            continue
        update = updates.setdefault(target, Update())
        update.keys.append(key)
        if role == "replace":
            update.kind, update.replacement = "replace", key
        else:
            setattr(update, role, key)
    if unknown:
        raise ExportError(f"adapter keys that match no tensor of the base: {', '.join(unknown[:5])}"
                          + (f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""))
    for target, update in updates.items():
        if update.kind == "replace" and (update.a or update.b or update.magnitude):
            raise ExportError(f"{target}: the adapter both replaces it and holds a LoRA update for it ({update.keys})")
        if update.kind != "replace" and not (update.a and update.b):
            raise ExportError(f"{target}: the adapter holds {update.keys} but not both LoRA factors A and B")
    return updates


@dataclass
class ExpertUpdate:
    """A LoRA on one fused expert tensor (PEFT target_parameters, trainkit.expert_lora): A [r*E, in] and
    B [out, r*E] adapter keys; per expert e, dW_e = s * B.view(out, r, E)[:, :, e] @ A.view(E, r, in)[e]."""

    num_experts: int
    a: str | None = None
    b: str | None = None
    scaling: float = 0.0
    consumed: int = 0      # base tensors it was merged into (one fused tensor, or per expert and source)

    def delta(self, read, expert: int | None = None) -> torch.Tensor:
        """(E, out, in) float32, or one expert's (out, in)."""
        a, b = read(self.a).float(), read(self.b).float()
        rank = a.shape[0] // self.num_experts
        a_e = a.view(-1, rank, a.shape[1])
        b_e = b.view(b.shape[0], rank, -1).permute(2, 0, 1)
        if expert is not None:
            return self.scaling * (b_e[expert] @ a_e[expert])
        return self.scaling * torch.bmm(b_e, a_e)


EXPERT_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "glm4_moe")   # trainkit.expert_lora.EXPERT_PRESETS


def expert_updates(adapter_keys: list[str], config: dict, model_type: str | None,
                   num_experts: int | None) -> tuple[dict[str, ExpertUpdate], list[str]]:
    """({fused expert tensor's model name: ExpertUpdate}, the adapter keys left for adapter_updates). PEFT nests
    one ParamWrapper per target parameter around the experts module, first-registered innermost (gate_up_proj
    inside down_proj): a key's number of `.base_layer` segments after `experts` tells which parameter it adapts."""
    from trainkit.expert_lora import EXPERT_PARAM_ORDER
    targets = list(config.get("target_parameters") or [])
    if not targets:
        return {}, adapter_keys
    if model_type not in EXPERT_FAMILIES:
        raise ExportError(f"expert adapters (target_parameters) of a {model_type!r} model: the export merges them for "
                          f"{', '.join(EXPERT_FAMILIES)} (known fused layouts)")
    if not num_experts:
        raise ExportError("expert adapters: the base config names no number of experts")
    params = sorted({t.rsplit(".", 1)[-1] for t in targets},
                    key=lambda n: EXPERT_PARAM_ORDER.index(n) if n in EXPERT_PARAM_ORDER else len(EXPERT_PARAM_ORDER))
    ranks = config.get("rank_pattern") or {}
    alphas = config.get("alpha_pattern") or {}
    pattern = re.compile(r"^(?P<module>.*\.experts)(?P<wrappers>(?:\.base_layer)*)\.lora_(?P<role>[AB])\.weight$")
    updates: dict[str, ExpertUpdate] = {}
    rest = []
    for key in adapter_keys:
        m = pattern.match(key[len(ADAPTER_PREFIX):]) if key.startswith(ADAPTER_PREFIX) else None
        depth = m.group("wrappers").count(".base_layer") if m else -1
        if m is None or depth >= len(params):
            rest.append(key)
            continue
        param = params[len(params) - 1 - depth]
        suffix = next((t for t in targets if t.endswith("." + param) or t == param), param)
        rank = int(ranks.get(suffix, config["r"]))
        alpha = float(alphas.get(suffix, config["lora_alpha"]))
        update = updates.setdefault(f"{m.group('module')}.{param}", ExpertUpdate(num_experts=num_experts))
        update.scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        setattr(update, "a" if m.group("role") == "A" else "b", key)
    for name, update in updates.items():
        if not (update.a and update.b):
            raise ExportError(f"{name}: the adapter holds only one of the expert LoRA factors A and B")
    return updates, rest


@torch.no_grad()
def merge_expert_update(tensor: torch.Tensor, name: str, model_name: str, layout: "CheckpointLayout",
                        updates: dict[str, ExpertUpdate], read) -> torch.Tensor:
    """`tensor` with its expert adapter merged in float32: a fused (E, out, in) tensor gets every expert's dW_e; a
    per-expert checkpoint tensor (experts.N.w1 / gate_proj ...) its rows of expert N's dW (sources concatenated
    along the output rows, in the conversion's order: gate then up)."""
    if model_name in updates:
        update = updates[model_name]
        delta = update.delta(read)
        if delta.shape != tensor.shape:
            raise ExportError(f"{name}: the expert adapter's update has shape {tuple(delta.shape)}, the base "
                              f"{tuple(tensor.shape)}")
        update.consumed += 1
        return tensor.float() + delta
    fused = layout.fused(name)
    if fused is None or fused[0] not in updates:
        return tensor
    bank, source, expert = fused
    update = updates[bank]
    delta = update.delta(read, expert)
    sources = delta.shape[0] // tensor.shape[0]
    if delta.shape[0] % tensor.shape[0] or delta.shape[1] != tensor.shape[1] or source >= sources:
        raise ExportError(f"{name}: the expert adapter's update has shape {tuple(delta.shape)}, the base tensor "
                          f"{tuple(tensor.shape)} (source {source} of {bank})")
    rows = tensor.shape[0]
    update.consumed += 1
    return tensor.float() + delta[source * rows:(source + 1) * rows]


_LORA_SUFFIXES = (  # adapter key suffix after the module name -> role
    (".lora_A.weight", "a"), (".lora_B.weight", "b"), (".lora_magnitude_vector", "magnitude"),
    (".lora_magnitude_vector.weight", "magnitude"))


def _adapter_target(name: str) -> tuple[str | None, str | None]:
    """(base tensor name, role) of an adapter key without PEFT's prefix."""
    for suffix, role in _LORA_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)] + ".weight", role
    if ".lora_" in name:
        return None, None  # a LoRA tensor of a kind the export does not know
    # modules_to_save copies are saved under the module's own name; trained biases (lora.bias) too
    return name.replace(".base_layer.", ".").replace(".modules_to_save.", "."), "replace"


def lora_scaling(config: dict, rank: int) -> float:
    alpha = float(config["lora_alpha"])
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


RESIDUAL_INITS = ("pissa", "olora")  # inits that leave W minus the adapter's initial product as the base


@torch.no_grad()
def residual_base(weight: torch.Tensor, rank: int, config: dict) -> torch.Tensor:
    """PiSSA (full SVD) / OLoRA (QR): the base PEFT left at init, W minus the principal part it moved into the
    adapter, computed by PEFT's own init on this weight (what PeftModel.from_pretrained does when it loads such
    an adapter; both decompositions are deterministic). In `weight`'s dtype, as in the run."""
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as LoraLinear
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
    lora = LoraConfig(r=rank, lora_alpha=config["lora_alpha"], use_rslora=bool(config.get("use_rslora")),
                      init_lora_weights=config["init_lora_weights"])
    LoraLinear(linear, "default", config=lora, r=rank, lora_alpha=config["lora_alpha"])
    return linear.weight.detach()


@torch.no_grad()
def merge_update(weight: torch.Tensor, update: Update, read: Callable[[str], torch.Tensor], config: dict,
                 name: str) -> torch.Tensor:
    """`weight` with `update` merged, in float32, as PEFT's merge_and_unload computes it (PiSSA / OLoRA: into the
    residual base PEFT computes from `weight` at init)."""
    if update.kind == "replace":
        new = read(update.replacement).float()
        if new.shape != weight.shape:
            raise ExportError(f"{name}: the adapter's copy has shape {tuple(new.shape)}, the base {tuple(weight.shape)}")
        return new
    if weight.dim() != 2:
        # a fused MoE expert bank (E, out, in): per-expert updates get their own rule with expert adapters
        raise ExportError(f"{name}: a {weight.dim()}-D tensor; merging adapters into fused MoE experts is not "
                          "supported yet")
    a, b = read(update.a).float(), read(update.b).float()
    if str(config.get("init_lora_weights")) in RESIDUAL_INITS:
        weight = residual_base(weight, a.shape[0], config)
    weight = weight.float()
    delta = (b @ a) * lora_scaling(config, a.shape[0])
    if delta.shape != weight.shape:
        raise ExportError(f"{name}: the adapter's update has shape {tuple(delta.shape)}, the base {tuple(weight.shape)}")
    merged = weight + delta
    if update.magnitude:  # DoRA: rescale each output row to the trained magnitude
        magnitude = read(update.magnitude).float()
        merged = merged * (magnitude / torch.linalg.norm(merged, dim=1)).view(-1, 1)
    return merged


# ---------------------------------------------------------------------------------------------------------
# the base: where its weights are, and which of them the run held in 4 bit


def resolve_base_dir(cfg, tokenizer, compute_dtype: torch.dtype) -> tuple[Path, str]:
    """(local directory holding the base's config.json and safetensors, display name): paths.model_name_or_path
    (a local directory, or a hub id resolved in the HF cache, offline), else the random-init model the run
    built from model.config (trainkit.models.model_source: same vocab, seed and dtype)."""
    from trainkit.models import model_source
    source, name, _ = model_source(cfg, tokenizer, compute_dtype)
    if Path(source).is_dir():
        return Path(source), name
    from huggingface_hub import snapshot_download
    try:
        path = snapshot_download(source, cache_dir=cfg.paths.cache_dir, local_files_only=True,
                                 allow_patterns=["*.json", "*.safetensors", "*.py", "*.model", "*.txt"])
    except Exception as e:  # huggingface_hub raises several kinds for "not in the cache"
        raise ExportError(f"paths.model_name_or_path {source!r}: not a local directory and not in the HF cache "
                          f"({type(e).__name__}); download it first (huggingface-cli download {source}) or point "
                          "the config at a local copy") from None
    return Path(path), name


def base_tensor_files(base_dir: Path) -> list[Path]:
    index = base_dir / INDEX_FILE
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [base_dir / f for f in files]
    if (base_dir / SINGLE_FILE).is_file():
        return [base_dir / SINGLE_FILE]
    raise ExportError(f"{base_dir}: the base has no safetensors weights ({SINGLE_FILE} or {INDEX_FILE}); convert it "
                      "to safetensors first")


@dataclass
class CheckpointLayout:
    """How a base checkpoint names its tensors against the model transformers builds from it: transformers'
    conversion mapping for the model type (``get_checkpoint_conversion_mapping``). Renamings (Mixtral's
    ``block_sparse_moe`` -> ``mlp``) and per-expert tensors that loading stacks (and concatenates) into one
    fused 3-D expert bank (``experts.N.w1`` + ``experts.N.w3`` -> ``experts.gate_up_proj``): transformers 5's
    save_pretrained writes MoE checkpoints in that per-expert layout."""

    renamings: list[tuple[str, str]] = field(default_factory=list)          # (regex, replacement)
    fusions: list[tuple[list[re.Pattern], str]] = field(default_factory=list)  # (per-source regex, fused suffix)

    @classmethod
    def of(cls, model_type: str | None) -> "CheckpointLayout":
        try:
            from transformers.conversion_mapping import get_checkpoint_conversion_mapping
            from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter, WeightRenaming
        except ImportError:  # a transformers without conversions loads checkpoints by the model's own names
            return cls()
        layout = cls()
        for entry in get_checkpoint_conversion_mapping(model_type) or []:
            if isinstance(entry, WeightRenaming):
                layout.renamings += [(src, tgt) for src, tgt in zip(entry.source_patterns, entry.target_patterns)]
                continue
            if not isinstance(entry, WeightConverter):
                continue
            ops = [(type(op), getattr(op, "dim", None)) for op in entry.operations]
            patterns = [re.compile(re.escape(src).replace(r"\*", r"(\d+)") + "$") for src in entry.source_patterns]
            # other conversions (splits, transposes...): their tensors match no model parameter, and the
            # dequantized export refuses them (BaseAsTrained.check_names)
            if ops in ([(MergeModulelist, 0)], [(MergeModulelist, 0), (Concatenate, 1)]) and len(entry.target_patterns) == 1:
                layout.fusions.append((patterns, entry.target_patterns[0]))
        return layout

    def model_name(self, name: str) -> str:
        for src, tgt in self.renamings:
            name = re.sub(src, tgt, name)
        return name

    def fused(self, name: str) -> tuple[str, int, int] | None:
        """(fused bank name, source index, expert index) of a per-expert checkpoint tensor; None otherwise."""
        name = self.model_name(name)
        for patterns, target in self.fusions:
            for source, pattern in enumerate(patterns):
                if m := pattern.search(name):
                    return name[:m.start()] + target, source, int(m.group(1))
        return None


@dataclass
class BaseAsTrained:
    """--base-weights dequantized: each base tensor as the run held it. The run loaded every weight in its compute
    dtype, then quantized `linear` (bitsandbytes Linear4bit: blocks of 64, double quant per tensor) and `banks`
    (fused MoE experts, trainkit's NF4ExpertBank: per expert, double quant over the bank) to 4 bit."""

    compute_dtype: torch.dtype
    quantization: object = None            # the run's quantization section (train_qlora.py), None without 4 bit
    linear: set[str] = field(default_factory=set)
    banks: set[str] = field(default_factory=set)
    layout: CheckpointLayout = field(default_factory=CheckpointLayout)
    # per-expert checkpoint tensors of each 4-bit bank: {bank: {source: {expert: checkpoint name}}}; a bank is
    # assembled, rounded and split when its first tensor is written, the rest wait in `pending`
    groups: dict[str, dict[int, dict[int, str]]] = field(default_factory=dict)
    pending: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def of_run(cls, base_config, quantization, compute_dtype: torch.dtype,
               layout: CheckpointLayout) -> tuple["BaseAsTrained", set[str]]:
        """(how the run held each tensor, the names of every tensor of the model it built). The 4-bit sets come from
        transformers' own bitsandbytes replacement (with trainkit.models' skip list) applied to the model built on
        the meta device, and the 3-D expert tensors trainkit.quantization quantizes."""
        if quantization is None or not quantization.load_in_4bit:
            return cls(compute_dtype, layout=layout), set()
        import bitsandbytes as bnb
        from transformers import AutoModelForCausalLM
        from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer

        from trainkit.models import _quantization_config
        from trainkit.quantization import iter_expert_modules

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(base_config)
        Bnb4BitHfQuantizer(_quantization_config(quantization, compute_dtype))._process_model_before_weight_loading(
            model, device_map=None)
        linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
        banks = set()
        if quantization.quantize_moe_experts:
            banks = {f"{mn}.{pn}" for mn, module in iter_expert_modules(model)
                     for pn, p in module.named_parameters(recurse=False) if p.dim() == 3 and p.is_floating_point()}
        return cls(compute_dtype, quantization, linear, banks, layout), set(model.state_dict())

    def describe(self) -> str:
        if self.quantization is None:
            return f"base weights: dequantized (in {DTYPE_NAMES[self.compute_dtype]}, the run's compute dtype)"
        q = self.quantization
        return (f"base weights: dequantized ({len(self.linear)} Linear4bit weights and {len(self.banks)} expert banks "
                f"rounded through {q.quant_type}{' with double quant' if q.double_quant else ''}, the rest in "
                f"{DTYPE_NAMES[self.compute_dtype]}, as the run held them)")

    def check_names(self, names: list[str], model_names: set[str]) -> None:
        """Group the checkpoint's per-expert tensors by the 4-bit bank they load into; ExportError for a weight
        whose place in the model the export cannot tell (so neither how the run quantized it)."""
        for name in names:
            fused = self.layout.fused(name)
            if fused is not None and fused[0] in model_names:
                bank, source, expert = fused
                if bank in self.banks:
                    self.groups.setdefault(bank, {}).setdefault(source, {})[expert] = name
            elif self.layout.model_name(name) not in model_names:
                raise ExportError(f"--base-weights dequantized: the base's tensor {name} is no parameter of the model "
                                  "transformers builds from it, so the export cannot tell how the run quantized it; "
                                  "use --base-weights original")
        for bank, sources in self.groups.items():
            counts = {len(experts) for experts in sources.values()}
            if len(counts) != 1 or any(sorted(experts) != list(range(len(experts))) for experts in sources.values()):
                raise ExportError(f"--base-weights dequantized: the base holds an incomplete set of the per-expert "
                                  f"tensors of {bank}; use --base-weights original")

    def __call__(self, name: str, weight: torch.Tensor, read_base: Callable[[str], torch.Tensor]) -> torch.Tensor:
        if name in self.pending:
            return self.pending.pop(name)
        fused = self.layout.fused(name)
        if fused is not None and fused[0] in self.groups:
            return self._split_bank(fused[0], read_base).pop(name)
        name = self.layout.model_name(name)
        weight = weight.to(self.compute_dtype)
        if name in self.banks:
            return self._round_bank(weight)
        if name in self.linear:
            import bitsandbytes.functional as bnbF
            packed, state = bnbF.quantize_4bit(weight.contiguous(), blocksize=64,
                                               compress_statistics=self.quantization.double_quant,
                                               quant_type=self.quantization.quant_type, quant_storage=torch.uint8)
            return bnbF.dequantize_4bit(packed, state).float()
        return weight

    def _round_bank(self, bank: torch.Tensor) -> torch.Tensor:
        from trainkit.quantization import NF4ExpertBank
        q = self.quantization
        rounded = NF4ExpertBank.from_weight(bank, compute_dtype=torch.float32, quant_type=q.quant_type,
                                            double_quant=q.double_quant)
        return rounded.dequantize(torch.float32)

    def _split_bank(self, bank: str, read_base: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
        """A bank stored per expert: stacked (and concatenated along the output rows) as transformers loads it,
        rounded as one bank, split back into the checkpoint's tensors; they wait in `pending`."""
        sources = self.groups.pop(bank)
        parts = [torch.stack([read_base(sources[s][e]).to(self.compute_dtype) for e in range(len(sources[s]))])
                 for s in sorted(sources)]
        rows = [part.shape[1] for part in parts]
        whole = torch.cat(parts, dim=1)
        del parts
        rounded = self._round_bank(whole)
        del whole
        start = 0
        for s, count in zip(sorted(sources), rows):
            for e, name in sources[s].items():
                self.pending[name] = rounded[e, start:start + count]  # views: the bank goes with the last one written
            start += count
        return self.pending


# ---------------------------------------------------------------------------------------------------------
# streaming safetensors writer


def parse_size(text: str) -> int:
    """'2GB' -> 2e9 bytes (HF's convention: GB = 10^9, GiB = 2^30); a plain number is bytes."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else ""
    if not m or unit not in SIZE_UNITS and unit:
        raise ExportError(f"--max-shard-size {text!r}: give a size such as 2GB, 500MB or 1GiB")
    size = int(float(m.group(1)) * SIZE_UNITS[unit or "B"])
    if size <= 0:
        raise ExportError(f"--max-shard-size {text!r}: must be positive")
    return size


@dataclass
class TensorPlan:
    name: str
    source: Path              # base safetensors file
    shape: tuple[int, ...]
    dtype: torch.dtype        # in the output
    source_name: str | None = None  # the tensor's name in `source` when the output renames it

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_shards(tensors: list[TensorPlan], max_shard_size: int) -> list[list[TensorPlan]]:
    """Tensors in order, a new shard whenever the next one would pass max_shard_size (a tensor larger than
    the limit gets a shard of its own, as in transformers' save_pretrained)."""
    shards: list[list[TensorPlan]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def write_index(staging: Path, shards: list, names: list[str]) -> int:
    """model.safetensors.index.json (HF's sharded format) when the tensors went to more than one file; returns
    the bytes of all tensors."""
    total = sum(plan.nbytes for shard in shards for plan in shard)
    if len(names) > 1:
        weight_map = {plan.name: name for shard, name in zip(shards, names) for plan in shard}
        (staging / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                     indent=2) + "\n")
    return total


def safetensors_header(tensors: list[TensorPlan]) -> bytes:
    """The header of a safetensors file holding `tensors` in this order: 8-byte length, then JSON, padded
    with spaces to a multiple of 8 bytes (the format's alignment)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_tensor(f, tensor: torch.Tensor, plan: TensorPlan) -> None:
    if tuple(tensor.shape) != plan.shape or tensor.dtype != plan.dtype:
        raise RuntimeError(f"{plan.name}: produced {tuple(tensor.shape)} {tensor.dtype}, planned {plan.shape} {plan.dtype}")
    data = tensor.detach().to("cpu").contiguous().reshape(-1)
    f.write(memoryview(data.view(torch.uint8).numpy()) if data.numel() else b"")


# ---------------------------------------------------------------------------------------------------------
# the export


@dataclass
class ExportReport:
    out: Path
    shards: list[str]
    tensors: int
    merged: int
    replaced: int
    bytes: int
    notes: list[str]


def run_compute_dtype(cfg, checkpoint: Path) -> torch.dtype:
    """The dtype the run computed in (and built a random-init base in): run.json's model.compute_dtype, else the
    config's dtype resolved for a CPU (what this machine would pick)."""
    from trainkit.checkpoints import run_info_value
    from trainkit.models import DTYPES as MODEL_DTYPES
    from trainkit.runtime import resolve_dtype
    name = run_info_value(checkpoint, cfg, "model", "compute_dtype")
    if name in MODEL_DTYPES:
        return MODEL_DTYPES[name]
    quantization = getattr(cfg, "quantization", None)
    configured = quantization.compute_dtype if quantization is not None else getattr(cfg.model, "dtype", "auto")
    return MODEL_DTYPES[resolve_dtype(configured, "cpu")[0]]


def load_checkpoint_config(checkpoint: Path):
    from trainkit.checkpoints import checkpoint_config
    from trainkit.config import ConfigError
    if not checkpoint.is_dir():
        raise ExportError(f"--checkpoint {checkpoint}: not a directory")
    try:
        cfg = checkpoint_config(checkpoint)
    except FileNotFoundError as e:
        raise ExportError(f"--checkpoint {e}; give a checkpoint-<step>/, final-checkpoint-<step>/ or best-adapter/ "
                          "directory of a run") from None
    except ConfigError as e:
        raise ExportError(f"--checkpoint {checkpoint}: its stored config does not validate: {e}") from None
    return cfg


def check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"--out {out}: exists and is not empty; pass --overwrite to replace its contents")


def export_checkpoint(checkpoint, out, dtype: str = "bf16", max_shard_size: str | int = "2GB",
                      base_weights: str = "dequantized", overwrite: bool = False, progress: bool = True,
                      say: Callable[[str], None] = print) -> ExportReport:
    """Merge the adapter of `checkpoint` into its base and write the HF checkpoint to `out` (module doc)."""
    from safetensors import safe_open
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoTokenizer

    checkpoint, out = Path(checkpoint), Path(out)
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: one of {', '.join(DTYPES)}")
    if base_weights not in ("dequantized", "original"):
        raise ExportError(f"--base-weights {base_weights!r}: dequantized or original")
    out_dtype = DTYPES[dtype]
    shard_limit = max_shard_size if isinstance(max_shard_size, int) else parse_size(max_shard_size)
    cfg = load_checkpoint_config(checkpoint)
    if cfg.script == "distill.py":
        if out.resolve() == checkpoint.resolve():
            raise ExportError("--out is the checkpoint directory; give a new directory")
        check_out(out, overwrite)
        return export_student(checkpoint, out, cfg, out_dtype, dtype, shard_limit, progress, say)
    adapter_config = read_adapter_config(checkpoint)
    adapter_file = checkpoint / "adapter_model.safetensors"
    if not adapter_file.is_file():
        raise ExportError(f"{checkpoint}: no adapter_model.safetensors")
    if out.resolve() == checkpoint.resolve():
        raise ExportError("--out is the checkpoint directory; give a new directory")
    check_out(out, overwrite)

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    except (OSError, ValueError) as e:
        raise ExportError(f"{checkpoint}: no tokenizer could be loaded from it ({type(e).__name__})") from None
    compute_dtype = run_compute_dtype(cfg, checkpoint)
    base_dir, base_name = resolve_base_dir(cfg, tokenizer, compute_dtype)
    if not (base_dir / "config.json").is_file():
        raise ExportError(f"{base_dir}: the base has no config.json")
    base_config_dict = json.loads((base_dir / "config.json").read_text())
    gla = base_config_dict.get("model_type") == "gla"
    if gla:
        from trainkit.gla import import_fla
        import_fla()  # registers model_type gla with the Auto classes
    base_config = AutoConfig.from_pretrained(str(base_dir), trust_remote_code=cfg.model.trust_remote_code)

    notes: list[str] = []
    layout = CheckpointLayout.of(base_config_dict.get("model_type"))
    plans = plan_tensors(base_tensor_files(base_dir), out_dtype)
    as_trained = None
    if base_weights == "dequantized":
        as_trained, model_names = BaseAsTrained.of_run(base_config, getattr(cfg, "quantization", None), compute_dtype,
                                                       layout)
        if model_names:
            as_trained.check_names([p.name for p in plans if p.dtype.is_floating_point and len(p.shape) >= 2],
                                   model_names)
        notes.append(as_trained.describe())
    else:
        notes.append("base weights: original (as stored in the base checkpoint; a run over a 4-bit base trained over "
                     "their 4-bit rounding, so the export differs from the trained model by that rounding error)")
    # adapters name the model's modules; the base checkpoint may name them otherwise (layout renamings)
    by_model_name = {layout.model_name(p.name): p.name for p in plans}

    with safe_open(str(adapter_file), "pt") as adapter:
        experts, module_keys = expert_updates(list(adapter.keys()), adapter_config, base_config_dict.get("model_type"),
                                              _num_experts(base_config))
        updates = {by_model_name[target]: update
                   for target, update in adapter_updates(module_keys, set(by_model_name)).items()}
        shards = plan_shards(plans, shard_limit)
        names = shard_names(len(shards))
        with atomic_directory(out) as staging, contextlib.ExitStack() as files, \
                tqdm(total=len(plans), desc="export", unit="tensor", disable=not progress, file=sys.stderr) as bar:
            base_files = {path: files.enter_context(safe_open(str(path), "pt")) for path in {p.source for p in plans}}
            source_of = {p.name: p.source for p in plans}

            def read_base(name: str) -> torch.Tensor:
                return base_files[source_of[name]].get_tensor(name)

            for shard, file_name in zip(shards, names):
                with open(staging / file_name, "wb") as f:
                    f.write(safetensors_header(shard))
                    for plan in shard:
                        tensor = base_files[plan.source].get_tensor(plan.source_name or plan.name)
                        tensor = export_tensor(tensor, plan, updates.get(plan.name), adapter.get_tensor, adapter_config,
                                               as_trained, read_base, experts, layout)
                        write_tensor(f, tensor, plan)
                        del tensor
                        bar.update(1)
            for bank, update in experts.items():
                expected = 1 if bank in by_model_name else sum(
                    1 for p in plans if (f := layout.fused(p.name)) is not None and f[0] == bank)
                if not update.consumed or update.consumed != expected:
                    raise ExportError(f"{bank}: the expert adapter was merged into {update.consumed} base tensors, "
                                      f"expected {expected}: the base does not hold this expert tensor")
            total = write_index(staging, shards, names)
            write_config(base_config_dict, staging, out_dtype)
            for extra in base_dir.glob("*.py"):  # remote code (auto_map) the config names
                shutil.copy2(extra, staging / extra.name)
            tokenizer.save_pretrained(str(staging))
            write_generation_config(base_dir, staging, tokenizer, cfg, checkpoint)
            if gla:
                notes.append(GLA_LOADER_NOTE)
            merged = sum(u.kind != "replace" for u in updates.values()) + sum(u.consumed for u in experts.values())
            replaced = sum(u.kind == "replace" for u in updates.values())
            report = ExportReport(out, names, len(plans), merged, replaced, total, notes)
            write_export_note(report, staging, checkpoint, base_name, cfg, adapter_config, dtype, base_weights, gla)
    say(f"exported {checkpoint} -> {out}: {report.tensors} tensors ({report.merged} with the adapter merged, "
        f"{report.replaced} replaced by the adapter's copies), {total / 2**20:.1f} MiB in {len(names)} file(s), {dtype}")
    for note in notes:
        say(note)
    say(f"load it with: {load_snippet(str(out), gla)}")
    return report


def plan_tensors(files: list[Path], out_dtype: torch.dtype) -> list[TensorPlan]:
    """Every tensor of the base files, in file order, from the headers alone (no data read); floating-point
    tensors go out in `out_dtype`, the others as they are."""
    from safetensors import safe_open
    by_code = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    plans = []
    for path in files:
        with safe_open(str(path), "pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                dtype = by_code.get(sl.get_dtype())
                if dtype is None:
                    raise ExportError(f"{path}: tensor {name} has dtype {sl.get_dtype()}, which the export cannot write")
                plans.append(TensorPlan(name, path, tuple(sl.get_shape()), out_dtype if dtype.is_floating_point else dtype))
    return plans


def export_tensor(tensor: torch.Tensor, plan: TensorPlan, update: Update | None, read, adapter_config: dict,
                  as_trained: BaseAsTrained | None, read_base: Callable[[str], torch.Tensor],
                  experts: dict[str, ExpertUpdate] | None = None,
                  layout: CheckpointLayout | None = None) -> torch.Tensor:
    """One base tensor as it goes into the export: as the run held it (dequantized) or as stored, the adapter's
    update (or its expert adapter's) merged in float32, cast to the output dtype."""
    if not tensor.is_floating_point():
        if update is not None:
            raise ExportError(f"{plan.name}: the adapter updates a non-float tensor")
        return tensor
    if as_trained is not None:
        tensor = as_trained(plan.name, tensor, read_base)
    if update is not None:
        tensor = merge_update(tensor, update, read, adapter_config, plan.name)
    if experts:
        layout = layout or CheckpointLayout()
        tensor = merge_expert_update(tensor, plan.name, layout.model_name(plan.name), layout, experts, read)
    return tensor.to(plan.dtype)


def _num_experts(config) -> int | None:
    text = getattr(config, "get_text_config", lambda: config)()
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        if isinstance(getattr(text, key, None), int):
            return getattr(text, key)
    return None


def write_config(base_config: dict, out: Path, dtype: torch.dtype) -> None:
    """The base's config.json with the export's dtype and no quantization_config."""
    config = {k: v for k, v in base_config.items() if k != "quantization_config"}
    config["dtype"] = config["torch_dtype"] = DTYPE_NAMES[dtype]  # transformers 5 reads dtype; older readers torch_dtype
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def generation_settings(cfg, checkpoint: Path) -> dict:
    """GenerationConfig fields of the run's evaluation (train_lora.py's generation section; the new tokens it
    derived from the data come from run.json's data.max_new_tokens); {} for runs without one."""
    gen = getattr(cfg, "generation", None)
    if gen is None:
        return {}
    from trainkit.checkpoint_model import run_max_new_tokens
    from trainkit.generation import GenerationSettings, config_kwargs
    max_new = gen.max_length or run_max_new_tokens(checkpoint, cfg)
    if max_new is None:
        return {"num_beams": gen.num_beams, "do_sample": False}
    kwargs = config_kwargs(GenerationSettings.from_config(gen, cfg.task.max_source_length, max_new))
    kwargs.pop("use_cache", None)
    return kwargs


def write_generation_config(base_dir: Path, out: Path, tokenizer, cfg, checkpoint: Path) -> None:
    from transformers import GenerationConfig
    existing = read_json(base_dir / "generation_config.json")
    fields = {k: v for k, v in (existing or {}).items() if not k.startswith("_") and k != "transformers_version"}
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            fields[attr] = value
    fields.update(generation_settings(cfg, checkpoint))
    GenerationConfig(**fields).save_pretrained(str(out))


def load_snippet(out: str, gla: bool) -> str:
    head = "import fla; " if gla else ""
    return (f"{head}from transformers import AutoModelForCausalLM, AutoTokenizer; "
            f"model = AutoModelForCausalLM.from_pretrained('{out}'); tokenizer = AutoTokenizer.from_pretrained('{out}')")


def write_export_note(report: ExportReport, directory: Path, checkpoint: Path, base_name: str, cfg,
                      adapter_config: dict, dtype: str, base_weights: str, gla: bool) -> None:
    variant = "DoRA" if adapter_config.get("use_dora") else "rsLoRA" if adapter_config.get("use_rslora") else "LoRA"
    lines = [
        "# Exported by trainkit.export", "",
        f"- from: `{checkpoint}` ({cfg.script}, run `{cfg.paths.run_name}`)",
        f"- base: {base_name}",
        f"- adapter: {variant}, r={adapter_config.get('r')}, alpha={adapter_config.get('lora_alpha')}; merged into "
        f"{report.merged} tensors, {report.replaced} replaced by the adapter's trained copies (modules_to_save, biases)",
        f"- dtype: {dtype}; base weights: {base_weights}",
        f"- files: {', '.join(report.shards)}{' + ' + INDEX_FILE if len(report.shards) > 1 else ''}, config.json, "
        "generation_config.json, tokenizer files", "",
        "## Load it", "",
    ]
    if gla:
        lines += [GLA_LOADER_NOTE + ".", ""]
    lines += ["```python", *load_snippet("<this directory>", gla).split("; "), "```", ""]
    lines += [f"- {note}" for note in report.notes]
    (directory / "EXPORT.md").write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------------------
# distilled students: a GLA student is fla's GLA model under other names


STUDENT_TO_FLA = [  # trainkit.students' LinearLlamaForCausalLM (mixer gla) -> fla's GLAForCausalLM
    (r"^model\.embed_tokens\.", "model.embeddings."),
    (r"\.input_layernorm\.", ".attn_norm."),
    (r"\.post_attention_layernorm\.", ".mlp_norm."),
    (r"\.self_attn\.g_norm_weight$", ".attn.g_norm_swish_gate.weight"),
    (r"\.self_attn\.", ".attn."),
]
STUDENT_LOADER = ("it loads only with `import trainkit.students` before AutoModelForCausalLM.from_pretrained(DIR) "
                  "on the checkpoint itself")


def fla_gla_config(student: dict) -> dict:
    """fla's GLAConfig for a distill.py student whose mixer is GLA on every layer: the student's GLAMixer computes
    fla.layers.GatedLinearAttention (no feature map, no short convolution, no RoPE) inside Llama blocks, which
    are fla's GLABlock (RMSNorm, mixer, RMSNorm, SwiGLU MLP). ExportError naming what differs otherwise."""
    mixer = student.get("mixer")
    why = None
    if mixer != "gla":
        why = (f"its mixer is {mixer} (Discrete Mamba-2), which neither transformers nor fla implements as a model "
               "(only mixer gla students convert to fla's GLA)")
    elif student.get("attention_layers"):
        why = f"it keeps softmax attention in layers {student['attention_layers']} (a hybrid student)"
    elif student.get("attention_bias") or student.get("mlp_bias"):
        why = "its projections have biases, fla's GLA has none"
    elif student.get("hidden_act", "silu") not in ("silu", "swish"):
        why = f"its MLP activation is {student.get('hidden_act')}, fla's GLA uses swish"
    elif (student.get("gla_gate_low_rank_dim"), student.get("gla_gate_logit_normalizer")) != (16, 16.0):
        why = "its GLA gate is not fla's (gla_gate_low_rank_dim 16, gla_gate_logit_normalizer 16)"
    elif not student.get("gla_use_output_gate", True):
        why = "it has no output gate (gla_use_output_gate false)"
    if why:
        raise ExportError(f"this distill.py checkpoint holds a trainkit_linear_llama student (trainkit.students) that "
                          f"cannot be exported to a model transformers or fla loads: {why}; {STUDENT_LOADER}")
    from trainkit.gla import import_fla
    import_fla()
    from fla.models import GLAConfig
    config = GLAConfig(
        hidden_size=student["hidden_size"], expand_k=student["gla_expand_k"], expand_v=student["gla_expand_v"],
        hidden_ratio=None, intermediate_size=student["intermediate_size"],
        num_hidden_layers=student["num_hidden_layers"], num_heads=student["num_attention_heads"], num_kv_heads=None,
        feature_map=None, attn_mode="chunk", use_short_conv=False, use_output_gate=True, clamp_min=None,
        hidden_act="swish", max_position_embeddings=student["max_position_embeddings"], elementwise_affine=True,
        norm_eps=student["rms_norm_eps"], use_gk=True, use_gv=False, attn=None, use_cache=True,
        pad_token_id=student.get("pad_token_id"), bos_token_id=student.get("bos_token_id"),
        eos_token_id=student.get("eos_token_id"), tie_word_embeddings=student.get("tie_word_embeddings", False),
        initializer_range=student.get("initializer_range", 0.02), vocab_size=student["vocab_size"])
    return config.to_dict()


def student_name(name: str) -> str:
    for pattern, replacement in STUDENT_TO_FLA:
        name = re.sub(pattern, replacement, name)
    return name


def export_student(checkpoint: Path, out: Path, cfg, out_dtype: torch.dtype, dtype: str, shard_limit: int,
                   progress: bool, say: Callable[[str], None]) -> ExportReport:
    """A distill.py checkpoint (the whole student, save_pretrained) written as fla's GLA model: the same tensors
    under fla's names, cast to --dtype, streamed like the merge."""
    from safetensors import safe_open
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    student = read_json(checkpoint / "config.json")
    if not isinstance(student, dict) or student.get("model_type") != "trainkit_linear_llama":
        raise ExportError(f"{checkpoint}: a distill.py checkpoint without the student's config.json")
    fla_config = fla_gla_config(student)
    plans = [TensorPlan(student_name(p.name), p.source, p.shape, p.dtype, source_name=p.name)
             for p in plan_tensors(base_tensor_files(checkpoint), out_dtype)]
    shards = plan_shards(plans, shard_limit)
    names = shard_names(len(shards))
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    with atomic_directory(out) as staging, contextlib.ExitStack() as files, \
            tqdm(total=len(plans), desc="export", unit="tensor", disable=not progress, file=sys.stderr) as bar:
        handles = {path: files.enter_context(safe_open(str(path), "pt")) for path in {p.source for p in plans}}
        for shard, file_name in zip(shards, names):
            with open(staging / file_name, "wb") as f:
                f.write(safetensors_header(shard))
                for plan in shard:
                    tensor = handles[plan.source].get_tensor(plan.source_name)
                    write_tensor(f, tensor.to(plan.dtype) if tensor.is_floating_point() else tensor, plan)
                    bar.update(1)
        total = write_index(staging, shards, names)
        write_config(fla_config, staging, out_dtype)
        tokenizer.save_pretrained(str(staging))
        write_generation_config(checkpoint, staging, tokenizer, cfg, checkpoint)
        notes = ["distilled student (mixer gla) written as fla's GLA model (model_type gla)", GLA_LOADER_NOTE]
        report = ExportReport(out, names, len(plans), 0, 0, total, notes)
        lines = ["# Exported by trainkit.export", "",
                 f"- from: `{checkpoint}` (distill.py, run `{cfg.paths.run_name}`): the student, as fla's GLA model",
                 f"- dtype: {dtype}; files: {', '.join(names)}, config.json, generation_config.json, tokenizer files",
                 "", "## Load it", "", GLA_LOADER_NOTE + ".", "", "```python",
                 *load_snippet("<this directory>", True).split("; "), "```", ""]
        (staging / "EXPORT.md").write_text("\n".join(lines) + "\n")
    say(f"exported {checkpoint} -> {out}: the distilled student as fla's GLA model, {len(plans)} tensors, "
        f"{total / 2**20:.1f} MiB in {len(names)} file(s), {dtype}")
    say(GLA_LOADER_NOTE)
    say(f"load it with: {load_snippet(str(out), True)}")
    return report


# ---------------------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainkit.export",
        description="Merge a run's LoRA/rsLoRA/DoRA adapter into its base and write a Hugging Face checkpoint "
                    "(sharded safetensors, config, tokenizer, generation config) that "
                    "AutoModelForCausalLM.from_pretrained loads without trainkit.")
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="checkpoint-<step>/, final-checkpoint-<step>/ or best-adapter/ of a train_qlora.py or "
                             "train_lora.py run")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (new or empty)")
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES), help="dtype of the exported weights (default: bf16)")
    parser.add_argument("--max-shard-size", default="2GB", metavar="SIZE",
                        help="largest safetensors file, e.g. 2GB, 500MB, 1GiB (default: 2GB; GB = 10^9 bytes)")
    parser.add_argument("--base-weights", default="dequantized", choices=["dequantized", "original"],
                        help="4-bit runs: merge into the NF4-rounded weights the adapter was trained against "
                             "(dequantized, default) or into the base's full-precision weights (original)")
    parser.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        export_checkpoint(args.checkpoint, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
                          base_weights=args.base_weights, overwrite=args.overwrite, progress=not args.no_progress)
    except ExportError as e:
        from trainkit.cli import one_line
        print(f"error: {one_line(e, limit=600)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from trainkit.cli import run_main
    run_main(lambda: main(sys.argv[1:]))

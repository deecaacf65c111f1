"""Load a model to run from any directory a run or an export leaves, for tools that use finished
checkpoints (`python -m trainkit.generate`):

- an adapter directory (`adapter_config.json`: a run's checkpoint-<step>/, final-checkpoint-<step>/,
  best-adapter/ of train_qlora.py or train_lora.py): the training config stored with it
  (trainkit.checkpoints.checkpoint_config) rebuilds the base exactly as training did
  (trainkit.models.load_model: 4-bit where the run quantized, the same random init for a model
  built from model.config), then trainkit.adapters.load_adapter puts the adapter on it;
- a model directory (`config.json` + weights, no adapter_config.json): an export
  (`python -m trainkit.export`), a distill.py checkpoint (the student in save_pretrained form,
  model_type trainkit_linear_llama: registered by importing trainkit.students) or any HF causal LM
  saved with save_pretrained. GLA models (model_type gla) import fla (trainkit.gla.import_fla) and
  run on fla's pure-PyTorch reference backend off CUDA, as in training.

`load_checkpoint_model(path, device, dtype)` returns a LoadedModel: the model (eval mode, frozen), its
tokenizer (the directory's own when it holds one, else the run's), the GenerationSettings the run's
evaluation uses (train_lora.py's generation section; the defaults for runs that evaluate by loss;
a model directory's generation_config.json) and notes saying what was loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainkit.generation import GenerationSettings

ADAPTER_CONFIG = "adapter_config.json"
MODEL_CONFIG = "config.json"
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
STUDENT_MODEL_TYPE = "trainkit_linear_llama"  # trainkit.students.LinearLlamaConfig.model_type (not imported: it loads transformers)


class CheckpointError(ValueError):
    """A directory that holds no model this module can load: one line, naming the directory."""


@dataclass
class LoadedModel:
    model: Any                        # eval mode, frozen; a PeftModel for adapter directories
    tokenizer: Any
    settings: GenerationSettings      # what the run's evaluation generates with (see module doc)
    kind: str                         # "adapter" | "student" | "model"
    device: torch.device
    dtype: str
    config: Any = None                # the training config (adapter directories and distill checkpoints)
    notes: list[str] = field(default_factory=list)


def directory_kind(path: str | os.PathLike) -> str:
    """"adapter" or "model" (see module doc); CheckpointError for anything else."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such directory")
    if (path / ADAPTER_CONFIG).is_file():
        return "adapter"
    has_weights = any(next(path.glob(p), None) is not None for p in WEIGHT_PATTERNS)
    if (path / MODEL_CONFIG).is_file() and has_weights:
        return "model"
    raise CheckpointError(f"{path}: not a checkpoint or model directory (no {ADAPTER_CONFIG}, and no {MODEL_CONFIG} "
                          "with *.safetensors / pytorch_model*.bin weights)")


def resolve_device(name: str) -> torch.device:
    """--device: auto (cuda when available, else cpu), cpu, cuda, cuda:N; CheckpointError without CUDA."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CheckpointError(f"--device: {name!r} is not auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(f"--device {name}: CUDA is not available here (torch {torch.__version__}); use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise CheckpointError(f"--device: {name!r} is not auto, cpu, cuda or cuda:N")
    return device


def load_checkpoint_model(path: str | os.PathLike, device: str | torch.device = "cpu",
                          dtype: str | None = None) -> LoadedModel:
    """The model of an adapter or model directory (module doc), on `device`. dtype: of the weights that are
    not 4-bit; None: the run's configured dtype for adapters (its "auto": bfloat16 on GPUs, float32 on CPUs),
    "auto" for model directories."""
    path = Path(path)
    device = torch.device(device)
    kind = directory_kind(path)
    if kind == "adapter":
        loaded = _load_adapter_dir(path, device, dtype)
    else:
        loaded = _load_model_dir(path, device, dtype or "auto")
    prepare_for_generation(loaded.model)
    return loaded


def prepare_for_generation(model) -> None:
    """Eval mode, frozen, and no router logits: load_model asks MoE models for them (the training loss adds
    their aux loss), and Mixtral's aux loss fails on a cached generate() step with an attention mask."""
    model.eval()
    model.requires_grad_(False)
    config = getattr(model, "config", None)
    for cfg in {id(c): c for c in (config, getattr(config, "get_text_config", lambda: None)()) if c is not None}.values():
        if getattr(cfg, "output_router_logits", False):
            cfg.output_router_logits = False


# ---------------------------------------------------------------------------------------------- tokenizer

def _directory_tokenizer(path: Path):
    """The tokenizer saved in `path` (with a pad token), or None when it holds none."""
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    from trainkit.tokenizer import ensure_pad_token
    return ensure_pad_token(AutoTokenizer.from_pretrained(path))


# ---------------------------------------------------------------------------------------------- adapters

def _load_adapter_dir(path: Path, device: torch.device, dtype: str | None) -> LoadedModel:
    from trainkit.adapters import load_adapter
    from trainkit.checkpoints import checkpoint_config
    from trainkit.config import ConfigError
    from trainkit.models import load_model
    from trainkit.preflight import load_model_config
    from trainkit.tokenizer import load_tokenizer

    cfg = checkpoint_config(path)
    script = cfg.script
    if script == "train_qlora.py":
        quantization = cfg.quantization
        dtype = dtype or quantization.compute_dtype
    elif script == "train_lora.py":
        quantization = None
        dtype = dtype or cfg.model.dtype
    else:
        raise CheckpointError(f"{path}: an adapter directory of {script}, which writes no adapters")
    try:
        load_model_config(cfg)  # the base is reachable (a local path moved, a hub id offline): one line, not a traceback
    except ConfigError as e:
        raise CheckpointError(f"{path}: the run's base model does not load: {e}") from None
    tokenizer = _directory_tokenizer(path) or load_tokenizer(cfg)
    model, info = load_model(cfg, device, tokenizer, dtype, quantization)
    # the seed training set before apply_lora: PiSSA's fast (randomized) SVD, redone by PEFT when the adapter
    # loads, then splits the base as training did
    torch.manual_seed(cfg.training.seed)
    model = load_adapter(model, str(path), fused_forward=cfg.lora.fused_forward)
    notes = [f"{path}: {script} adapter ({cfg.lora.variant}, r={cfg.lora.r}) on {info['name']}",
             info["summary"], *info.get("notes", [])]
    if info["family"] == "gla":
        from trainkit.patches.fla import guard_adapter_paths
        notes += guard_adapter_paths(model)
    return LoadedModel(model, tokenizer, _run_settings(cfg, path), "adapter", device, info["compute_dtype"],
                       config=cfg, notes=notes)


def run_max_new_tokens(checkpoint: Path, cfg) -> int | None:
    """The new tokens per answer train_lora.py derived from its data for evaluation (run.json data.max_new_tokens,
    used when generation.max_length is unset); None when the run did not record a positive count."""
    from trainkit.checkpoints import run_info_value
    value = run_info_value(checkpoint, cfg, "data", "max_new_tokens")
    return value if isinstance(value, int) and value > 0 else None


def _run_settings(cfg, path: Path) -> GenerationSettings:
    """The GenerationSettings of the run's evaluation: train_lora.py's generation section, with the new
    tokens it derived from the data when generation.max_length is unset (run.json data.max_new_tokens);
    the defaults for the scripts that evaluate by loss."""
    if cfg.script != "train_lora.py":
        return GenerationSettings()
    gen = cfg.generation
    max_new = gen.max_length or run_max_new_tokens(path, cfg)
    if max_new is None:
        max_new = GenerationSettings.max_new_tokens  # the run's record is gone: the library default
    return GenerationSettings.from_config(gen, cfg.task.max_source_length, max_new)


# ---------------------------------------------------------------------------------------------- model dirs

def _load_model_dir(path: Path, device: torch.device, dtype: str) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM

    from trainkit.models import DTYPES
    from trainkit.runtime import resolve_dtype

    config_dict = _read_model_config(path)
    model_type = config_dict.get("model_type")
    notes: list[str] = []
    kind, train_cfg = "model", None
    if model_type == STUDENT_MODEL_TYPE:
        import trainkit.students  # noqa: F401  registers the student's model_type with the Auto classes
        kind = "student"
    gla = model_type == "gla"
    if gla:
        from trainkit.gla import import_fla
        import_fla()
    # after the imports that register the model type: AutoTokenizer reads config.json too
    tokenizer = _directory_tokenizer(path)
    if tokenizer is None:
        raise CheckpointError(f"{path}: no tokenizer saved there ({', '.join(TOKENIZER_FILES)})")
    dtype_name, reason = resolve_dtype(dtype, device)
    config = AutoConfig.from_pretrained(path)
    if gla:
        from trainkit.gla import prepare_gla_config
        notes += prepare_gla_config(config, on_cuda=device.type == "cuda")
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=DTYPES[dtype_name],
                                                 device_map={"": device})
    if gla and device.type != "cuda":
        from trainkit.patches.fla import use_reference_backend
        swapped = use_reference_backend(model)
        notes.append(f"GLA on {device.type}: pure-PyTorch reference backend ({len(swapped)} modules swapped)")
    total = sum(p.numel() for p in model.parameters())
    what = {"student": "distill.py student", "model": "model"}[kind]
    notes.insert(0, f"{path}: {what} ({model_type}), {total:,} parameters in {dtype_name} ({reason})")
    settings = _model_dir_settings(model)
    if kind == "student":
        # the student's mixers keep no generation cache and ignore attention masks (trainkit.students): each
        # step recomputes the whole sequence, one prompt at a time so that no padding enters it
        settings.use_cache, settings.batch_size = False, 1
        try:
            from trainkit.checkpoints import checkpoint_config
            train_cfg = checkpoint_config(path)
        except (FileNotFoundError, ValueError):
            train_cfg = None  # a student copied out of its run directory: the model alone is enough
    return LoadedModel(model, tokenizer, settings, kind, device, dtype_name, config=train_cfg, notes=notes)


def _read_model_config(path: Path) -> dict:
    from trainkit.fileio import read_json
    config = read_json(path / MODEL_CONFIG)
    if not isinstance(config, dict) or not config.get("model_type"):
        raise CheckpointError(f"{path / MODEL_CONFIG}: not a model config (no model_type)")
    return config


def _model_dir_settings(model) -> GenerationSettings:
    """GenerationSettings from the model's generation_config (generation_config.json of its directory):
    max_new_tokens, sampling, temperature, top_p and beams where it sets them, else the defaults (greedy)."""
    gen = getattr(model, "generation_config", None)
    settings = GenerationSettings()
    if gen is None:
        return settings
    if isinstance(getattr(gen, "max_new_tokens", None), int) and gen.max_new_tokens > 0:
        settings.max_new_tokens = gen.max_new_tokens
    if isinstance(getattr(gen, "num_beams", None), int) and gen.num_beams > 1:
        settings.num_beams = gen.num_beams
    if getattr(gen, "do_sample", False):
        settings.do_sample = True
        settings.temperature = getattr(gen, "temperature", None)
        settings.top_p = getattr(gen, "top_p", None)
    return settings

"""The config sections every training script shares, and `TrainConfig`, the root the scripts extend.

Each section is a pydantic model: a field's type, default and description are stated once, here
(README's config reference is generated from them: scripts/gen_reference.py). A script's model
(trainkit/config/qlora.py, lora.py, distill.py) subclasses a section to add or change keys and
`TrainConfig` to add sections and the rules that tie keys together (`model_validator`s).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from trainkit.config.fields import (AutoOrBool, Bool, Fraction, Int, List, NonNegativeFloat, NonNegativeInt,
                                    OptionalMapping, OptionalPositiveFloat, OptionalPositiveInt, OptionalStr, PositiveFloat,
                                    PositiveInt, Str, StrOrList, one_of, positive_or_minus_one)

DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")
Dtype = one_of(*DTYPE_CHOICES)
TRACKER_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml",
                   "aim": "aim", "clearml": "clearml", "dvclive": "dvclive"}


class ConfigModel(BaseModel):
    """A section (or the root): unknown keys are errors, values are checked by their field types."""

    model_config = ConfigDict(extra="forbid")


class PathsSection(ConfigModel):
    model_name_or_path: OptionalStr = Field(None, description="hub id or local directory of the base model; null builds a random-init model from `model.config`")
    tokenizer_name_or_path: OptionalStr = Field(None, description="tokenizer hub id or path; null: the model's, or the built-in byte-level tokenizer for a model built from config")
    data_path: Str = Field("data/tiny_corpus.jsonl", description="JSONL file, directory of JSONL files, or HF datasets id")
    data_split: Str = Field("train", description="split to read when data_path is an HF datasets id")
    output_dir: Str = Field("outputs", description="root directory that holds the run directories")
    run_name: OptionalStr = Field(None, description="run directory name under output_dir; null: the config file's name")
    best_adapter_dir: OptionalStr = Field(None, description="where the best adapter is copied; null: <run_dir>/best-adapter")
    cache_dir: OptionalStr = Field(None, description="HF cache directory for hub downloads")


class ModelSection(ConfigModel):
    config: OptionalMapping = Field(None, description="HF config kwargs (with model_type) to build a random-init model when paths.model_name_or_path is null")
    trust_remote_code: Bool = Field(False, description="allow hub models that ship their own modeling code")
    attn_implementation: one_of("sdpa", "eager", "flash_attention_2", "flash_attention_3") = Field("sdpa", description="attention kernel")
    local_files_only: Bool = Field(False, description="never contact the hub (offline machines)")


class TrainingSection(ConfigModel):
    epochs: PositiveFloat = Field(1.0, description="passes over the training split (used when max_steps is -1)")
    max_steps: Annotated[Int, positive_or_minus_one] = Field(-1, description="optimizer steps to train; -1: derive from epochs")
    seed: Int = Field(42, description="seed for init, data order, dropout")
    max_seq_length: PositiveInt = Field(512, description="tokens per sequence (packed windows or truncated rows)")
    val_split: Fraction = Field(0.05, description="fraction of rows held out for validation (deterministic by seed)")
    packing: Bool = Field(True, description="pack `text` rows into full max_seq_length windows")
    max_eval_batches: OptionalPositiveInt = Field(None, description="cap on validation batches per evaluation, counted over all processes (the same rows on any number of processes); null: all")
    max_consecutive_nonfinite: PositiveInt = Field(5, description="stop after this many consecutive optimizer steps with NaN/inf loss or gradients")
    preemption_grace_seconds: PositiveFloat = Field(25.0, description="on SIGTERM/SIGINT: seconds to finish the current optimizer step and save a checkpoint before exiting anyway (keep it below the scheduler's kill delay: SLURM KillWait, Kubernetes terminationGracePeriodSeconds, both 30 s by default)")


class OptimizationSection(ConfigModel):
    micro_batch_size: PositiveInt = Field(4, description="sequences per device per forward pass")
    gradient_accumulation_steps: PositiveInt = Field(1, description="micro batches per optimizer step")
    learning_rate: PositiveFloat = Field(2e-4, description="peak learning rate")
    lr_scheduler: one_of("cosine", "linear", "constant", "polynomial", "wsd") = Field("cosine", description="schedule after warmup")
    warmup_ratio: Fraction = Field(0.0, description="warmup as a fraction of total steps (used when warmup_steps is 0)")
    warmup_steps: NonNegativeInt = Field(0, description="warmup steps (wins over warmup_ratio when > 0)")
    min_lr_ratio: Fraction = Field(0.0, description="final lr as a fraction of the peak (cosine, polynomial, wsd)")
    decay_ratio: Fraction = Field(0.1, description="wsd: fraction of steps in the final decay")
    adam_beta1: Fraction = Field(0.9, description="AdamW beta1")
    adam_beta2: Fraction = Field(0.999, description="AdamW beta2")
    adam_epsilon: PositiveFloat = Field(1e-8, description="AdamW epsilon")
    weight_decay: NonNegativeFloat = Field(0.0, description="AdamW weight decay")
    max_grad_norm: NonNegativeFloat = Field(1.0, description="gradient clipping norm; 0 disables")


def installed_tracker(tracker: str) -> bool:
    return importlib.util.find_spec(TRACKER_MODULES[tracker]) is not None


class LoggingSection(ConfigModel):
    log_interval: PositiveInt = Field(10, description="optimizer steps between training_log lines")
    eval_interval: PositiveInt = Field(100, description="optimizer steps between evaluations")
    checkpoint_interval: PositiveInt = Field(100, description="optimizer steps between checkpoints")
    keep_top_k: PositiveInt = Field(3, description="checkpoints kept by metric_for_best (the latest is always kept too)")
    metric_for_best: Str = Field("eval_loss", description="eval_log field that ranks checkpoints")
    greater_is_better: Bool = Field(False, description="true when a larger metric_for_best is better")
    report_to: List = Field([], description="accelerate trackers: tensorboard, wandb, ...")
    progress_bar: Bool = Field(True, description="tqdm progress bar on the main process")

    @field_validator("report_to")
    @classmethod
    def known_installed_trackers(cls, report_to: list) -> list:
        for tracker in report_to:
            if tracker not in TRACKER_MODULES:
                raise ValueError(f"unknown tracker {tracker!r} ({', '.join(TRACKER_MODULES)})")
            if not installed_tracker(tracker):
                raise ValueError(f"{tracker} is not installed (pip install {TRACKER_MODULES[tracker]})")
        return report_to


class MemorySection(ConfigModel):
    gradient_checkpointing: AutoOrBool = Field("auto", description="activation checkpointing of the decoder layers (non-reentrant: recomputed in backward): auto checkpoints only as many layers as the saved activations of one micro batch need to fit activation_memory_budget_gib (measured by a probe forward at start); true: every layer; false: none")
    activation_memory_budget_gib: OptionalPositiveFloat = Field(None, description="gradient_checkpointing auto: GiB the saved activations of one micro batch may take; null: derived per process (CUDA: free memory once the model and adapters are placed, minus gradients and AdamW state of the trainable parameters, minus 10% of the device's memory; CPU: half the available RAM minus the same)")
    dataloader_num_workers: NonNegativeInt = Field(0, description="DataLoader worker processes")
    save_optimizer_state: Bool = Field(True, description="store optimizer/scheduler/RNG in checkpoints (needed for exact resume)")


class TrainConfig(ConfigModel):
    """The sections every script has. A script's model subclasses it (QLoRAConfig, LoRAConfig,
    DistillConfig); trainkit.config.load_config builds one from YAML and overrides."""

    script: OptionalStr = Field(None, description="entry point that trains this config (launch_training.sh reads it)")
    paths: PathsSection = PathsSection()
    model: ModelSection = ModelSection()
    training: TrainingSection = TrainingSection()
    optimization: OptimizationSection = OptimizationSection()
    logging: LoggingSection = LoggingSection()
    memory: MemorySection = MemorySection()

    # paths.* keys that name local data when they look like paths (trainkit.config.check_paths)
    DATA_PATH_KEYS: ClassVar[tuple[str, ...]] = ("data_path",)
    MODEL_HINT: ClassVar[str] = "a hub id or local path"
    # Keys that may change on resume (README, "Resume and config changes"); the others must match the
    # checkpoint's (trainkit.resume_check). A pattern ending in ".*" covers a whole section. Keys not
    # listed count as immutable, so a key added later is safe by default.
    RESUME_MUTABLE: ClassVar[frozenset[str]] = frozenset({
        "script", "run_dir",
        # where the run writes and reads from the cache (a checkpoint may be resumed into another run)
        "paths.output_dir", "paths.run_name", "paths.best_adapter_dir", "paths.cache_dir",
        # how the same model is loaded, not which model
        "model.local_files_only", "model.trust_remote_code", "model.attn_implementation",
        # schedule length and evaluation size
        "training.epochs", "training.max_steps", "training.max_eval_batches", "training.max_consecutive_nonfinite",
        # optimizer and schedule: applied over the state that accelerate.load_state restores
        "optimization.learning_rate", "optimization.lr_scheduler", "optimization.warmup_ratio",
        "optimization.warmup_steps", "optimization.min_lr_ratio", "optimization.decay_ratio",
        "optimization.adam_beta1", "optimization.adam_beta2", "optimization.adam_epsilon",
        "optimization.weight_decay", "optimization.max_grad_norm",
        # intervals, retention, trackers (metric_for_best and greater_is_better stay: the best so far
        # was ranked by them)
        "logging.log_interval", "logging.eval_interval", "logging.checkpoint_interval", "logging.keep_top_k",
        "logging.report_to", "logging.progress_bar",
        "memory.*",
    })

    _config_path: str | None = PrivateAttr(None)

    @model_validator(mode="before")
    @classmethod
    def empty_sections(cls, data: Any) -> Any:
        """`training:` with nothing under it is an empty section, not null."""
        if isinstance(data, dict):
            return {k: ({} if v is None and k != "script" else v) for k, v in data.items()}
        return data

    @property
    def config_path(self) -> str | None:
        """The YAML file this config was read from (run.json records it)."""
        return self._config_path

    @property
    def run_dir(self) -> Path:
        """<paths.output_dir>/<paths.run_name> (load_config fills run_name in from the file name)."""
        return Path(self.paths.output_dir) / (self.paths.run_name or "")

    def as_dict(self) -> dict:
        """The config as plain JSON values, `run_dir` included: what run.json, checkpoints and trackers
        store (through trainkit.config.public_config, which also redacts secrets)."""
        out = self.model_dump()
        out["run_dir"] = str(self.run_dir)
        return out


class LoraSection(ConfigModel):
    """The adapter keys of train_qlora.py and train_lora.py (trainkit.adapters.apply_lora reads them)."""

    r: PositiveInt = Field(16, description="LoRA rank")
    alpha: PositiveFloat = Field(32.0, description="LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) for rslora)")
    dropout: Fraction = Field(0.05, description="dropout on the LoRA input")
    target_modules: StrOrList = Field("auto", description="'auto' (preset by model family: llama, mixtral, gla, ...), a preset name, or a list of module names")
    variant: one_of("lora", "dora", "rslora") = Field("lora", description="adapter variant")
    bias: one_of("none", "all", "lora_only") = Field("none", description="train biases")
    modules_to_save: List = Field([], description="modules trained in full and saved with the adapter (e.g. [embed_tokens, lm_head] for a random-init base or new tokens)")
    fused_forward: Bool = Field(True, description="add the LoRA update through one autograd function in the base's compute dtype (bf16 on GPUs) over fp32 adapter weights (trainkit.fused_lora); false: PEFT's forward (fp32 adapter compute). DoRA always uses PEFT's")
    expert_targets: StrOrList = Field("none", description="LoRA on the routed MoE experts' fused tensors (trainkit.expert_lora; NF4 banks or bf16): none, auto (the family's preset: gate_up_proj, down_proj for mixtral, qwen2_moe, qwen3_moe, glm4_moe), or a list of expert parameter names; no dropout on experts; not with DoRA or PiSSA/OLoRA init")
    expert_r: OptionalPositiveInt = Field(None, description="rank per expert of the expert adapters (null: lora.r)")
    expert_alpha: OptionalPositiveFloat = Field(None, description="alpha of the expert adapters (null: lora.alpha * expert_r / r, the same scale as the module adapters)")
    expert_impl: one_of("trainkit", "peft") = Field("trainkit", description="trainkit: grouped LoRA GEMMs after routing over the frozen experts (NF4 or bf16); peft: PEFT's target_parameters forward (bf16 experts only; it folds W + BA per forward, a bank-sized tensor: the benchmark baseline)")

    @field_validator("expert_targets")
    @classmethod
    def known_expert_targets(cls, value):
        if isinstance(value, str) and value not in ("none", "auto"):
            value = [t.strip() for t in value.split(",") if t.strip()]
        if isinstance(value, list) and (not value or not all(isinstance(t, str) and t for t in value)):
            raise ValueError("must be none, auto, or a non-empty list of expert parameter names")
        return value

    @model_validator(mode="after")
    def experts_without_variants(self):
        if self.expert_targets != "none" and self.variant == "dora":
            raise ValueError("lora.variant dora cannot adapt the MoE experts (lora.expert_targets): PEFT's "
                             "target_parameters adapters have no DoRA; use lora or rslora, or lora.expert_targets: none")
        return self

    @property
    def expert_lora_wanted(self) -> bool:
        return self.expert_targets != "none"

    @property
    def init_lora_weights(self) -> bool | str:
        """PEFT's init_lora_weights: True, PEFT's default (train_lora.py's section adds lora.init)."""
        return True

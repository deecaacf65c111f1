"""train_lora.py's config: the shared sections, the LoRA family's adapters, the task and its
evaluation by generation."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, field_validator, model_validator

from trainkit.config.base import (ConfigModel, Dtype, LoggingSection, LoraSection, MemorySection, ModelSection,
                                  PathsSection, TrainConfig)
from trainkit.config.fields import (Bool, NonNegativeInt, OptionalPositiveInt, OptionalStr, PositiveInt, Str,
                                    one_of)

INITS = "default, gaussian, pissa, pissa_niter_<N>, olora"


def is_lora_init(value: str) -> bool:
    return value in ("default", "gaussian", "pissa", "olora") or (value.startswith("pissa_niter_") and value[12:].isdigit())


class LoRAPathsSection(PathsSection):
    data_path: OptionalStr = Field(None, description="unused by train_lora.py (the data comes from task.name / task.local_dir)")


class LoRAModelSection(ModelSection):
    dtype: Dtype = Field("auto", description="dtype of the base weights (HP_PREC: auto | bf16 | fp16 | fp32); auto: bfloat16 on GPUs with native bf16, float16 on older GPUs, float32 on CPUs; adapters train in fp32")
    attn_mode: one_of("chunk", "fused_chunk", "fused_recurrent") = Field("chunk", description="GLA kernel (fla): chunk; the removed fused_chunk maps to chunk")
    fused_swiglu: Bool = Field(False, description="GLA: fla's fused SwiGLU MLP (GLA_USE_FUSED_SWIGLU); adapters on down_proj still get gradients")
    fused_linear_cross_entropy: Bool = Field(True, description="GLA on a GPU: fla's fused linear cross-entropy for the training loss (no tokens x vocab logits: 0.45 GiB less peak in the 374M LoRA benchmark on an H200); not used when lm_head is adapted or in modules_to_save; false: the model config's own loss flags")


class LoRAAdapterSection(LoraSection):
    init: Str = Field("default", description="adapter init: default (PEFT's: A random, B zero), gaussian, pissa, pissa_niter_N (fast SVD), olora")
    pissa_fast: Bool = Field(False, description="with init pissa: fast randomized SVD (pissa_niter_<pissa_niter>) instead of a full SVD")
    pissa_niter: PositiveInt = Field(4, description="subspace iterations of the fast PiSSA SVD")

    @field_validator("init")
    @classmethod
    def known_init(cls, init: str) -> str:
        if not is_lora_init(init):
            raise ValueError(f"{init!r} is not one of {INITS}")
        return init

    @model_validator(mode="after")
    def experts_with_default_init(self):
        if self.expert_targets != "none" and self.init not in ("default", "gaussian"):
            raise ValueError(f"lora.init {self.init} cannot be used with lora.expert_targets (an SVD init of every "
                             "expert is not supported, and PEFT cannot load it): use init default or gaussian, or "
                             "lora.expert_targets: none")
        return self

    @property
    def init_lora_weights(self) -> bool | str:
        """PEFT's init_lora_weights for lora.init / lora.pissa_fast."""
        if self.init == "default":
            return True
        if self.init == "pissa" and self.pissa_fast:
            return f"pissa_niter_{self.pissa_niter}"
        return self.init


class TaskSection(ConfigModel):
    name: Str = Field("sst2", description="GLUE task (cola sst2 mrpc qqp stsb mnli qnli rte wnli; glue-tvt_<task> or <task>-tvt: "
                                          "train/validation/test carved from the public splits), samsum, spider, dart (HP_DATA)")
    local_dir: OptionalStr = Field(None, description="local copy of the data (else GLUE_LOCAL_DIR / SAMSUM_LOCAL_DIR / SPIDER_LOCAL_DIR / DART_LOCAL_DIR, else HF datasets)")
    max_train_samples: OptionalPositiveInt = Field(None, description="cap on training examples")
    max_eval_samples: OptionalPositiveInt = Field(None, description="cap on examples per validation split, evaluated during training (generation is the slow part); never caps the test splits")
    max_test_samples: OptionalPositiveInt = Field(None, description="cap on examples per test split at the final test evaluation; null: the whole split")
    max_source_length: PositiveInt = Field(512, description="prompt tokens kept; a longer prompt loses the part its task lets go (Spider: the schema's last CREATE TABLE lines; SAMSum: the dialogue's last turns; DART: the last triples; GLUE: the (longer) sentence's tail), never the question or the answer cue")
    max_target_length: PositiveInt = Field(128, description="target tokens kept for training")
    label_likelihood: Bool = Field(False, description="classification: score by the likelihood of each label's training target (\" positive\" + eos) instead of generating")
    label_likelihood_normalization: one_of("none", "mean") = Field("none", description="with label_likelihood: none ranks labels by the summed log-probability of their target tokens (the probability of the whole answer); mean by the per-token average (length-normalized)")
    evaluate_test: Bool = Field(True, description="at the end, evaluate the best adapter on the test split (when it differs from validation)")


class GenerationSection(ConfigModel):
    enabled: Bool = Field(True, description="evaluate by .generate() (EVAL_GEN); false: eval_loss only")
    max_length: OptionalPositiveInt = Field(None, description="new tokens to generate (EVAL_GEN_MAX_LENGTH); null: from the data (classification: the longest label word + eos; else the 99th percentile of the tokenized training targets + eos, plus 10 % (at least 2), capped by the model's positions after task.max_source_length), printed at start and in run.json data.max_new_tokens; with use_max_new_tokens false: prompt + new tokens (null: task.max_source_length + the number from the data)")
    min_length: NonNegativeInt = Field(0, description="minimum new tokens (EVAL_GEN_MIN_LENGTH); same meaning switch")
    use_max_new_tokens: Bool = Field(True, description="lengths count new tokens (max_new_tokens); false: legacy total length (GLA_USE_MAX_NEW_TOKENS=0)")
    num_beams: PositiveInt = Field(1, description="beam search width (EVAL_GEN_NUM_BEAMS)")
    batch_size: PositiveInt = Field(16, description="prompts per generate() call")
    force_left_pad: Bool = Field(True, description="left-pad prompts (GLA_FORCE_LEFT_PAD): batched generation needs it")


class LoRALoggingSection(LoggingSection):
    metric_for_best: Str = Field("task_score", description="eval_log field that ranks checkpoints: task_score (mean of the task's official metrics), eval_loss or one of the task's reported metrics")
    greater_is_better: Bool = Field(True, description="true when a larger metric_for_best is better (false for eval_loss)")
    verbose: Bool = Field(False, description="print backends, shapes and sample predictions (GLA_VERBOSE)")


class LoRAMemorySection(MemorySection):
    dataloader_prefetch_factor: OptionalPositiveInt = Field(None, description="batches prefetched per worker (with workers)")
    dataloader_pin_memory: Bool = Field(True, description="pinned host memory for batches on GPU")
    dataloader_persistent_workers: Bool = Field(False, description="keep DataLoader workers between epochs")
    eval_accumulation_steps: OptionalPositiveInt = Field(None, description="accepted for earlier launchers (EVAL_ACCUMULATION_STEPS); no effect: predictions are gathered once per split")


class LoRAConfig(TrainConfig):
    paths: LoRAPathsSection = LoRAPathsSection()
    model: LoRAModelSection = LoRAModelSection()
    logging: LoRALoggingSection = LoRALoggingSection()
    memory: LoRAMemorySection = LoRAMemorySection()
    lora: LoRAAdapterSection = LoRAAdapterSection()
    task: TaskSection = TaskSection()
    generation: GenerationSection = GenerationSection()

    DATA_PATH_KEYS: ClassVar[tuple[str, ...]] = ()
    MODEL_HINT: ClassVar[str] = "a hub id or local path (e.g. fla-hub/gla-1.3B-100B)"
    # Generation settings that decide the task score stay: the best so far was ranked by them.
    RESUME_MUTABLE: ClassVar[frozenset[str]] = TrainConfig.RESUME_MUTABLE | {
        "lora.dropout", "model.dtype", "model.attn_mode", "model.fused_swiglu", "model.fused_linear_cross_entropy",
        "task.max_eval_samples",
        "task.max_test_samples", "task.evaluate_test", "generation.batch_size", "generation.force_left_pad", "logging.verbose"}

    @model_validator(mode="after")
    def consistent(self) -> LoRAConfig:
        from trainkit.tasks import get_task

        try:
            task = get_task(self.task.name)
        except (KeyError, ValueError) as e:
            raise ValueError(f"task.name: {e.args[0] if e.args else e}") from None
        if self.task.label_likelihood and task.kind != "classification":
            raise ValueError(f"task.label_likelihood: {task.name} is not a classification task")
        if self.lora.init.startswith("pissa") and self.lora.variant == "dora":
            raise ValueError("lora.init: PiSSA init cannot be combined with lora.variant dora")
        metric = self.logging.metric_for_best
        if metric not in ("task_score", "eval_loss"):
            from trainkit.tasks.official import LOWER_IS_BETTER, reported_metrics
            try:
                allowed = reported_metrics(self.task.name)
            except KeyError:
                allowed = ()
            if metric not in allowed:
                raise ValueError(f"logging.metric_for_best: {metric!r} is not task_score, eval_loss or one of {', '.join(allowed)}")
            if metric in LOWER_IS_BETTER and self.logging.greater_is_better:
                raise ValueError(f"logging.greater_is_better: must be false when metric_for_best is {metric} (lower is better)")
        if metric == "task_score" and not self.generation.enabled and not self.task.label_likelihood:
            raise ValueError("logging.metric_for_best: task_score needs generation.enabled or task.label_likelihood (or use eval_loss)")
        if metric == "eval_loss" and self.logging.greater_is_better:
            raise ValueError("logging.greater_is_better: must be false when metric_for_best is eval_loss")
        return self

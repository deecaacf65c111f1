"""distill.py's config: the shared sections (the model is the TEACHER), the student, the KD loss,
stage 1 text data and stage 2 instruction data."""

from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import Field, field_validator, model_validator

from trainkit.config.base import (ConfigModel, Dtype, LoggingSection, ModelSection, OptimizationSection, PathsSection,
                                  TrainConfig, TrainingSection)
from trainkit.config.fields import (Bool, Float, Fraction, Int, List, Mapping, NonNegativeFloat, NonNegativeInt,
                                    OptionalMapping, OptionalPositiveFloat, OptionalPositiveInt, OptionalStr, PositiveFloat, PositiveInt,
                                    Str, check, one_of, unit_interval)

MIXERS = ("discrete_mamba2", "gla")
# eval_log fields that rank checkpoints -> greater_is_better
EVAL_METRICS = {"eval_kd_loss": False, "eval_loss": False, "perplexity": False, "eval_top1_agreement": True}


class DistillPathsSection(PathsSection):
    model_name_or_path: OptionalStr = Field(None, description="the TEACHER: hub id or local directory (e.g. meta-llama/Llama-3.1-8B-Instruct); null builds model.config")
    data_path: Str = Field("data/distill/pretrain", description="stage 1 text: JSONL / JSONL.gz file, directory or glob of shards, or an HF datasets id")
    eval_data_path: OptionalStr = Field(None, description="held-out text for evaluation (same forms); null: no evaluation")


class DistillModelSection(ModelSection):
    config: OptionalMapping = Field(None, description="HF config kwargs (with model_type) of a random-init TEACHER when paths.model_name_or_path is null")


class DistillTrainingSection(TrainingSection):
    max_seq_length: PositiveInt = Field(2048, description="tokens per window (windows of max_seq_length + 1 give inputs and shifted labels)")
    max_eval_batches: OptionalPositiveInt = Field(8, description="cap on validation batches per evaluation, counted over all processes (the same windows on any number); null: all")


class DistillOptimizationSection(OptimizationSection):
    learning_rate: PositiveFloat = Field(1e-3, description="peak learning rate (stage 1)")
    lr_scheduler: one_of("wsd", "cosine", "linear", "constant") = Field("wsd", description="schedule of each stage: warmup, stable, decay")
    warmup_ratio: Fraction = Field(0.02, description="warmup as a fraction of each stage's steps")
    min_lr_ratio: Fraction = Field(0.1, description="lr at the end of each stage's decay, as a fraction of the peak")
    decay_ratio: Fraction = Field(0.2, description="wsd: fraction of each stage's steps in the final decay")
    adam_beta2: Fraction = Field(0.95, description="AdamW beta2")
    weight_decay: NonNegativeFloat = Field(0.1, description="AdamW weight decay (not on norms, biases, embeddings)")


class DistillLoggingSection(LoggingSection):
    metric_for_best: Str = Field("eval_kd_loss", description="eval_log field that ranks checkpoints (eval_kd_loss, eval_loss, eval_top1_agreement)")


class TeacherSection(ConfigModel):
    device: Str = Field("same", description="'same' (the student's device) or a device for the frozen teacher, e.g. cuda:1 (one process; under several: same or cpu)")
    dtype: Dtype = Field("auto", description="teacher weights dtype; auto: bfloat16 on GPUs with native bf16, float16 on older GPUs, float32 on CPUs")
    shard: Bool = Field(False, description="FSDP runs (--accelerate-config fsdp) with device 'same': shard the teacher's decoder layers and embeddings over the processes (forward only; lm_head stays whole); false: every process holds the whole teacher")


class StudentSection(ConfigModel):
    mixer: one_of(*MIXERS) = Field("discrete_mamba2", description="linear-attention mixer replacing softmax attention")
    attention_layers: List = Field([], description="layer indices that keep the teacher's softmax attention (hybrid student)")
    init_from_teacher: Bool = Field(True, description="copy embeddings, norms, MLPs, lm_head and (where shapes allow) mixer projections from the teacher")
    freeze_mlp: Bool = Field(False, description="freeze every MLP (train mixers, norms, embeddings, head)")
    freeze_replaced_layers: Bool = Field(False, description="freeze the teacher attention layers kept by attention_layers")
    mixer_options: Mapping = Field({}, description="extra mixer hyperparameters (trainkit/students.py)")
    dtype: one_of("bfloat16", "float32") = Field("float32", description="student master weights (bf16 compute comes from accelerate mixed precision)")

    @field_validator("attention_layers")
    @classmethod
    def layer_indices(cls, layers: list) -> list:
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
            raise ValueError(f"expected non-negative layer indices, got {layers!r}")
        return layers


class KDSection(ConfigModel):
    temperature: PositiveFloat = Field(1.0, description="softmax temperature T of both distributions (the KD loss is scaled by T^2)")
    top_k: OptionalPositiveInt = Field(None, description="keep only the teacher's top-k logits (renormalised) in the KD loss; null: full vocabulary")
    ce_weight: Annotated[Float, unit_interval] = Field(0.0, description="loss = (1 - ce_weight) * KD + ce_weight * hard-label cross-entropy")
    chunk_size: OptionalPositiveInt = Field(None, description="tokens per chunk of the KD loss (extra memory ~ 3 x chunk_size x vocab x 4 bytes); null: automatic (1,024 at vocab 128,256)")
    loss: one_of("chunked", "naive") = Field("chunked", description="chunked (memory-lean) or naive (full logits; the baseline)")


class DataSection(ConfigModel):
    text_field: Str = Field("text", description="field holding the text in rows of stage 1 data")
    dataset_config: OptionalStr = Field(None, description="HF datasets config name (e.g. sample-10BT for FineWeb-Edu)")
    streaming: Bool = Field(False, description="stream HF datasets instead of downloading them whole")
    shuffle_buffer: NonNegativeInt = Field(0, description="windows shuffled in a buffer of this size (0: in order)")
    estimate_rows: PositiveInt = Field(2000, description="rows tokenized to estimate windows per epoch of large or streamed data")


class Stage2Section(ConfigModel):
    enabled: Bool = Field(False, description="run stage 2 (instruction data) after stage 1")
    data_path: OptionalStr = Field(None, description="stage 2 data: `messages` or `prompt`/`response` rows (rendered with the chat template), or `text`")
    data_split: Str = Field("train", description="split when data_path is an HF datasets id")
    epochs: PositiveFloat = Field(1.0, description="passes over the stage 2 data: steps = tokens x epochs / tokens per step")
    max_steps: Annotated[Int, check(lambda v: v > 0 or v == -1, "must be > 0 or -1")] = Field(-1, description="stage 2 steps; -1: from tokens x epochs")
    learning_rate: OptionalPositiveFloat = Field(None, description="stage 2 peak lr; null: optimization.learning_rate")


class DistillConfig(TrainConfig):
    paths: DistillPathsSection = DistillPathsSection()
    model: DistillModelSection = DistillModelSection()
    training: DistillTrainingSection = DistillTrainingSection()
    optimization: DistillOptimizationSection = DistillOptimizationSection()
    logging: DistillLoggingSection = DistillLoggingSection()
    teacher: TeacherSection = TeacherSection()
    student: StudentSection = StudentSection()
    distill: KDSection = KDSection()
    data: DataSection = DataSection()
    stage2: Stage2Section = Stage2Section()

    DATA_PATH_KEYS: ClassVar[tuple[str, ...]] = ("data_path", "eval_data_path")
    MODEL_HINT: ClassVar[str] = "the teacher (hub id or local path)"
    # Not the stage lengths (training.max_steps/epochs, stage2.max_steps/epochs, data.estimate_rows): the
    # staged schedule runs on the global step, so a stage of another length shifts every later stage.
    RESUME_MUTABLE: ClassVar[frozenset[str]] = (TrainConfig.RESUME_MUTABLE - {"training.epochs", "training.max_steps"}) | {
        "stage2.learning_rate", "teacher.device", "teacher.dtype", "teacher.shard", "distill.chunk_size", "distill.loss"}

    @model_validator(mode="after")
    def consistent(self) -> DistillConfig:
        if self.stage2.enabled and not self.stage2.data_path:
            raise ValueError("stage2.data_path: required when stage2.enabled is true")
        metric = self.logging.metric_for_best
        if metric not in EVAL_METRICS:
            raise ValueError(f"logging.metric_for_best: {metric!r} is not one of {', '.join(EVAL_METRICS)}")
        if self.logging.greater_is_better != EVAL_METRICS[metric]:
            raise ValueError(f"logging.greater_is_better: must be {str(EVAL_METRICS[metric]).lower()} for {metric}")
        if self.optimization.warmup_ratio + self.optimization.decay_ratio > 1:
            raise ValueError("optimization.decay_ratio: warmup_ratio + decay_ratio must be <= 1")
        return self

"""train_qlora.py's config: the shared sections, LoRA adapters and 4-bit quantization."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, model_validator

from trainkit.config.base import (ConfigModel, Dtype, LoggingSection, LoraSection, TrainConfig)
from trainkit.config.fields import Bool, PositiveInt, one_of

EVAL_METRICS = ("eval_loss", "perplexity")  # what train_qlora.py's evaluation logs


class QuantizationSection(ConfigModel):
    load_in_4bit: Bool = Field(True, description="quantize the base model's linear layers with bitsandbytes")
    quant_type: one_of("nf4", "fp4") = Field("nf4", description="4-bit data type")
    double_quant: Bool = Field(True, description="quantize the quantization constants too (saves ~0.4 bit/param)")
    compute_dtype: Dtype = Field("auto", description="dtype of matmuls and of the non-quantized weights; auto: bfloat16 on GPUs with native bf16, float16 on older GPUs, float32 on CPUs (bf16 is emulated, several times slower, on most)")
    quantize_moe_experts: Bool = Field(True, description="quantize fused 3-D MoE expert tensors too (bitsandbytes leaves them in bf16); only with load_in_4bit: with load_in_4bit false every weight stays in compute_dtype")
    quantize_experts_on_load: Bool = Field(True, description="quantize experts tensor by tensor while the checkpoint loads, so a 100B MoE never sits on the GPU in bf16 (false: after loading)")


class QLoRALoggingSection(LoggingSection):
    expert_stats_interval: PositiveInt = Field(10, description="optimizer steps between MoE router statistics snapshots")


class QLoRAConfig(TrainConfig):
    logging: QLoRALoggingSection = QLoRALoggingSection()
    lora: LoraSection = LoraSection()
    quantization: QuantizationSection = QuantizationSection()

    RESUME_MUTABLE: ClassVar[frozenset[str]] = TrainConfig.RESUME_MUTABLE | {
        "lora.dropout", "logging.expert_stats_interval", "quantization.compute_dtype",
        "quantization.quantize_experts_on_load"}

    @model_validator(mode="after")
    def known_metric(self) -> QLoRAConfig:
        if self.logging.metric_for_best not in EVAL_METRICS:
            raise ValueError(f"logging.metric_for_best: {self.logging.metric_for_best!r} is not one of {', '.join(EVAL_METRICS)}")
        return self

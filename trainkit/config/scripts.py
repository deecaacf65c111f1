"""Which config model each entry point reads: the launcher validates a config against the model of
the script it names (`script:`), before anything starts."""

from __future__ import annotations

from trainkit.config.base import TrainConfig
from trainkit.config.distill import DistillConfig
from trainkit.config.lora import LoRAConfig
from trainkit.config.qlora import QLoRAConfig

SCRIPT_CONFIGS: dict[str, type[TrainConfig]] = {
    "train_qlora.py": QLoRAConfig,
    "train_lora.py": LoRAConfig,
    "distill.py": DistillConfig,
}

"""What bench_lora.py, bench_qlora.py and bench_distill.py share: the trainkit config of the project side
(--checkpointing, --set overrides on top of the benchmark's settings and the config defaults), a record
of the activation checkpointing that actually ran, and the tokenizer stand-in that
trainkit.models.load_model needs for a random-init model."""

from __future__ import annotations

import argparse
import sys


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpointing", default=None,
                        help="memory.gradient_checkpointing of the trainkit side (a value the config field accepts: "
                             "auto, true, false); default: the config default")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="any other trainkit config key for the trainkit side (repeatable), e.g. lora.dropout=0.05")


def trainkit_config(raw: dict, args, config_class):
    """The validated config of the trainkit side: the benchmark's `raw` settings, then --checkpointing and
    --set (as command-line overrides of the training scripts), the config defaults for the rest."""
    from trainkit.config import ConfigError, apply_overrides, validate
    overrides = [f"memory.gradient_checkpointing={args.checkpointing}"] if args.checkpointing is not None else []
    try:
        return validate(apply_overrides(raw, overrides + list(args.set), config_class), config_class)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)


def checkpointed_layers(model) -> dict:
    """How many decoder layers have activation checkpointing switched on, of how many: counted on the model
    (the outermost transformers GradientCheckpointingLayer modules), whatever policy chose it."""
    from transformers.modeling_layers import GradientCheckpointingLayer
    flags, inside = [], ()
    for name, module in model.named_modules():
        if isinstance(module, GradientCheckpointingLayer) and not name.startswith(inside):
            flags.append(bool(module.gradient_checkpointing))
            inside = (*inside, name + ".")
    return {"checkpointed_layers": sum(flags), "decoder_layers": len(flags)}


class VocabOnly:
    """load_model needs only the vocabulary size and special ids of a tokenizer for a random-init model."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __init__(self, vocab: int):
        self.vocab = vocab

    def __len__(self) -> int:
        return self.vocab

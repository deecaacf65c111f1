"""What bench_lora.py, bench_qlora.py and bench_distill.py share: the trainkit config of the project side
(--checkpointing, --set overrides on top of the benchmark's settings and the config defaults), its
activation checkpointing applied as the scripts apply it, a record of the checkpointing that actually
ran, and the tokenizer stand-in that
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
    (trainkit.models.decoder_layers), whatever policy or recipe chose it."""
    from trainkit.models import decoder_layers
    flags = [bool(layer.gradient_checkpointing) for layer in decoder_layers(model)]
    return {"checkpointed_layers": sum(flags), "decoder_layers": len(flags)}


def apply_checkpointing(model, cfg, device, tokens: int, loss_fn=None) -> dict:
    """memory.gradient_checkpointing on the trainkit side as the training scripts apply it (after the adapters,
    for `tokens` tokens per micro batch); returns the row's record: the policy's estimate and budget for auto."""
    from trainkit.models import apply_activation_checkpointing
    record = apply_activation_checkpointing(model, cfg.memory.gradient_checkpointing, device=device, tokens=tokens,
                                            trainable=[p for p in model.parameters() if p.requires_grad],
                                            budget_gib=cfg.memory.activation_memory_budget_gib, loss_fn=loss_fn)
    return {"checkpointing_estimated_gib": record["estimated_gib"], "checkpointing_budget_gib": record["budget_gib"]}


class VocabOnly:
    """load_model needs only the vocabulary size and special ids of a tokenizer for a random-init model."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __init__(self, vocab: int):
        self.vocab = vocab

    def __len__(self) -> int:
        return self.vocab

"""Tokenizers: the built-in byte-level one (no downloads) and loading the configured one.

`load_tokenizer(cfg)` picks, in order: `paths.tokenizer_name_or_path`, the model's own
tokenizer (`paths.model_name_or_path`), or the byte-level tokenizer for a model built from
`model.config`. The result always has a pad token.
"""

from __future__ import annotations

from trainkit.cli import one_line
from trainkit.config import ConfigError
from trainkit.config.base import TrainConfig

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
SYSTEM_TOKEN = "<|system|>"
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, SYSTEM_TOKEN]

# Each turn: "<|role|>\n{content}\n"; an assistant turn ends with eos instead of "\n", so a
# tuned model learns to stop and its labelled span is exactly content + eos.
# `{% generation %}` marks what `return_assistant_tokens_mask` reports.
BYTE_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' ~ message['role'] ~ ': expected system, user or assistant') }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] ~ '<|endoftext|>' }}{% endgeneration %}"
    "{% else %}"
    "{{ '<|' ~ message['role'] ~ '|>\n' ~ message['content'] ~ '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map of each byte to a printable character (what the ByteLevel pre-tokenizer emits)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(keep, chars)}


def build_byte_level_tokenizer():
    """256 byte tokens (ids 0-255, id = byte value) + 5 special tokens (ids 256-260)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # Token id == byte value: easy to read, and stable across library versions.
    table = _bytes_to_unicode()
    assert set(table.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    vocab = {table[b]: b for b in range(256)}
    # BPE without merges = one token per byte. use_regex=False: the GPT-2 word split only
    # matters for merges, and skipping it keeps offsets simple and tokenization faster.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[USER_TOKEN, ASSISTANT_TOKEN, SYSTEM_TOKEN],
        clean_up_tokenization_spaces=False,  # lossless decode
        model_max_length=1 << 30,  # no length warnings: data.py truncates/packs itself
        padding_side="right",
    )
    fast.chat_template = BYTE_CHAT_TEMPLATE
    return fast


def ensure_pad_token(tokenizer):
    """Give the tokenizer a pad token: its eos (labels mask padding anyway), else unk, else a new one."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        elif getattr(tokenizer, "unk_token", None) is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:  # grows the vocab: vocab_size_for() reports it so the model can resize
            tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return tokenizer


def load_tokenizer(cfg: TrainConfig):
    """The configured tokenizer (see module doc); ConfigError naming the key if it cannot load."""
    paths = cfg.paths
    if paths.tokenizer_name_or_path:
        key, source = "paths.tokenizer_name_or_path", paths.tokenizer_name_or_path
    elif paths.model_name_or_path:
        key, source = "paths.model_name_or_path", paths.model_name_or_path
    else:
        return build_byte_level_tokenizer()

    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source,
            cache_dir=paths.cache_dir,
            local_files_only=cfg.model.local_files_only,
            trust_remote_code=cfg.model.trust_remote_code,
        )
    except Exception as e:  # OSError, ValueError, hub errors: all mean "cannot use this"
        raise ConfigError(f"{key}: cannot load tokenizer from {source}: {one_line(e)}") from None
    if isinstance(tokenizer, bool) or not hasattr(tokenizer, "encode"):
        raise ConfigError(f"{key}: cannot load tokenizer from {source}: got {type(tokenizer).__name__}")
    return ensure_pad_token(tokenizer)


def vocab_size_for(tokenizer) -> int:
    """Embedding rows a model built from config needs (added tokens included)."""
    return len(tokenizer)

"""Rows of a data source as documents of text, and documents as token ids (for packed windows).

A row is read by its `text_field`, or (text_field=None) by its own columns: `text`, chat
`messages`, or `prompt` + `response` (or `completion`), rendered with the tokenizer's chat
template when it has one, else as "User: ...\\nAssistant: ..." lines.
"""

from __future__ import annotations

import numpy as np

from trainkit.cli import one_line
from trainkit.config import ConfigError
from trainkit.data import RESPONSE_KEYS, detect_format, token_ids

TOKENIZE_BATCH = 256      # rows tokenized per tokenizer call


def plain_chat(messages: list[dict]) -> str:
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def render_row(row: dict, tokenizer, text_field: str | None = "text", where: str = "row", key: str = "data_path") -> str:
    """One row as one document of text (see module doc); ConfigError naming `where` if it cannot."""
    if text_field is not None:
        value = row.get(text_field)
        if not isinstance(value, str):
            got = "no" if value is None else f"a {type(value).__name__} in the"
            raise ConfigError(f"{key}: {where} has {got} `{text_field}` field (fields: {', '.join(sorted(row)) or 'none'})")
        return value
    try:
        fmt = detect_format(row.keys())
    except ConfigError:
        raise ConfigError(f"{key}: {where}: unknown row format (fields: {', '.join(sorted(row)) or 'none'}); "
                          "expected `text`, `messages`, or `prompt` and `response`") from None
    if fmt == "text":
        if not isinstance(row["text"], str):
            raise ConfigError(f"{key}: {where}: `text` must be a string (got {type(row['text']).__name__})")
        return row["text"]
    if fmt == "prompt_response":
        response = next(row[k] for k in RESPONSE_KEYS if k in row)
        if not isinstance(row["prompt"], str) or not isinstance(response, str):
            raise ConfigError(f"{key}: {where}: `prompt` and `response` must be strings")
        messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": response}]
    else:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs):
            raise ConfigError(f"{key}: {where}: `messages` must be a non-empty list of {{role, content}} strings")
        messages = [{"role": m["role"], "content": m["content"]} for m in msgs]
    if not getattr(tokenizer, "chat_template", None):
        return plain_chat(messages)
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as e:  # jinja errors: unknown roles, bad alternation, ...
        raise ConfigError(f"{key}: {where}: chat template failed: {one_line(e)}") from None


def eos_id(tokenizer, key: str) -> int:
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"{key}: the tokenizer has no eos token, needed to join documents into windows")
    return int(tokenizer.eos_token_id)


def tokenize_documents(texts: list[str], tokenizer, eos: int) -> list[np.ndarray]:
    """Each text's ids (no special tokens added) + eos, unless the ids already end with eos."""
    out = []
    for ids in token_ids(tokenizer, texts)["input_ids"]:
        if not ids or ids[-1] != eos:
            ids = list(ids) + [eos]
        out.append(np.asarray(ids, dtype=np.int64))
    return out

"""Datasets for causal-LM fine-tuning: load rows, split, tokenize, pack, collate.

Row formats (detected from the columns):
  text                   continued pre-training: documents + eos, packed into full windows
  messages               chat: [{role, content}, ...] through the tokenizer's chat template,
                         loss only on assistant turns
  prompt / response      loss only on the response (also accepts `completion` for `response`)

The train/validation split is made on rows, before tokenization, from `training.seed`, so it
is the same every run and no document is cut across the two. Everything is built in memory
(`keep_in_memory=True`): no cache files can be shared wrongly between tokenizers or lengths,
and a few MB take seconds.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from trainkit.config import ConfigError, looks_local
from trainkit.cli import one_line
from trainkit.config.base import TrainConfig, TrainingSection
from trainkit.data_sources import iter_jsonl_rows, jsonl_files, load_hf

IGNORE_INDEX = -100
FORMATS = ("text", "messages", "prompt_response")
RESPONSE_KEYS = ("response", "completion")
MAP_BATCH = 1000


# ---------------------------------------------------------------------------------- loading

WHERE = "_where"  # column with each row's location ("FILE line N"), for errors that come up later


def load_rows(cfg: TrainConfig):
    """The raw rows of `paths.data_path` (JSONL file, directory of *.jsonl[.gz], or HF datasets id),
    with a `_where` column naming each row's file and line (or dataset row) for later errors."""
    paths = cfg.paths
    source = paths.data_path
    local = Path(os.path.expanduser(source))
    if local.is_dir():
        files = jsonl_files(local)
        if not files:
            found = sorted(p.name for p in local.iterdir())[:5]
            raise ConfigError(f"paths.data_path: no *.jsonl or *.jsonl.gz files in directory {source}"
                              f" (found: {', '.join(found) if found else 'nothing'})")
    elif local.is_file():
        files = [local]
    elif looks_local(source):
        raise ConfigError(f"paths.data_path: no such file or directory: {source}")
    else:
        ds = load_hf(source, split=paths.data_split or "train", cache_dir=paths.cache_dir,
                     local_files_only=cfg.model.local_files_only, key="paths.data_path", split_key="paths.data_split")
        if len(ds) == 0:
            raise ConfigError(f"paths.data_path: dataset {source!r} split {paths.data_split!r} has no rows")
        return ds.add_column(WHERE, [f"{source} row {i}" for i in range(len(ds))])
    rows, wheres = [], []
    for f in files:
        for _, where, row in iter_jsonl_rows(f, "paths.data_path"):
            rows.append(row)
            wheres.append(where)
    if not rows:
        raise ConfigError(f"paths.data_path: {source} holds no rows (empty file or only blank lines)")
    return _rows_to_dataset(rows, wheres)


FORMAT_NAMES = {"text": "a `text` row", "messages": "a `messages` (chat) row", "prompt_response": "a `prompt`/`response` row"}


def _rows_to_dataset(rows: list[dict], wheres: list[str]):
    """Only the columns of the file's one format, normalized, so arrow never sees mixed schemas."""
    import datasets

    fmt = None
    for row, where in zip(rows, wheres):
        try:
            row_fmt = detect_format(row.keys())
        except ConfigError:
            raise ConfigError(f"paths.data_path: {where}: unknown row format (columns: {', '.join(sorted(row)) or 'none'}); "
                              "expected `text`, `messages`, or `prompt` and `response`") from None
        if fmt is None:
            fmt, first = row_fmt, where
        elif row_fmt != fmt:
            raise ConfigError(f"paths.data_path: {where} is {FORMAT_NAMES[row_fmt]}, but {first} is "
                              f"{FORMAT_NAMES[fmt]}: use one format per dataset")
    if fmt == "text":
        return datasets.Dataset.from_dict({"text": _column(rows, wheres, ("text",)), WHERE: wheres})
    if fmt == "prompt_response":
        return datasets.Dataset.from_dict({"prompt": _column(rows, wheres, ("prompt",)),
                                           "response": _column(rows, wheres, RESPONSE_KEYS), WHERE: wheres})
    messages = []
    for row, where in zip(rows, wheres):
        msgs = row.get("messages")
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                 and isinstance(m.get("content"), str) for m in msgs):
            raise ConfigError(f"paths.data_path: {where}: `messages` must be a list of {{role, content}} strings")
        messages.append([{"role": m["role"], "content": m["content"]} for m in msgs])
    return datasets.Dataset.from_dict({"messages": messages, WHERE: wheres})


def _column(rows: list[dict], wheres: list[str], keys: tuple[str, ...]) -> list[str]:
    """The string under the first of `keys` each row has; ConfigError naming the row's line otherwise."""
    out = []
    for row, where in zip(rows, wheres):
        key = next((k for k in keys if k in row), keys[0])
        value = row.get(key)
        if not isinstance(value, str):
            got = "missing" if key not in row else type(value).__name__
            raise ConfigError(f"paths.data_path: {where}: `{key}` must be a string (got {got})")
        out.append(value)
    return out


def detect_format(columns) -> str:
    """'messages', 'prompt_response' or 'text' from the column names; ConfigError otherwise."""
    columns = set(columns)
    if "messages" in columns:
        return "messages"
    if "prompt" in columns and any(k in columns for k in RESPONSE_KEYS):
        return "prompt_response"
    if "text" in columns:
        return "text"
    found = ", ".join(sorted(columns)) or "none"
    raise ConfigError(f"paths.data_path: unknown row format (columns: {found}); expected `text`, `messages`, or `prompt` and `response`")


# ---------------------------------------------------------------------------------- split

def split_indices(n_rows: int, val_split: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic row split: validation gets round(n*val_split) rows, at least 1 (when
    val_split > 0 and n >= 2) and never all of them. Both lists in ascending order."""
    if val_split <= 0 or n_rows < 2:
        return list(range(n_rows)), []
    n_val = min(max(1, int(round(n_rows * val_split))), n_rows - 1)
    perm = np.random.RandomState(seed).permutation(n_rows)  # legacy RandomState: stable across numpy versions
    val = sorted(int(i) for i in perm[:n_val])
    train = sorted(int(i) for i in perm[n_val:])
    return train, val


# ---------------------------------------------------------------------------------- tokenize

def _tokenizer_fingerprint(tokenizer, *extra) -> str:
    h = hashlib.sha256()
    for part in (type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer),
                 getattr(tokenizer, "chat_template", None), tokenizer.eos_token_id, *extra):
        h.update(repr(part).encode())
    return h.hexdigest()[:16]


def token_ids(tokenizer, texts: list[str], offsets: bool = False, specials: bool = False):
    """The tokenizer's ids of `texts` (no attention mask), with special tokens and offsets on request."""
    return tokenizer(texts, add_special_tokens=specials, return_offsets_mapping=offsets,
                     return_attention_mask=False, verbose=False)


def _tokenize_text(batch, tokenizer, eos: list[int]):
    return {"input_ids": [ids + eos for ids in token_ids(tokenizer, batch["text"])["input_ids"]]}


def _label_spans(ids, offsets, spans, max_len):
    """Truncated example whose labels are the ids of tokens overlapping a char span [a, b)
    (IGNORE_INDEX elsewhere); `_truncated` tells whether anything was cut."""
    labels = [tok if e > s and any(s < b and e > a for a, b in spans) else IGNORE_INDEX
              for tok, (s, e) in zip(ids, offsets)]
    return {"input_ids": ids[:max_len], "labels": labels[:max_len], "attention_mask": [1] * min(len(ids), max_len),
            "_truncated": len(ids) > max_len}


def _collect(examples):
    return {k: [ex[k] for ex in examples] for k in ("input_ids", "labels", "attention_mask", "_truncated")}


def _tokenize_prompt_response(batch, tokenizer, max_len, eos):
    full = [p + r for p, r in zip(batch["prompt"], batch["response"])]
    # Specials on: a tokenizer that adds bos (Llama) gets it; bos has an empty span, so it is masked.
    enc = token_ids(tokenizer, full, offsets=True, specials=True)
    examples = []
    for ids, offs, p, text in zip(enc["input_ids"], enc["offset_mapping"], batch["prompt"], full):
        # Tokens holding any response character are targets, and so is the appended eos (learn to stop).
        ids = list(ids) + eos
        offs = list(offs) + [(len(text), len(text) + 1)] * len(eos)
        examples.append(_label_spans(ids, offs, [(len(p), len(text) + 1)], max_len))
    return _collect(examples)


def _render_chat(tokenizer, messages):
    """Full chat text and the char spans of each assistant turn (with its end-of-turn tokens)."""
    def render(msgs, gen):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    full = render(messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start_text = render(messages[:i], True) if i else ""
        end_text = render(messages[: i + 1], False)
        if full.startswith(start_text) and full.startswith(end_text) and len(end_text) > len(start_text):
            spans.append((len(start_text), len(end_text)))
        else:
            # Templates that rewrite earlier turns (e.g. drop reasoning) are not prefix-stable:
            # fall back to the assistant's content itself, searched after the last span.
            at = full.find(m["content"], spans[-1][1] if spans else 0)
            if at >= 0 and m["content"]:
                spans.append((at, at + len(m["content"])))
    return full, spans


def _tokenize_messages(batch, tokenizer, max_len):
    texts, spans = [], []
    for msgs, where in zip(batch["messages"], batch[WHERE]):
        try:
            text, sp = _render_chat(tokenizer, msgs)
        except Exception as e:  # jinja errors: unknown roles, bad alternation, ...
            raise ConfigError(f"paths.data_path: {where}: chat template failed: {one_line(e)}") from None
        texts.append(text)
        spans.append(sp)
    enc = token_ids(tokenizer, texts, offsets=True)  # the template itself holds bos/special tokens
    return _collect([_label_spans(list(ids), list(offs), sp, max_len)
                     for ids, offs, sp in zip(enc["input_ids"], enc["offset_mapping"], spans)])


def _int_lists(arr_2d: np.ndarray):
    import pyarrow as pa

    n, width = arr_2d.shape
    return pa.FixedSizeListArray.from_arrays(pa.array(arr_2d.reshape(-1), pa.int64()), width).cast(pa.list_(pa.int64()))


def _pack(tokenized, max_len: int, keep_partial: bool):
    """One stream of all documents cut into windows of exactly max_len; the tail is dropped
    (kept as one shorter window only when `keep_partial` and no full window exists)."""
    import datasets
    import pyarrow as pa

    flat = tokenized.data.column("input_ids").combine_chunks().flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    n_windows = len(flat) // max_len
    if n_windows == 0 and keep_partial and len(flat) > 1:
        windows = flat.reshape(1, -1)
    else:
        windows = flat[: n_windows * max_len].reshape(n_windows, max_len)
    ids = _int_lists(windows)
    table = pa.table({"input_ids": ids, "labels": ids, "attention_mask": _int_lists(np.ones_like(windows))})
    return datasets.Dataset(table), int(len(flat)), int(windows.size)


def _empty_dataset():
    import datasets

    feature = datasets.List(datasets.Value("int64")) if hasattr(datasets, "List") else datasets.Sequence(datasets.Value("int64"))
    return datasets.Dataset.from_dict({k: [] for k in ("input_ids", "labels", "attention_mask")},
                                      features=datasets.Features({k: feature for k in ("input_ids", "labels", "attention_mask")}))


def _build_split(rows, fmt, tokenizer, training: TrainingSection, fingerprint):
    max_len = training.max_seq_length
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stats = {"rows": len(rows), "dropped_rows": 0, "truncated_rows": 0}
    if len(rows) == 0:
        return _empty_dataset(), stats
    # In memory, no cache files, explicit fingerprints: nothing can be reused across tokenizers,
    # lengths or data, and datasets never has to hash the tokenizer.
    map_kw = dict(batched=True, batch_size=MAP_BATCH, keep_in_memory=True, load_from_cache_file=False)
    if fmt == "text":
        tok = rows.map(_tokenize_text, fn_kwargs={"tokenizer": tokenizer, "eos": eos}, remove_columns=rows.column_names,
                       new_fingerprint=fingerprint + "-tok", **map_kw)
        if training.packing:
            # Validation keeps a short last window if it has no full one, so it is never empty.
            ds, n_tokens, kept = _pack(tok, max_len, keep_partial=fingerprint.endswith("-val"))
            stats.update(tokens_before_packing=n_tokens, dropped_tokens=n_tokens - kept)
            return ds, stats

        def truncate(batch):
            ids = [x[:max_len] for x in batch["input_ids"]]
            return {"input_ids": ids, "labels": ids, "attention_mask": [[1] * len(x) for x in ids],
                    "_truncated": [len(x) > max_len for x in batch["input_ids"]]}
        ds = tok.map(truncate, remove_columns=tok.column_names, new_fingerprint=fingerprint + "-trunc", **map_kw)
    elif fmt == "prompt_response":
        ds = rows.map(_tokenize_prompt_response, fn_kwargs={"tokenizer": tokenizer, "max_len": max_len, "eos": eos},
                      remove_columns=rows.column_names, new_fingerprint=fingerprint + "-pr", **map_kw)
    else:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"paths.tokenizer_name_or_path: tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no "
                              "chat_template, needed for `messages` rows (use prompt/response rows or a chat tokenizer)")
        ds = rows.map(_tokenize_messages, fn_kwargs={"tokenizer": tokenizer, "max_len": max_len},
                      remove_columns=rows.column_names, new_fingerprint=fingerprint + "-chat", **map_kw)
    stats["truncated_rows"] = int(sum(ds["_truncated"]))
    # labels[0] is never a target (the loss shifts by one): a row needs a target after it.
    keep = [i for i, lab in enumerate(ds["labels"]) if any(x != IGNORE_INDEX for x in lab[1:])]
    stats["dropped_rows"] = len(ds) - len(keep)
    ds = ds.remove_columns("_truncated")
    if len(keep) < len(ds):
        ds = ds.select(keep)
    return ds, stats


def build_datasets(cfg: dict, tokenizer):
    """(train_dataset, val_dataset, info): rows loaded, split by seed, tokenized, packed/masked.

    Items are dicts of python int lists: input_ids, labels (IGNORE_INDEX where no loss),
    attention_mask. `info` counts rows, examples and tokens per split."""
    import datasets

    training = cfg.training
    max_len = training.max_seq_length
    rows = load_rows(cfg)
    fmt = detect_format(set(rows.column_names) - {WHERE})
    if fmt == "prompt_response" and "response" not in rows.column_names:
        rows = rows.rename_column("completion", "response")
    keep_cols = {"text": ["text"], "messages": ["messages"], "prompt_response": ["prompt", "response"]}[fmt]
    rows = rows.select_columns(keep_cols + [WHERE])
    empty = {"empty_rows": 0}
    if fmt == "text":
        # Empty documents would train on a lone end-of-sequence token: counted, reported, left out.
        blank = [i for i, text in enumerate(rows["text"]) if not text.strip()]
        if len(blank) == len(rows):
            raise ConfigError(f"paths.data_path: all {len(rows)} rows have empty `text` (first: {rows[blank[0]][WHERE]})")
        if blank:
            empty = {"empty_rows": len(blank), "first_empty_row": rows[blank[0]][WHERE]}
            blank_set = set(blank)
            rows = rows.select([i for i in range(len(rows)) if i not in blank_set])
    train_idx, val_idx = split_indices(len(rows), training.val_split, training.seed)
    fingerprint = _tokenizer_fingerprint(tokenizer, fmt, max_len, training.packing,
                                         training.seed, training.val_split, rows._fingerprint)
    was_verbose = datasets.utils.logging.is_progress_bar_enabled()
    datasets.utils.logging.disable_progress_bar()  # quiet maps: the trainer prints `info`
    try:
        train, train_stats = _build_split(rows.select(train_idx), fmt, tokenizer, training, fingerprint + "-train")
        val, val_stats = _build_split(rows.select(val_idx), fmt, tokenizer, training, fingerprint + "-val")
    finally:
        if was_verbose:
            datasets.utils.logging.enable_progress_bar()
    if len(train) == 0:
        if fmt == "text" and training.packing:
            raise ConfigError(f"paths.data_path: {train_stats.get('tokens_before_packing', 0)} training tokens, fewer than one "
                              f"window of training.max_seq_length={max_len}")
        raise ConfigError(f"paths.data_path: no training examples left ({train_stats['rows']} rows, "
                          f"{train_stats['dropped_rows']} dropped with no target tokens within training.max_seq_length={max_len})")

    def tokens(ds, col, pred):  # counted in arrow/numpy: python loops over ~1M ints take seconds
        if not len(ds):
            return 0
        values = ds.data.column(col).combine_chunks().flatten().to_numpy(zero_copy_only=False)
        return int(pred(values).sum())

    info: dict[str, Any] = {
        "format": fmt,
        "source": cfg.paths.data_path,
        "rows": len(rows),
        "train_rows": len(train_idx),
        "val_rows": len(val_idx),
        "train_examples": len(train),
        "val_examples": len(val),
        "train_tokens": tokens(train, "attention_mask", lambda x: x == 1),
        "val_tokens": tokens(val, "attention_mask", lambda x: x == 1),
        "train_target_tokens": tokens(train, "labels", lambda x: x != IGNORE_INDEX),
        "max_seq_length": max_len,
        "packing": fmt == "text" and training.packing,
        "dropped_rows": train_stats["dropped_rows"] + val_stats["dropped_rows"],
        "truncated_rows": train_stats["truncated_rows"] + val_stats["truncated_rows"],
        **empty,
    }
    if "dropped_tokens" in train_stats:
        info["dropped_tail_tokens"] = train_stats["dropped_tokens"] + val_stats.get("dropped_tokens", 0)
    return train, val, info


def target_token_ids(tokenizer, targets: list[str]) -> list[list[int]]:
    """The ids a target trains on: its tokens (no special tokens, tokenized apart from the prompt) +
    eos when the tokenizer has one. Label-likelihood scoring (trainkit.generation) scores these."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return [list(ids) + eos for ids in token_ids(tokenizer, list(targets))["input_ids"]]


FIT_ATTEMPTS = 8  # re-tokenizations of a shortened prompt (a cut can change how its edges tokenize)


def fit_prompt(tokenizer, prompt: str, cut, max_source_length: int) -> tuple[list[int], bool]:
    """The prompt's ids (special tokens on, as for generation) within max_source_length tokens, and
    whether it was cut.

    A prompt that is too long loses characters of its PromptCut span (trainkit.tasks.PromptCut) from
    the span's side (whole lines first when `cut.whole_lines`), and the shortened text is tokenized
    again, so the ids are those of a real text. Without a span, or when even the empty span does not
    fit, the ids lose their beginning: the end, where the answer starts, stays.
    """
    text, start, end = prompt, (cut.start if cut else 0), (cut.end if cut else 0)
    for _ in range(FIT_ATTEMPTS if cut else 1):
        enc = token_ids(tokenizer, [text], offsets=True, specials=True)
        ids, offsets = list(enc["input_ids"][0]), enc["offset_mapping"][0]
        excess = len(ids) - max_source_length
        if excess <= 0:
            return ids, text != prompt
        if cut is None or start == end:
            break
        inside = [(a, b) for a, b in offsets if b > a and a >= start and b <= end]  # tokens wholly in the span
        if cut.side == "right":
            keep_to = inside[-excess][0] if excess < len(inside) else start
            if cut.whole_lines and text.rfind("\n", start, keep_to) > start:
                keep_to = text.rfind("\n", start, keep_to)  # drop the partial line and its line break
            text, end = text[:keep_to] + text[end:], keep_to
        else:
            keep_from = inside[excess - 1][1] if excess < len(inside) else end
            if cut.whole_lines and 0 <= text.find("\n", keep_from, end) < end - 1:
                keep_from = text.find("\n", keep_from, end) + 1
            text, end = text[:start] + text[keep_from:], end - (keep_from - start)
    return ids[-max_source_length:], True


def prompt_token_ids(tokenizer, prompts: list[str], max_source_length: int | None,
                     cuts: list | None = None) -> tuple[list[list[int]], list[bool]]:
    """Prompt ids as training and generation see them (special tokens on), each longer than
    max_source_length cut by `fit_prompt` (its PromptCut from `cuts`, one per prompt or None); and
    whether each was cut."""
    ids = token_ids(tokenizer, list(prompts), specials=True)["input_ids"]
    cuts = list(cuts) if cuts is not None else [None] * len(ids)
    out, was_cut = [], []
    for prompt, cut, p in zip(prompts, cuts, ids):
        too_long = max_source_length is not None and len(p) > max_source_length
        out.append(fit_prompt(tokenizer, prompt, cut, max_source_length)[0] if too_long else list(p))
        was_cut.append(too_long)
    return out, was_cut


def tokenize_prompt_target(prompts: list[str], targets: list[str], tokenizer, max_source_length: int,
                           max_target_length: int, cuts: list | None = None) -> list[dict]:
    """Task examples -> training rows: prompt ids (loss masked) + target ids + eos (the loss).
    Rows carry `_truncated_prompt` / `_truncated_target` flags (the collator ignores them).

    Prompt and target are tokenized apart, as at generation time (the model sees the prompt's ids
    and continues). A long prompt is cut as `fit_prompt` cuts it for generation: from the part its
    PromptCut (`cuts`, one per prompt, or None) names, else from the beginning; never at the end,
    where the answer starts.
    """
    prompt_ids, prompts_cut = prompt_token_ids(tokenizer, prompts, max_source_length, cuts)
    rows = []
    for p, cut_prompt, t in zip(prompt_ids, prompts_cut, target_token_ids(tokenizer, targets)):
        cut_target = len(t) > max_target_length
        t = t[:max_target_length]
        rows.append({"input_ids": p + t, "labels": [IGNORE_INDEX] * len(p) + t, "attention_mask": [1] * (len(p) + len(t)),
                     "_truncated_prompt": cut_prompt, "_truncated_target": cut_target})
    return rows


# ---------------------------------------------------------------------------------- batches

def make_collator(tokenizer, pad_to_multiple_of: int | None = None):
    """list of examples -> right-padded LongTensors: input_ids (pad id), labels (-100), attention_mask (0)."""
    import torch

    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0

    def as_list(x):
        return x.tolist() if hasattr(x, "tolist") else list(x)

    def collate(examples: list[dict]) -> dict:
        ids = [as_list(e["input_ids"]) for e in examples]
        labels = [as_list(e["labels"]) if "labels" in e else list(i) for e, i in zip(examples, ids)]
        masks = [as_list(e["attention_mask"]) if "attention_mask" in e else [1] * len(i) for e, i in zip(examples, ids)]
        width = max((len(x) for x in ids), default=0)
        if pad_to_multiple_of:
            width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
        out_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
        out_labels = torch.full((len(ids), width), IGNORE_INDEX, dtype=torch.long)
        out_mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, (i, lab, m) in enumerate(zip(ids, labels, masks)):
            n = len(i)
            out_ids[row, :n] = torch.tensor(i, dtype=torch.long)
            out_labels[row, :n] = torch.tensor(lab, dtype=torch.long)
            out_mask[row, :n] = torch.tensor(m, dtype=torch.long)
        return {"input_ids": out_ids, "labels": out_labels, "attention_mask": out_mask}

    return collate


def count_target_tokens(batch) -> int:
    """Tokens that carry loss (labels != -100) in a collated batch (for tokens/s)."""
    labels = batch["labels"] if isinstance(batch, dict) else batch
    if hasattr(labels, "ne"):
        return int(labels.ne(IGNORE_INDEX).sum().item())
    return sum(1 for seq in labels for x in seq if x != IGNORE_INDEX)

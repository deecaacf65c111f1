"""Packed text windows for distillation: a deterministic, resumable stream of token windows.

    stream = WindowStream({"path": "data/distill/pretrain"}, tokenizer, seq_length=2048,
                          seed=42, rank=rank, world_size=world, shuffle_buffer=1000)
    for window in stream:          # LongTensor [seq_length + 1]; forever (epochs roll over)
        inputs, labels = window[:-1], window[1:]
    state = stream.state_dict()    # small JSON-able dict; load_state_dict(state) -> exact continuation

Sources (a dict, a `TextSource`, or just a path string):
  local JSONL / JSONL.gz     a file, a directory (its `manifest.json` from `write_shards`, else every
                             *.jsonl[.gz] below it, sorted), or a glob (`data/shards/*.jsonl.gz`);
                             also .parquet / .csv / .json files through the datasets loaders
  HF datasets id             `split`, `name` (config), `streaming`, `cache_dir`, `local_files_only`
                             (offline: the datasets cache only, as HF_DATASETS_OFFLINE=1)
Rows: `text_field` (default "text") holds the document. `text_field=None` reads each row by its
own columns: `text`, chat `messages`, or `prompt` + `response` (or `completion`), rendered with
the tokenizer's chat template when it has one, else as "User: ...\\nAssistant: ..." lines.

The stream of one epoch:
  1. shards in an order drawn from (seed, epoch); rows of a shard in file order. Shards of a
     map-style HF dataset are blocks of HF_SHARD_ROWS consecutive rows; a streamed one keeps its
     own file shards.
  2. every document tokenized without special tokens, + eos (unless it already ends with eos,
     as chat templates that close turns with eos do), all concatenated
  3. cut into windows of seq_length + 1 tokens; the tail shorter than a window is dropped
  4. `shuffle_buffer` > 1: each block of that many consecutive windows is emitted in an order
     drawn from (seed, epoch, block) - a bounded shuffle whose state is one position in the data
  5. rank r takes windows r, r + W, r + 2W, ... in rounds of W = world_size; an incomplete last
     round of an epoch is dropped, so every rank gets the same windows per epoch (lockstep).
So windows per epoch per rank = windows_per_epoch // world_size (see `estimate_windows`).

State: {epoch, position (windows of the epoch consumed by all ranks together), block, cursor
(shard, row, token offset where that block starts)}. It is the same on every rank that consumed
the same number of windows, so the main process's copy resumes all ranks; a different
world_size resumes at the same place with no window lost or repeated. A resume re-tokenizes from
the block's start (at most shuffle_buffer + world_size windows), not from the start of the epoch;
seeking there skips rows without parsing them (local files: reads past lines; streamed HF
datasets: `IterableDataset.skip`).
"""

from __future__ import annotations

import glob as globlib
import gzip
import json
import math
import os
import time
from collections import deque
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from trainkit.config import ConfigError, looks_local
from trainkit.patches.datasets import hub_offline
from trainkit.data import READ_ERRORS, RESPONSE_KEYS, _ids, _jsonl_files, detect_format, iter_jsonl_rows, open_jsonl_bytes
from trainkit.tokenizer import one_line

SHARD_SUFFIXES = (".jsonl", ".jsonl.gz")
LOADER_SUFFIXES = {".jsonl": "json", ".jsonl.gz": "json", ".json": "json", ".json.gz": "json",
                   ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
MANIFEST = "manifest.json"
HF_SHARD_ROWS = 1000      # map-style HF datasets: shuffled blocks of this many consecutive rows
TOKENIZE_BATCH = 256      # rows tokenized per tokenizer call
STATE_VERSION = 1


# ---------------------------------------------------------------------------------- sources

@dataclass
class TextSource:
    """Where the text comes from. `key` names the config key in error messages."""

    path: str
    split: str = "train"
    name: str | None = None
    text_field: str | None = "text"
    streaming: bool = False
    cache_dir: str | None = None
    local_files_only: bool = False
    key: str = "data_path"

    @classmethod
    def from_any(cls, source) -> "TextSource":
        if isinstance(source, TextSource):
            return source
        if isinstance(source, (str, os.PathLike)):
            return cls(path=str(source))
        if not isinstance(source, dict):
            raise TypeError(f"source must be a path, a dict or a TextSource, got {type(source).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(source) - known)
        if unknown:
            raise ValueError(f"source: unknown keys {unknown} (known: {sorted(known)})")
        if not source.get("path"):
            raise ConfigError(f"{source.get('key', 'data_path')}: no data path given")
        values = {k: v for k, v in source.items() if v is not None or k in ("name", "text_field", "cache_dir")}
        values["path"] = str(values["path"])
        return cls(**values)


def _has_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def _loader_for(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in sorted(LOADER_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return LOADER_SUFFIXES[suffix]
    return None


def resolve_local_files(path: str, key: str = "data_path") -> list[Path] | None:
    """The local files of `path` in reading order, or None when `path` is an HF datasets id.

    A directory with a `manifest.json` (from `write_shards`) gives the manifest's shards; else
    its *.jsonl[.gz] files (recursively, sorted), else its .parquet / .csv / .json files."""
    expanded = os.path.expanduser(path)
    if _has_glob(path):
        files = sorted(Path(p) for p in globlib.glob(expanded, recursive=True) if os.path.isfile(p) and _loader_for(Path(p)))
        if not files:
            raise ConfigError(f"{key}: no *.jsonl, *.jsonl.gz, *.parquet, *.csv or *.json files match {path}")
        return files
    local = Path(expanded)
    if local.is_dir():
        manifest = local / MANIFEST
        if manifest.is_file():
            try:
                listed = [local / s["file"] for s in json.loads(manifest.read_text())["shards"]]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ConfigError(f"{key}: cannot read {manifest}: {one_line(e)}") from None
            missing = [str(p) for p in listed if not p.is_file()]
            if missing:
                raise ConfigError(f"{key}: {manifest} lists shards that do not exist: {', '.join(missing[:3])}")
            if not listed:
                raise ConfigError(f"{key}: {manifest} lists no shards")
            return listed
        files = _jsonl_files(local)
        if not files:
            files = sorted(p for p in local.rglob("*") if p.is_file() and _loader_for(p) in ("parquet", "csv", "json"))
        if not files:
            found = sorted(p.name for p in local.iterdir())[:5]
            raise ConfigError(f"{key}: no *.jsonl, *.jsonl.gz, *.parquet, *.csv or *.json files in directory {path}"
                              f" (found: {', '.join(found) if found else 'nothing'})")
        return files
    if local.is_file():
        if not _loader_for(local):
            raise ConfigError(f"{key}: {path}: unsupported file type (expected .jsonl, .jsonl.gz, .parquet, .csv, .json or .txt)")
        return [local]
    if looks_local(path):
        raise ConfigError(f"{key}: no such file or directory: {path}")
    return None


def load_hf(path: str, *, split: str = "train", name: str | None = None, streaming: bool = False,
            cache_dir: str | None = None, local_files_only: bool = False, data_files: list[Path] | None = None,
            key: str = "data_path"):
    """`datasets.load_dataset` for an HF id, or for local files (`data_files`, loader from the suffix).
    One split (a `Dataset` or `IterableDataset`); ConfigError naming `key` otherwise."""
    import datasets

    if data_files is not None:
        loaders = {_loader_for(p) for p in data_files}
        if len(loaders) != 1:
            raise ConfigError(f"{key}: {path} mixes file types ({', '.join(sorted(map(str, loaders)))}): use one kind")
        builder, kwargs = loaders.pop(), {"data_files": [str(p) for p in data_files]}
        split = split if split.startswith("train") else "train"  # local files load as one "train" split
    else:
        builder, kwargs = path, {"name": name}
    try:
        with hub_offline(local_files_only):
            ds = datasets.load_dataset(builder, split=split, streaming=streaming, cache_dir=cache_dir, **kwargs)
    except Exception as e:  # hub / network / builder errors all mean "cannot use this source"
        raise ConfigError(f"{key}: cannot load dataset {path!r} (split {split!r}"
                          f"{f', config {name!r}' if name else ''}): {one_line(e)}") from None
    if not isinstance(ds, (datasets.Dataset, datasets.IterableDataset)):
        raise ConfigError(f"{key}: {path!r} did not give one split; set the split")
    return ds


# ---------------------------------------------------------------------------------- shards

class _FileShard:
    """Rows of one local JSONL / JSONL.gz file; row i = i-th non-blank line."""

    def __init__(self, path: Path, key: str, rows: int | None = None):
        self.path, self.key, self.rows = path, key, rows

    def iter_rows(self, start: int = 0) -> Iterator[tuple[int, str, dict]]:
        yield from iter_jsonl_rows(self.path, self.key, start)

    def count_rows(self) -> int:
        if self.rows is None:
            n = 0
            try:
                with open_jsonl_bytes(self.path) as f:
                    n = sum(1 for line in f if line.strip())
            except READ_ERRORS as e:
                raise ConfigError(f"{self.key}: cannot read {self.path} (corrupt or truncated?): {one_line(e)}") from None
            self.rows = n
        return self.rows


class _TableShard:
    """Rows [lo, hi) of a map-style `datasets.Dataset`."""

    def __init__(self, ds, lo: int, hi: int, shown: str):
        self.ds, self.lo, self.hi, self.shown, self.rows = ds, lo, hi, shown, hi - lo

    def iter_rows(self, start: int = 0):
        for a in range(self.lo + start, self.hi, TOKENIZE_BATCH):
            batch = self.ds[a:min(a + TOKENIZE_BATCH, self.hi)]
            names = list(batch)
            for i, values in enumerate(zip(*(batch[n] for n in names))):
                yield a + i - self.lo, f"{self.shown} row {a + i}", dict(zip(names, values))

    def count_rows(self) -> int:
        return self.rows


class _StreamShard:
    """One file shard of a streamed `datasets.IterableDataset` (rows unknown until read)."""

    def __init__(self, ds, shown: str):
        self.ds, self.shown, self.rows = ds, shown, None

    def iter_rows(self, start: int = 0):
        for i, row in enumerate(self.ds.skip(start) if start else self.ds, start):
            yield i, f"{self.shown} row {i}", row

    def count_rows(self):
        return None


def _open_shards(src: TextSource) -> tuple[list, int | None]:
    """The source's shards in canonical order, and its total row count when known up front."""
    files = resolve_local_files(src.path, src.key)
    if files is not None and all(p.name.endswith(SHARD_SUFFIXES) for p in files):
        rows = _manifest_rows(src.path, files)
        return [_FileShard(p, src.key, rows.get(p)) for p in files], None
    ds = load_hf(src.path, split=src.split, name=src.name, streaming=src.streaming, cache_dir=src.cache_dir,
                 local_files_only=src.local_files_only, data_files=files, key=src.key)
    shown = src.path if files is None else str(src.path)
    import datasets

    if isinstance(ds, datasets.Dataset):
        n = len(ds)
        return [_TableShard(ds, lo, min(n, lo + HF_SHARD_ROWS), shown) for lo in range(0, n, HF_SHARD_ROWS)], n
    n_shards = ds.num_shards
    shards = [_StreamShard(ds, shown)] if n_shards <= 1 else [
        _StreamShard(ds.shard(num_shards=n_shards, index=i, contiguous=True), f"{shown} (shard {i})") for i in range(n_shards)]
    total = None
    try:
        info = ds.info.splits[src.split.split("[")[0]] if ds.info and ds.info.splits else None
        total = int(info.num_examples) if info is not None and info.num_examples else None
    except (KeyError, TypeError, AttributeError):
        total = None
    return shards, total


def _manifest_rows(path: str, files: list[Path]) -> dict[Path, int]:
    manifest = Path(os.path.expanduser(path)) / MANIFEST
    if _has_glob(path) or not manifest.is_file():
        return {}
    try:
        return {manifest.parent / s["file"]: int(s["rows"]) for s in json.loads(manifest.read_text())["shards"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


# ---------------------------------------------------------------------------------- rendering

def _plain_chat(messages: list[dict]) -> str:
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
        return _plain_chat(messages)
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as e:  # jinja errors: unknown roles, bad alternation, ...
        raise ConfigError(f"{key}: {where}: chat template failed: {one_line(e)}") from None


def _eos_id(tokenizer, key: str) -> int:
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"{key}: the tokenizer has no eos token, needed to join documents into windows")
    return int(tokenizer.eos_token_id)


def tokenize_documents(texts: list[str], tokenizer, eos: int) -> list[np.ndarray]:
    """Each text's ids (no special tokens added) + eos, unless the ids already end with eos."""
    out = []
    for ids in _ids(tokenizer, texts)["input_ids"]:
        if not ids or ids[-1] != eos:
            ids = list(ids) + [eos]
        out.append(np.asarray(ids, dtype=np.int64))
    return out


# ---------------------------------------------------------------------------------- the stream

def _check_seed(seed) -> int:
    seed = int(seed)
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return seed


class WindowStream:
    """Iterable of LongTensor windows of `seq_length + 1` tokens (see module doc).

    epochs: None iterates forever (epochs roll over, reshuffled); an int stops after that many
    epochs (e.g. 1 for evaluation data). shuffle_shards: shard order drawn per epoch.
    """

    def __init__(self, source, tokenizer, seq_length: int, seed: int = 0, rank: int = 0, world_size: int = 1, *,
                 shuffle_buffer: int = 0, shuffle_shards: bool = True, epochs: int | None = None):
        self.source = TextSource.from_any(source)
        if seq_length < 1:
            raise ValueError(f"seq_length must be >= 1, got {seq_length}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.tokenizer, self.seq_length, self.seed = tokenizer, int(seq_length), _check_seed(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.shuffle_buffer, self.shuffle_shards, self.epochs = int(shuffle_buffer), bool(shuffle_shards), epochs
        self.block_size = max(1, self.shuffle_buffer)
        self.eos = _eos_id(tokenizer, self.source.key)
        self._shards: list | None = None
        self.epoch, self.position = 0, 0            # position: windows of the epoch consumed by all ranks
        self._cursors: dict[int, tuple] = {}          # block -> (shard pos, row, token offset) of its first window

    # -------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        block, cursor = self._resume_point()
        return {"version": STATE_VERSION, "epoch": self.epoch, "position": self.position, "block": block,
                "cursor": list(cursor) if cursor is not None else None, "seq_length": self.seq_length, "seed": self.seed,
                "shuffle_buffer": self.shuffle_buffer, "shuffle_shards": self.shuffle_shards,
                "world_size": self.world_size, "windows_consumed": self.position // self.world_size,
                "source": self.source.path}

    def load_state_dict(self, state: dict) -> None:
        for name in ("seq_length", "seed", "shuffle_buffer", "shuffle_shards"):
            if name in state and state[name] != getattr(self, name):
                raise ValueError(f"data state was saved with {name}={state[name]!r}, this stream has "
                                 f"{getattr(self, name)!r}: the windows would differ, cannot resume exactly")
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data state version {state.get('version')!r} is not {STATE_VERSION}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._cursors = {}
        if state.get("cursor") is not None:
            self._cursors[int(state["block"])] = tuple(int(x) for x in state["cursor"])

    def _resume_point(self) -> tuple[int, tuple | None]:
        """The latest block starting at or before `position` whose cursor is known."""
        known = [b for b in self._cursors if b * self.block_size <= self.position]
        if not known:
            return 0, None
        b = max(known)
        return b, self._cursors[b]

    # -------------------------------------------------------------------- generation
    def shards(self) -> list:
        if self._shards is None:
            self._shards, _ = _open_shards(self.source)
            if not self._shards:
                raise ConfigError(f"{self.source.key}: {self.source.path} holds no rows")
        return self._shards

    def shard_order(self, epoch: int) -> list[int]:
        n = len(self.shards())
        if not self.shuffle_shards or n == 1:
            return list(range(n))
        return [int(i) for i in np.random.default_rng([self.seed, epoch, 1]).permutation(n)]

    def _documents(self, order: list[int], cursor: tuple) -> Iterator[tuple[int, int, int, np.ndarray]]:
        """(shard position, row, token offset, ids from that offset) from `cursor` to the end of the epoch."""
        shards, src = self.shards(), self.source
        start_pos, start_row, start_offset = cursor
        pending: list[tuple[int, int, str]] = []  # (shard pos, row, text)

        def flush():
            docs = tokenize_documents([t for _, _, t in pending], self.tokenizer, self.eos)
            for (pos, row, _), ids in zip(pending, docs):
                offset = start_offset if (pos, row) == (start_pos, start_row) else 0
                if offset < len(ids):
                    yield pos, row, offset, ids[offset:]
            pending.clear()

        for pos in range(start_pos, len(order)):
            shard = shards[order[pos]]
            for row, where, data in shard.iter_rows(start_row if pos == start_pos else 0):
                text = render_row(data, self.tokenizer, src.text_field, where, src.key)
                if not text.strip():
                    continue  # an empty document would only add an eos (estimate_data counts them)
                pending.append((pos, row, text))
                if len(pending) >= TOKENIZE_BATCH:
                    yield from flush()
        if pending:
            yield from flush()

    def _blocks(self, epoch: int, start_block: int, cursor: tuple | None):
        """(block, windows in emitted order) of the epoch from `start_block`, which starts at `cursor`;
        records the cursor of each block and of the one after it in self._cursors."""
        width, size = self.seq_length + 1, self.block_size
        segs: deque = deque()  # [shard pos, row, offset, ids]
        have, block, windows = 0, start_block, []
        block_cursor = cursor or (0, 0, 0)
        last = block_cursor

        def head():
            return (segs[0][0], segs[0][1], segs[0][2]) if segs else (last[0], last[1] + 1, 0)

        for pos, row, offset, ids in self._documents(self.shard_order(epoch), cursor or (0, 0, 0)):
            segs.append([pos, row, offset, ids])
            have += len(ids)
            while have >= width:
                if not windows:
                    block_cursor = head()
                parts, need = [], width
                while need:
                    seg = segs[0]
                    take = seg[3][:need]
                    parts.append(take)
                    need -= len(take)
                    seg[2] += len(take)
                    seg[3] = seg[3][len(take):]
                    if not len(seg[3]):
                        last = (seg[0], seg[1], 0)
                        segs.popleft()
                have -= width
                windows.append(np.concatenate(parts))
                if len(windows) == size:
                    self._cursors[block], self._cursors[block + 1] = block_cursor, head()
                    yield block, self._permute(epoch, block, windows)
                    block, windows = block + 1, []
        if windows:
            self._cursors[block] = block_cursor
            yield block, self._permute(epoch, block, windows)

    def _permute(self, epoch: int, block: int, windows: list) -> list:
        if self.shuffle_buffer <= 1 or len(windows) == 1:
            return windows
        order = np.random.default_rng([self.seed, epoch, 2, block]).permutation(len(windows))
        return [windows[i] for i in order]

    def __iter__(self) -> Iterator:
        import torch

        world, size = self.world_size, self.block_size
        while self.epochs is None or self.epoch < self.epochs:
            epoch = self.epoch
            start_block, cursor = self._resume_point()
            index, rnd, yielded, produced = start_block * size, [], False, 0
            for block, windows in self._blocks(epoch, start_block, cursor):
                for w in windows:
                    produced += 1
                    if index >= self.position:
                        rnd.append(w)
                    index += 1
                    if len(rnd) == world:
                        self.position = index
                        for b in [b for b in self._cursors if (b + 1) * size <= index - world]:
                            del self._cursors[b]  # blocks no resume can need any more
                        yielded = True
                        yield torch.from_numpy(rnd[self.rank])
                        rnd = []
            if not yielded and self.position == 0 and produced < world:
                raise ConfigError(f"{self.source.key}: {self.source.path} gives {produced} window(s) of "
                                  f"{self.seq_length + 1} tokens per epoch, fewer than the {world} process(es) need")
            self.epoch, self.position, self._cursors = epoch + 1, 0, {}


# ---------------------------------------------------------------------------------- estimate

@dataclass
class WindowEstimate:
    windows: int | None   # windows of seq_length + 1 per epoch, all ranks together
    tokens: int | None    # tokens per epoch (documents + eos)
    rows: int | None
    sampled_rows: int
    exact: bool
    empty_rows: int = 0               # rows of the sample whose text is empty (left out of the windows)
    first_empty_row: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def estimate_data(source, tokenizer, seq_length: int, sample_rows: int = 2000) -> WindowEstimate:
    """Windows per epoch: exact when the source has at most `sample_rows` rows (all tokenized);
    else mean tokens of `sample_rows` rows x the row count (local shards: the manifest's counts or
    a count of lines; map-style HF: len; streamed HF: the split's num_examples from the dataset
    info), or None when the row count is unknown."""
    src = TextSource.from_any(source)
    eos = _eos_id(tokenizer, src.key)
    shards, total = _open_shards(src)
    if not shards:
        raise ConfigError(f"{src.key}: {src.path} holds no rows")
    if all(isinstance(s, _FileShard) for s in shards):
        total = sum(s.count_rows() for s in shards)
    if total == 0:
        raise ConfigError(f"{src.key}: {src.path} holds no rows")
    width = seq_length + 1

    empty = {"empty_rows": 0, "first_empty_row": None}

    def tokens_of(rows) -> tuple[int, int]:
        n_rows, n_tokens, batch = 0, 0, []
        for where, row in rows:
            text = render_row(row, tokenizer, src.text_field, where, src.key)
            n_rows += 1
            if not text.strip():  # left out of the windows, as WindowStream does
                empty["empty_rows"] += 1
                empty["first_empty_row"] = empty["first_empty_row"] or where
                continue
            batch.append(text)
            if len(batch) >= TOKENIZE_BATCH:
                n_tokens += sum(len(x) for x in tokenize_documents(batch, tokenizer, eos))
                batch = []
        if batch:
            n_tokens += sum(len(x) for x in tokenize_documents(batch, tokenizer, eos))
        if n_rows and empty["empty_rows"] == n_rows:
            raise ConfigError(f"{src.key}: {src.path}: all {n_rows} rows read have empty text "
                              f"(first: {empty['first_empty_row']})")
        return n_rows, n_tokens

    def every_row():
        for shard in shards:
            for _, where, row in shard.iter_rows():
                yield where, row

    if total is not None and total <= sample_rows:
        rows, tokens = tokens_of(every_row())
        if rows == 0:
            raise ConfigError(f"{src.key}: {src.path} holds no rows")
        return WindowEstimate(tokens // width, tokens, rows, rows, True, **empty)
    if isinstance(shards[0], _TableShard):
        ds = shards[0].ds
        picks = np.unique(np.linspace(0, total - 1, sample_rows).round().astype(np.int64)).tolist()
        sample = ds.select(picks)
        names = sample.column_names
        rows_iter = ((f"{src.path} row {i}", dict(zip(names, values)))
                     for i, values in zip(picks, zip(*(sample[n] for n in names))))
        rows, tokens = tokens_of(rows_iter)
    else:
        # the first rows of up to 16 shards spread over the list (a shard's start is cheap to read)
        chosen = sorted(set(np.linspace(0, len(shards) - 1, min(16, len(shards))).round().astype(int).tolist()))
        quota = math.ceil(sample_rows / len(chosen))

        def sampled():
            for i in chosen:
                for n, (_, where, row) in enumerate(shards[i].iter_rows()):
                    if n >= quota:
                        break
                    yield where, row
        rows, tokens = tokens_of(sampled())
        if total is None and len(shards) == 1 and rows < quota:  # a stream shorter than the sample: counted whole
            total = rows
        if total is not None and rows == total:
            return WindowEstimate(tokens // width, tokens, rows, rows, True, **empty)
    if rows == 0:
        raise ConfigError(f"{src.key}: {src.path} holds no rows")
    if total is None:
        return WindowEstimate(None, None, None, rows, False, **empty)
    est_tokens = int(round(tokens / rows * total))
    return WindowEstimate(est_tokens // width, est_tokens, total, rows, False, **empty)


def estimate_windows(source, tokenizer, seq_length: int, sample_rows: int = 2000) -> int | None:
    """Windows of seq_length + 1 tokens per epoch (all ranks together), or None when unknown.
    Per rank: estimate // world_size. See `estimate_data`."""
    return estimate_data(source, tokenizer, seq_length, sample_rows).windows


# ---------------------------------------------------------------------------------- shards on disk

def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_shard(path: Path, rows: list[dict]) -> int:
    """gzip JSONL written to path.tmp, then renamed: a shard exists whole or not at all.
    mtime 0 and no file name in the header: the same rows give the same bytes."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
            for row in rows:
                gz.write((json.dumps(row, ensure_ascii=False, default=str) + "\n").encode("utf-8"))
        raw.flush()
        os.fsync(raw.fileno())
    os.replace(tmp, path)
    return path.stat().st_size


def write_shards(source: str, out_dir, *, split: str = "train", name: str | None = None,
                 text_field: str | None = "text", max_rows: int | None = None, max_tokens: int | None = None,
                 tokenizer=None, rows_per_shard: int = 10000, streaming: bool = True, cache_dir: str | None = None,
                 local_files_only: bool = False, overwrite: bool = False, progress: bool = True) -> dict:
    """Write (a subset of) a dataset as out_dir/shard-00000.jsonl.gz ... + manifest.json; returns the manifest.

    source: an HF datasets id, or local .jsonl / .jsonl.gz / .json / .parquet / .csv / .txt files
    (a file, a directory or a glob), all read through `datasets.load_dataset`.
    text_field: rows are written as {"text": row[text_field]}; None writes rows whole (chat
    `messages`, `prompt`/`response` rows for stage 2). Stops after max_rows rows, or once
    max_tokens tokens (documents + eos, counted with `tokenizer`) are written.
    Each shard is written to a .tmp file and renamed; the manifest is rewritten (atomically) after
    each shard with "complete": false, and "complete": true at the end, so an interrupted run
    leaves whole shards and a manifest that lists exactly those.
    """
    from tqdm.auto import tqdm

    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    if max_tokens is not None and tokenizer is None:
        raise ValueError("max_tokens needs a tokenizer to count tokens")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    old = sorted(out.glob("shard-*.jsonl.gz")) + sorted(out.glob("shard-*.jsonl.gz.tmp")) + \
        [p for p in (out / MANIFEST, out / (MANIFEST + ".tmp")) if p.exists()]
    if old and not overwrite:
        raise ValueError(f"{out} already holds shards or a manifest ({old[0].name}); pass overwrite=True (--overwrite)")
    for p in old:
        p.unlink()

    files = resolve_local_files(str(source), key="source")
    ds = load_hf(str(source), split=split, name=name, streaming=streaming, cache_dir=cache_dir,
                 local_files_only=local_files_only, data_files=files, key="source")
    eos = None
    if max_tokens is not None:
        eos = _eos_id(tokenizer, "tokenizer")
    import datasets

    known = len(ds) if isinstance(ds, datasets.Dataset) else None
    manifest: dict[str, Any] = {
        "source": str(source), "name": name, "split": split, "text_field": text_field,
        "format": "jsonl.gz", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "complete": False,
        "rows": 0, "tokens": 0 if max_tokens is not None else None, "max_rows": max_rows, "max_tokens": max_tokens,
        "rows_per_shard": rows_per_shard, "shards": [],
    }

    def flush(rows: list[dict]) -> None:
        path = out / f"shard-{len(manifest['shards']):05d}.jsonl.gz"
        size = _write_shard(path, rows)
        manifest["shards"].append({"file": path.name, "rows": len(rows), "bytes": size})
        manifest["rows"] += len(rows)
        _atomic_write_bytes(out / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())

    bounds = [x for x in (max_rows, known) if x is not None]
    total = min(bounds) if bounds else None
    bar = tqdm(total=total, unit="row", desc=f"shards {out.name}", disable=not progress, dynamic_ncols=True)
    rows: list[dict] = []
    n_rows = n_tokens = 0
    try:
        for i, row in enumerate(ds):
            if max_rows is not None and n_rows >= max_rows:
                break
            if max_tokens is not None and n_tokens >= max_tokens:
                break
            if text_field is not None:
                value = row.get(text_field)
                if not isinstance(value, str):
                    got = "no" if value is None else f"a {type(value).__name__} in the"
                    raise ConfigError(f"source: {source} row {i} has {got} `{text_field}` field "
                                      f"(fields: {', '.join(sorted(row)) or 'none'})")
                row = {"text": value}
            if max_tokens is not None:
                text = row["text"] if text_field is not None else render_row(row, tokenizer, None, f"{source} row {i}", "source")
                n_tokens += len(tokenize_documents([text], tokenizer, eos)[0])
            rows.append(row)
            n_rows += 1
            bar.update(1)
            if len(rows) >= rows_per_shard:
                flush(rows)
                rows = []
        if rows:
            flush(rows)
    finally:
        bar.close()
    if n_rows == 0:
        raise ConfigError(f"source: {source} (split {split!r}) has no rows")
    manifest["tokens"] = n_tokens if max_tokens is not None else None
    manifest["complete"] = True
    _atomic_write_bytes(out / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest


def read_shard_rows(path) -> list[dict]:
    """All rows of the shards of `path` (file, directory or glob), in order (for checks and tests)."""
    files = resolve_local_files(str(path)) or []
    return [row for p in files for _, _, row in _FileShard(p, "data_path").iter_rows()]

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

Where the parts live: this module holds the stream and `estimate_data` (what distill.py imports);
sources and shards: trainkit.text_shards (paths: trainkit.data_sources); rows as text and ids:
trainkit.text_documents; shards on disk: trainkit.shard_writer.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np

from trainkit.config import ConfigError
from trainkit.text_documents import TOKENIZE_BATCH, eos_id, render_row, tokenize_documents
from trainkit.text_shards import FileShard, TableShard, TextSource, open_shards

STATE_VERSION = 1


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
        self.eos = eos_id(tokenizer, self.source.key)
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
            self._shards, _ = open_shards(self.source)
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
    eos = eos_id(tokenizer, src.key)
    shards, total = open_shards(src)
    if not shards:
        raise ConfigError(f"{src.key}: {src.path} holds no rows")
    if all(isinstance(s, FileShard) for s in shards):
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
    if isinstance(shards[0], TableShard):
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

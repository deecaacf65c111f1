"""Where data comes from: a local file, directory or glob of files, or an HF datasets id.

    files = resolve_local_files("data/shards/*.jsonl.gz")    # None: the path is an HF datasets id
    rows = iter_jsonl_rows(files[0], "paths.data_path")      # errors: one ConfigError naming key, file, line
    ds = load_hf("org/name", split="train", streaming=True, local_files_only=True)

Every `datasets.load_dataset` of the trainers goes through `load_hf_dataset` (data.py, text
windows, tasks), so offline loading and error wording live here once.

Offline: with HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set, datasets (which reads them at import)
loads an HF id from its cache by itself. `local_files_only=True` (model.local_files_only, the
shard writer's --offline) asks for the same in one call without touching those variables: the
dataset is read from the datasets cache through datasets' own cache builder (the one it falls back
to offline), so no request is made and no module global changes.
"""

from __future__ import annotations

import glob as globlib
import json
import os
from pathlib import Path

from trainkit import fileio
from trainkit.cli import one_line
from trainkit.config import ConfigError, looks_local

LOADER_SUFFIXES = {".jsonl": "json", ".jsonl.gz": "json", ".json": "json", ".json.gz": "json",
                   ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
MANIFEST = "manifest.json"  # written by trainkit.shard_writer.write_shards beside its shards


def has_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def loader_for(path: Path) -> str | None:
    """The datasets loader ("json", "parquet", "csv", "text") for a file, from its suffix."""
    name = path.name.lower()
    for suffix in sorted(LOADER_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return LOADER_SUFFIXES[suffix]
    return None


def jsonl_files(directory: Path) -> list[Path]:
    """The *.jsonl and *.jsonl.gz files below `directory`, recursively, sorted."""
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name.endswith(JSONL_SUFFIXES))


def resolve_local_files(path: str, key: str = "data_path") -> list[Path] | None:
    """The local files of `path` in reading order, or None when `path` is an HF datasets id.

    A directory with a `manifest.json` (from `write_shards`) gives the manifest's shards; else
    its *.jsonl[.gz] files (recursively, sorted), else its .parquet / .csv / .json files."""
    expanded = os.path.expanduser(path)
    if has_glob(path):
        files = sorted(Path(p) for p in globlib.glob(expanded, recursive=True) if os.path.isfile(p) and loader_for(Path(p)))
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
        files = jsonl_files(local)
        if not files:
            files = sorted(p for p in local.rglob("*") if p.is_file() and loader_for(p) in ("parquet", "csv", "json"))
        if not files:
            found = sorted(p.name for p in local.iterdir())[:5]
            raise ConfigError(f"{key}: no *.jsonl, *.jsonl.gz, *.parquet, *.csv or *.json files in directory {path}"
                              f" (found: {', '.join(found) if found else 'nothing'})")
        return files
    if local.is_file():
        if not loader_for(local):
            raise ConfigError(f"{key}: {path}: unsupported file type (expected .jsonl, .jsonl.gz, .parquet, .csv, .json or .txt)")
        return [local]
    if looks_local(path):
        raise ConfigError(f"{key}: no such file or directory: {path}")
    return None


def iter_jsonl_rows(path: Path, key: str, start: int = 0):
    """(row index, "FILE line N", row) of a local JSONL / JSONL.gz data file from row `start`
    (fileio.iter_jsonl_rows); an unreadable line is one ConfigError naming `key`, the file and the line."""
    try:
        yield from fileio.iter_jsonl_rows(path, start)
    except fileio.JsonlError as e:
        raise ConfigError(f"{key}: {e}") from None


def manifest_rows(path: str) -> dict[Path, int]:
    """Rows per shard file from the manifest of directory `path` ({} when it has none)."""
    manifest = Path(os.path.expanduser(path)) / MANIFEST
    if has_glob(path) or not manifest.is_file():
        return {}
    try:
        return {manifest.parent / s["file"]: int(s["rows"]) for s in json.loads(manifest.read_text())["shards"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def offline_mode() -> bool:
    """HF_HUB_OFFLINE / HF_DATASETS_OFFLINE as datasets read them at import."""
    import datasets

    return bool(datasets.config.HF_HUB_OFFLINE)


def load_hf_dataset(path: str, *, split: str | None = "train", name: str | None = None, streaming: bool = False,
                    cache_dir: str | None = None, local_files_only: bool = False, data_files: list[Path] | None = None):
    """`datasets.load_dataset` of an HF id (`name`: its config), or of local `data_files` (`path` is then
    the loader: "json", "parquet", ...). split=None gives every split (a DatasetDict). With
    `local_files_only`, an HF id is read from the datasets cache only (see module doc).
    Raises what datasets raises."""
    import datasets

    if data_files is not None:
        return datasets.load_dataset(path, split=split, streaming=streaming, cache_dir=cache_dir,
                                     data_files=[str(p) for p in data_files])
    if not local_files_only or offline_mode():
        return datasets.load_dataset(path, name, split=split, streaming=streaming, cache_dir=cache_dir)
    from datasets.packaged_modules.cache.cache import Cache

    # what load_dataset builds for a cached dataset when the hub cannot be reached
    builder = Cache(cache_dir=cache_dir, dataset_name=path.split("/")[-1], repo_id=path, config_name=name,
                    version="auto", hash="auto")
    if split is None:
        split_names = list(builder.info.splits or {})
        as_one = builder.as_streaming_dataset if streaming else builder.as_dataset
        dict_type = datasets.IterableDatasetDict if streaming else datasets.DatasetDict
        return dict_type({s: as_one(split=s) for s in split_names})
    return builder.as_streaming_dataset(split=split) if streaming else builder.as_dataset(split=split)


def load_hf(path: str, *, split: str = "train", name: str | None = None, streaming: bool = False,
            cache_dir: str | None = None, local_files_only: bool = False, data_files: list[Path] | None = None,
            key: str = "data_path", split_key: str = "the split"):
    """One split of an HF id, or of local `data_files` (loader from the suffix), as a `Dataset` or
    `IterableDataset`; ConfigError naming `key` (and `split_key` for a missing split) otherwise."""
    import datasets

    builder = path
    if data_files is not None:
        loaders = {loader_for(p) for p in data_files}
        if len(loaders) != 1:
            raise ConfigError(f"{key}: {path} mixes file types ({', '.join(sorted(map(str, loaders)))}): use one kind")
        builder = loaders.pop()
        split = split if split.startswith("train") else "train"  # local files load as one "train" split
    try:
        ds = load_hf_dataset(builder, split=split, name=name, streaming=streaming, cache_dir=cache_dir,
                             local_files_only=local_files_only, data_files=data_files)
    except Exception as e:  # hub / network / builder errors all mean "cannot use this source"
        raise ConfigError(f"{key}: cannot load dataset {path!r} (split {split!r}"
                          f"{f', config {name!r}' if name else ''}): {one_line(e)}") from None
    if not isinstance(ds, (datasets.Dataset, datasets.IterableDataset)):
        raise ConfigError(f"{key}: {path!r} did not give one split; set {split_key}")
    return ds

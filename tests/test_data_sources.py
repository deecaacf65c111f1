"""trainkit.data_sources: offline loading of an HF datasets id from the datasets cache, without a
request to the hub and without changing a module global; HF_HUB_OFFLINE read by datasets at import."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from trainkit.config import ConfigError
from trainkit.data_sources import load_hf, resolve_local_files

REPO = Path(__file__).resolve().parents[1]
DATASET_ID = "tiny-offline"
ROWS = [{"text": f"document {i}"} for i in range(5)]


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory) -> Path:
    """A datasets cache holding DATASET_ID as a hub download leaves it: <cache>/<id>/default/0.0.0/<hash>/."""
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.json.json import Json

    root = tmp_path_factory.mktemp("hf")
    source = root / "rows.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    cache = root / "cache"
    builder = Json(cache_dir=str(cache), dataset_name=DATASET_ID, hash="0123abcd",
                   data_files=DataFilesDict.from_patterns({"train": [str(source)]}))
    builder.download_and_prepare()
    (config_dir,) = [p for p in (cache / DATASET_ID).iterdir() if p.is_dir()]
    config_dir.rename(config_dir.with_name("default"))  # a hub dataset's config is "default"
    return cache


@pytest.fixture
def no_network(monkeypatch):
    """Every name lookup and socket connection attempt is recorded and refused."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[1] if len(args) > 1 and isinstance(args[0], socket.socket) else args[:1])
        raise OSError("no network in this test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


def offline_globals():
    import datasets
    import huggingface_hub.constants as hub_constants

    return datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE, hub_constants.HF_HUB_OFFLINE


@pytest.mark.parametrize("streaming", [False, True])
def test_local_files_only_reads_the_cache_without_network_or_globals(hf_cache, no_network, streaming):
    before = offline_globals()
    ds = load_hf(DATASET_ID, split="train", streaming=streaming, cache_dir=str(hf_cache), local_files_only=True)
    assert list(ds) == ROWS
    assert no_network == [], f"the hub was contacted: {no_network}"
    assert offline_globals() == before


def test_local_files_only_stream_and_trainer_data(hf_cache, no_network):
    from trainkit.config import validate
    from trainkit.config.base import TrainConfig
    from trainkit.data import load_rows
    from trainkit.text_windows import WindowStream, estimate_data
    from trainkit.tokenizer import build_byte_level_tokenizer

    before = offline_globals()
    tok = build_byte_level_tokenizer()
    source = {"path": DATASET_ID, "cache_dir": str(hf_cache), "local_files_only": True}
    assert estimate_data(source, tok, 8).rows == len(ROWS)
    assert len(list(WindowStream(source, tok, 8, epochs=1))) > 0
    rows = load_rows(validate({"paths": {"data_path": DATASET_ID, "cache_dir": str(hf_cache)},
                               "model": {"local_files_only": True}}, TrainConfig))
    assert rows["text"] == [r["text"] for r in ROWS]
    assert no_network == [] and offline_globals() == before


def test_local_files_only_every_split_for_tasks(hf_cache, no_network):
    from trainkit.tasks.base import load_hf as load_task_splits

    path, splits = load_task_splits([(DATASET_ID, None)], "tiny", "TINY_DIR", "train.jsonl", str(hf_cache), True)
    assert path == DATASET_ID and splits == {"train": ROWS} and no_network == []


def test_local_files_only_missing_dataset_is_one_line(tmp_path, no_network):
    with pytest.raises(ConfigError, match=r"^paths\.data_path: cannot load dataset 'nobody/missing' \(split 'train'\): ") as e:
        load_hf("nobody/missing", cache_dir=str(tmp_path), local_files_only=True, key="paths.data_path")
    assert "\n" not in str(e.value) and no_network == []


def test_hf_hub_offline_env_is_datasets_own_switch(hf_cache):
    """HF_HUB_OFFLINE=1, read by datasets at import: a plain load (local_files_only false) uses the cache."""
    code = ("import sys, datasets; from trainkit.data_sources import load_hf, offline_mode; assert offline_mode(); "
            f"ds = load_hf({DATASET_ID!r}, cache_dir=sys.argv[1]); print(len(ds))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    run = subprocess.run([sys.executable, "-c", code, str(hf_cache)], capture_output=True, text=True, cwd=REPO,
                         env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[-1] == str(len(ROWS))


def test_resolve_local_files(tmp_path):
    (tmp_path / "b.jsonl").write_text("{}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.jsonl.gz").write_bytes(b"")
    assert resolve_local_files(str(tmp_path)) == [tmp_path / "b.jsonl", tmp_path / "sub" / "a.jsonl.gz"]
    assert resolve_local_files(str(tmp_path / "*.jsonl")) == [tmp_path / "b.jsonl"]
    assert resolve_local_files("org/name") is None
    with pytest.raises(ConfigError, match=r"^data_path: no such file or directory: \./missing"):
        resolve_local_files("./missing")

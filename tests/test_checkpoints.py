"""Atomic checkpoint directories and top-K retention."""

from __future__ import annotations

import json

import pytest

from trainkit.checkpoints import (atomic_directory, checkpoint_dirs, checkpoints_to_delete, find_latest_checkpoint,
                                  remove_partial_saves)


def make_checkpoint(run_dir, step, complete=True):
    path = run_dir / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(b"x")
    if complete:
        (path / "trainer_state.json").write_text(json.dumps({"step": step}))
    return path


def test_latest_ignores_incomplete_and_staging(tmp_path):
    make_checkpoint(tmp_path, 5)
    make_checkpoint(tmp_path, 20)
    make_checkpoint(tmp_path, 30, complete=False)          # crash before trainer_state.json
    (tmp_path / ".tmp-checkpoint-40").mkdir()              # crash before the rename
    (tmp_path / "checkpoint-abc").mkdir()
    assert [s for s, _ in checkpoint_dirs(tmp_path)] == [5, 20]
    assert find_latest_checkpoint(tmp_path).name == "checkpoint-20"
    remove_partial_saves(tmp_path)
    assert not (tmp_path / ".tmp-checkpoint-40").exists()
    assert find_latest_checkpoint(tmp_path / "missing") is None


def test_atomic_directory_crash_leaves_nothing(tmp_path):
    target = tmp_path / "checkpoint-7"
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as staging:
            (staging / "adapter_model.safetensors").write_bytes(b"partial")
            raise RuntimeError("killed during save")
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_atomic_directory_replaces_whole(tmp_path):
    target = tmp_path / "best-adapter"
    with atomic_directory(target) as staging:
        (staging / "a").write_text("1")
    with atomic_directory(target) as staging:
        (staging / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["best-adapter"]


def test_top_k_retention_keeps_best_and_latest():
    scored = [(10, 2.0), (20, 1.5), (30, 1.7), (40, 1.9), (50, None)]
    assert checkpoints_to_delete(scored, keep_top_k=2, greater_is_better=False) == [10, 40]
    assert checkpoints_to_delete(scored, keep_top_k=1, greater_is_better=True) == [20, 30, 40]
    assert checkpoints_to_delete([(10, None), (20, None)], keep_top_k=1, greater_is_better=False) == [10]
    assert checkpoints_to_delete([], 3, False) == []


def test_archive_run_dir_never_overwrites(tmp_path):
    from trainkit.checkpoints import archive_run_dir

    run = tmp_path / "run"
    assert archive_run_dir(run) is None
    first, second = [], []
    for kept in (first, second):
        run.mkdir()
        (run / "marker").write_text(str(len(first) + len(second)))
        kept.append(archive_run_dir(run))
    assert not run.exists() and first[0] != second[0]
    assert (first[0] / "marker").read_text() == "0" and (second[0] / "marker").read_text() == "1"


def test_checkpoint_config_from_trainer_state_or_run_json(tmp_path):
    """The config a checkpoint was trained with, as export and generate read it: trainer_state.json in a
    checkpoint, run.json of the run for best-adapter/; a clear error where there is none."""
    import json

    import pytest

    from trainkit.checkpoints import checkpoint_config
    from trainkit.config import validate
    from trainkit.config.lora import LoRAConfig
    from trainkit.resume_check import stored_config
    cfg = validate({"script": "train_lora.py", "lora": {"r": 4}, "paths": {"model_name_or_path": "some/model"}},
                   LoRAConfig)
    run = tmp_path / "run"
    (run / "checkpoint-3").mkdir(parents=True)
    (run / "best-adapter").mkdir()
    (run / "checkpoint-3" / "trainer_state.json").write_text(json.dumps({"step": 3, "config": stored_config(cfg)}))
    (run / "run.json").write_text(json.dumps({"config": stored_config(cfg)}))
    got = checkpoint_config(run / "checkpoint-3")
    assert isinstance(got, LoRAConfig) and got.lora.r == 4 and got.paths.model_name_or_path == "some/model"
    assert checkpoint_config(run / "best-adapter").lora.r == 4
    with pytest.raises(FileNotFoundError, match="no training config found"):
        checkpoint_config(tmp_path / "elsewhere")

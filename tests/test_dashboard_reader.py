"""The dashboard's incremental log reader: offsets, partial lines, rewrites, resumes, bad lines."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from dashboard.downsample import downsample
from dashboard.logreader import JsonlTail
from dashboard.runs import RunStore, make_validator
from dashboard.series import SeriesTable


def line(step, **fields):
    return json.dumps({"step": step, "time": 1000.0 + step, **fields}) + "\n"


@pytest.fixture
def log_file(tmp_path):
    return tmp_path / "training_log.jsonl"


def tail_for(path, stream="training"):
    return JsonlTail(path, make_validator(stream), inside=lambda p: True)


def test_reads_only_new_bytes_and_waits_for_partial_line(log_file):
    log_file.write_text(line(1, loss=2.0) + line(2, loss=1.9))
    tail = tail_for(log_file)
    assert [r["step"] for r in tail.poll().records] == [1, 2]
    assert tail.offset == log_file.stat().st_size
    assert tail.poll().records == []                    # nothing new: nothing read
    with open(log_file, "a") as f:
        f.write('{"step": 3, "loss": 1.')              # a writer in the middle of a line
    assert tail.poll().records == []
    with open(log_file, "a") as f:
        f.write('8}\n')
    assert [r["loss"] for r in tail.poll().records] == [1.8]


def test_truncated_and_replaced_files_are_read_from_the_start(log_file, tmp_path):
    log_file.write_text(line(1) + line(2) + line(3))
    tail = tail_for(log_file)
    assert len(tail.poll().records) == 3
    log_file.write_text(line(1))                       # truncated in place (size shrank)
    batch = tail.poll()
    assert batch.reset and [r["step"] for r in batch.records] == [1]
    replacement = tmp_path / "new.jsonl"               # replaced through rename (new inode)
    replacement.write_text(line(10) + line(11) + line(12) + line(13))
    os.replace(replacement, log_file)
    batch = tail.poll()
    assert batch.reset and [r["step"] for r in batch.records] == [10, 11, 12, 13]


def test_rewritten_in_place_with_a_larger_file_is_noticed(log_file):
    log_file.write_text(line(1, loss=5.0) + line(2, loss=4.0))
    tail = tail_for(log_file)
    tail.poll()
    with open(log_file, "r+") as f:                    # same inode, grew, different bytes before the offset
        f.write(line(7, loss=0.5) + line(8, loss=0.4) + line(9, loss=0.3))
    batch = tail.poll()
    assert batch.reset and [r["step"] for r in batch.records] == [7, 8, 9]


def test_deleted_file_resets(log_file):
    log_file.write_text(line(1))
    tail = tail_for(log_file)
    tail.poll()
    log_file.unlink()
    assert tail.poll().reset


def test_malformed_lines_are_skipped_and_counted(log_file):
    with open(log_file, "wb") as f:
        f.write(line(1, loss=2.0).encode())
        f.write(b"this is not json\n")
        f.write(b"\x00\xff\xfe\x89PNG binary garbage\n")
        f.write(b'{"step": NaN, "loss": 1.0}\n')
        f.write(b'{"step": 2, "loss": Infinity}\n')
        f.write(b'{"step": "three", "loss": 1.0}\n')
        f.write(b'{"step": 4, "loss": "low"}\n')
        f.write(b'{"step": true}\n')
        f.write(b'[1, 2, 3]\n')
        f.write(b'{"step": 5, "loss": ' + b'1' * (10 * 1024 * 1024) + b'}\n')   # a 10 MB line
        f.write(b"[" * 100000 + b"\n")                  # nesting deep enough to hit the recursion limit
        f.write(b"\n")
        f.write(line(6, loss=1.5).encode())
    tail = tail_for(log_file)
    records = []
    while True:
        batch = tail.poll()
        records += batch.records
        if not batch.more:
            break
    assert [r["step"] for r in records] == [1, 6]
    assert dict(tail.skipped) == {"invalid_json": 5, "wrong_type": 1, "bad_step": 2,
                                  "not_an_object": 1, "line_too_long": 1}
    assert tail.offset == log_file.stat().st_size


def test_a_huge_line_still_being_written_is_skipped_without_buffering_it(log_file):
    tail = tail_for(log_file)
    with open(log_file, "wb") as f:
        f.write(line(1).encode() + b'{"step": 2, "blob": "' + b"x" * (6 * 1024 * 1024))
    while tail.poll().more:
        pass
    assert tail.skipping_long_line and tail.offset == log_file.stat().st_size
    with open(log_file, "ab") as f:
        f.write(b'"}\n' + line(3).encode())
    assert [r["step"] for r in tail.poll().records] == [3]
    assert tail.skipped["line_too_long"] == 1


def test_series_drops_the_later_steps_of_an_earlier_attempt():
    table = SeriesTable()
    table.append([{"step": s, "loss": 10.0 - s} for s in range(1, 11)])
    resumes = table.append([{"step": s, "loss": 100.0 + s} for s in (6, 7, 8)])   # resumed from 5
    assert [r["to_step"] for r in resumes] == [6.0] and resumes[0]["from_step"] == 10.0
    assert table.steps.tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    assert table.column("loss")[-3:].tolist() == [106.0, 107.0, 108.0]
    # a resume inside one batch, and a new field appearing later
    table.append([{"step": 9, "loss": 1.0}, {"step": 10, "loss": 1.0}, {"step": 9, "loss": 2.0, "lr": 0.1}])
    assert table.steps.tolist()[-2:] == [8, 9]
    assert table.column("loss")[-1] == 2.0 and table.column("lr")[-1] == 0.1
    assert np.isnan(table.column("lr")[0])
    assert len(table.resumes) == 2


def test_series_keeps_text_fields_out_of_the_numeric_columns():
    table = SeriesTable()
    table.append([{"step": 1, "metric": "eval_loss", "eval_loss": 2.0, "is_best": True}])
    assert "metric" not in table.columns and table.strings["metric"] == "eval_loss"
    assert table.column("is_best").tolist() == [1.0]


def test_downsample_keeps_first_last_and_the_extremes():
    steps = np.arange(1, 100_001, dtype=float)
    values = np.sin(steps / 1000.0)
    values[54_321] = 50.0                               # a single spike
    values[777] = np.nan
    data = downsample(steps, {"loss": values}, 1000)
    series = data["series"]["loss"]
    assert 600 <= len(data["step"]) <= 1000 and data["downsampled"]
    assert data["step"][0] == 1 and data["step"][-1] == 100_000
    assert series["value"][0] == values[0] and series["value"][-1] == values[-1]
    assert np.nanmax(series["max"]) == 50.0             # the spike survives in the band
    assert np.all(series["min"] <= series["value"] + 1e-12) and np.all(series["value"] <= series["max"] + 1e-12)
    assert np.all(np.diff(data["step"]) > 0)
    small = downsample(steps[:10], {"loss": values[:10]}, 1000)
    assert not small["downsampled"] and len(small["step"]) == 10


def test_store_notices_runs_appearing_and_disappearing(tmp_path):
    store = RunStore(tmp_path)
    store.poll_once()
    assert store.runs == {}
    (tmp_path / "a" / "logs").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "run.json").write_text('{"status": "running"}')
    (tmp_path / "not-a-run").mkdir()
    (tmp_path / "a" / "logs" / "training_log.jsonl").write_text(line(1, loss=1.0))
    store.poll_once()
    assert set(store.runs) == {"a", "b"}
    assert store.get("a").training.steps.tolist() == [1]
    (tmp_path / "b" / "run.json").unlink()
    (tmp_path / "b").rmdir()
    store.poll_once()
    assert set(store.runs) == {"a"}


def test_symlinks_out_of_the_logdir_are_not_followed(tmp_path):
    outside = tmp_path / "outside"
    (outside / "logs").mkdir(parents=True)
    (outside / "logs" / "training_log.jsonl").write_text(line(1, loss=123.0))
    logdir = tmp_path / "logdir"
    (logdir / "run" / "logs").mkdir(parents=True)
    (logdir / "escape").symlink_to(outside)            # a run dir that points outside
    (logdir / "run" / "logs" / "training_log.jsonl").symlink_to(outside / "logs" / "training_log.jsonl")
    store = RunStore(logdir)
    store.poll_once()
    assert set(store.runs) == {"run"}
    assert len(store.get("run").training) == 0


def test_stalled_status(tmp_path):
    run_dir = tmp_path / "r"
    (run_dir / "logs").mkdir(parents=True)
    (run_dir / "run.json").write_text('{"status": "running"}')
    (run_dir / "logs" / "training_log.jsonl").write_text(line(1))
    old = 1_000_000.0
    for path in (run_dir / "run.json", run_dir / "logs" / "training_log.jsonl"):
        os.utime(path, (old, old))
    store = RunStore(tmp_path, stall_seconds=60)
    store.poll_once()
    run = store.get("r")
    assert run.status(60) == "stalled"
    (run_dir / "logs" / "training_log.jsonl").write_text(line(1) + line(2))   # it writes again
    store.poll_once()
    assert run.status(60) == "running"


def test_checkpoint_state_symlinked_outside_is_not_read(tmp_path):
    secret = tmp_path / "secret.json"
    secret.write_text('{"step": 5, "metric_name": "leaked", "metric_value": 1.0}')
    logdir = tmp_path / "logdir"
    (logdir / "run" / "checkpoint-5").mkdir(parents=True)
    (logdir / "run" / "run.json").write_text('{"status": "running"}')
    (logdir / "run" / "checkpoint-5" / "trainer_state.json").symlink_to(secret)
    store = RunStore(logdir)
    store.poll_once()
    [row] = store.get("run").checkpoints
    assert row["step"] == 5 and row["metric_name"] is None and row["state"] == "kept"


def test_a_huge_step_is_a_bad_line_not_a_resume(log_file):
    """"step": 1e308 parses as a float; taken as a step it would make the next line look like a resume."""
    log_file.write_text(line(1, loss=2.0) + '{"step": 1e308, "loss": 9.0}\n' + line(2, loss=1.9) + line(3, loss=1.8))
    tail = tail_for(log_file)
    batch = tail.poll()
    table = SeriesTable()
    table.append(batch.records)
    assert table.steps.tolist() == [1, 2, 3] and table.resumes == []
    assert tail.skipped["bad_step"] == 1


def test_same_length_rewrite_in_place_is_noticed(log_file):
    """README: a file rewritten in place is read again. Same size, other bytes, new mtime."""
    log_file.write_text(line(1, loss=5.0) + line(2, loss=4.0) + line(3, loss=3.0))
    tail = tail_for(log_file)
    assert [r["loss"] for r in tail.poll().records] == [5.0, 4.0, 3.0]
    stat = log_file.stat()
    with open(log_file, "r+") as f:                    # same inode, same size: loss 5.0 -> 7.0 in line 1
        f.write(line(1, loss=7.0))
    os.utime(log_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))   # what the write did, within a clock tick
    assert log_file.stat().st_size == stat.st_size
    batch = tail.poll()
    assert batch.reset and [r["loss"] for r in batch.records] == [7.0, 4.0, 3.0]


def test_a_touch_is_not_a_rewrite(log_file):
    log_file.write_text(line(1, loss=5.0) + line(2, loss=4.0))
    tail = tail_for(log_file)
    tail.poll()
    os.utime(log_file, ns=(log_file.stat().st_atime_ns, log_file.stat().st_mtime_ns + 5_000_000))
    batch = tail.poll()
    assert not batch.reset and batch.records == [] and tail.resets == 0


def test_symlinked_run_json_outside_the_logdir_says_nothing(tmp_path):
    """Neither its content nor its mtime (last_activity) may leak from outside the logdir."""
    outside = tmp_path / "outside.json"
    outside.write_text('{"status": "running", "script": "leaked.py"}')
    logdir = tmp_path / "logdir"
    (logdir / "run" / "logs").mkdir(parents=True)
    (logdir / "run" / "logs" / "training_log.jsonl").write_text(line(1))
    old = 1_000_000.0
    os.utime(logdir / "run" / "logs" / "training_log.jsonl", (old, old))
    (logdir / "run" / "run.json").symlink_to(outside)          # outside.json's mtime is now
    store = RunStore(logdir)
    store.poll_once()
    run = store.get("run")
    assert run.info == {} and run.last_activity == old


def test_run_directories_with_names_that_are_not_utf8(tmp_path):
    raw = os.fsencode(str(tmp_path)) + b"/bad-\xff\xfe-run"
    os.makedirs(raw + b"/logs")
    with open(raw + b"/logs/training_log.jsonl", "w") as f:
        f.write(line(1, loss=2.0) + line(2, loss=1.5))
    (tmp_path / "bad-\\xff\\xfe-run" / "logs").mkdir(parents=True)   # a real directory named like the stand-in
    store = RunStore(tmp_path)
    store.poll_once()
    names = set(store.runs)
    assert names == {"bad-\\xff\\xfe-run", "bad-\\xff\\xfe-run~2"}
    assert all(name.encode("utf-8") for name in names)      # printable text: JSON, URLs and labels take it
    assert store.get("bad-\\xff\\xfe-run~2").training.steps.tolist() == [1, 2]
    assert len(store.get("bad-\\xff\\xfe-run").training) == 0


def brute_force_buckets(steps, values, start, end, max_points):
    """What dashboard.downsample promises, computed the slow way (one bucket at a time)."""
    from dashboard.downsample import bucket_width
    if end - start <= max_points:
        return steps[start:end], values[start:end], values[start:end], values[start:end]
    lo, hi = start + 1, end - 1
    width = bucket_width(lo, hi, max_points)
    out = [[steps[start]], [values[start]], [values[start]], [values[start]]]
    bucket = (lo - 1) // width
    while 1 + bucket * width < hi:
        a, b = max(lo, 1 + bucket * width), min(hi, 1 + (bucket + 1) * width)
        segment = values[a:b].astype(np.float64)
        finite = segment[np.isfinite(segment)]
        out[0].append(steps[(a + b - 1) // 2])
        for part, reduce in zip(out[1:], (np.mean, np.min, np.max)):
            part.append(reduce(finite) if finite.size else np.nan)
        bucket += 1
    for part, value in zip(out, (steps[end - 1], values[end - 1], values[end - 1], values[end - 1])):
        part.append(value)
    return [np.array(part, dtype=np.float64) for part in out]


def test_downsampling_is_extended_as_rows_arrive_and_matches_a_full_recompute():
    rng = np.random.default_rng(0)
    table = SeriesTable()
    for _ in range(40):
        base, count = len(table), int(rng.integers(1, 4000))
        values = rng.normal(size=count)
        values[rng.random(count) < 0.05] = np.nan
        table.append([{"step": base + i + 1, "loss": None if np.isnan(v) else float(v)} for i, v in enumerate(values)])
        n = len(table)
        for max_points in (3, 50, 1000):
            for start, end in ((0, n), (int(rng.integers(0, n)), n), tuple(sorted(rng.integers(0, n + 1, 2)))):
                if end <= start:
                    continue
                got = table.downsample(["loss"], max_points, start, end)
                want = brute_force_buckets(table.steps, table.column("loss"), start, end, max_points)
                assert len(got["step"]) <= max_points
                assert np.array_equal(got["step"], want[0])
                for part, expected in zip(("value", "min", "max"), want[1:]):
                    np.testing.assert_allclose(got["series"]["loss"][part], expected, rtol=2e-6, atol=1e-6)
    blocks = table.blocks["loss"].blocks
    assert blocks == (len(table) - 1) // 64                  # every complete block computed once, kept
    generation = table.generation
    table.append([{"step": 10.5, "loss": 1.0}])              # a resume drops rows: blocks past it are forgotten
    assert table.generation == generation + 1 and table.blocks["loss"].blocks <= 0
    got = table.downsample(["loss"], 5)
    want = brute_force_buckets(table.steps, table.column("loss"), 0, len(table), 5)
    np.testing.assert_allclose(got["series"]["loss"]["value"], want[1], rtol=2e-6, atol=1e-6)

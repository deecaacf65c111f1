"""trainkit.fileio: JSONL reading (strict with file:line, lenient for logs, tails) and files written whole."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from trainkit import fileio

REPO = Path(__file__).resolve().parents[1]


def test_strict_rows_name_file_and_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"a": 1}\n\n{"a": 2}\n[3]\n')
    rows = fileio.iter_jsonl_rows(path)
    assert next(rows) == (0, f"{path} line 1", {"a": 1})
    assert next(rows) == (1, f"{path} line 3", {"a": 2})
    with pytest.raises(fileio.JsonlError, match=rf"^{path} line 4 is a JSON list, expected an object$"):
        next(rows)
    path.write_bytes(b'not json\n{"a": 2}\n')
    assert list(fileio.iter_jsonl_rows(path, start=1)) == [(1, f"{path} line 2", {"a": 2})]  # skipped rows are not parsed
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"a": 1}\n{"a": \xff}\n')
    with pytest.raises(fileio.JsonlError, match=rf"^{bad} line 2: not valid UTF-8 \(byte 0xff at column 7\)$"):
        list(fileio.iter_jsonl_rows(bad))


def test_gzip_rows_count_and_truncated_file(tmp_path):
    path = tmp_path / "rows.jsonl.gz"
    data = gzip.compress(b"".join(json.dumps({"i": i}).encode() + b"\n" for i in range(50)))
    path.write_bytes(data)
    assert [r["i"] for _, _, r in fileio.iter_jsonl_rows(path)] == list(range(50))
    assert fileio.count_jsonl_rows(path) == 50
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(fileio.JsonlError, match=r"cannot read .*rows\.jsonl\.gz \(corrupt or truncated\?\) after line \d+: "):
        list(fileio.iter_jsonl_rows(path))
    with pytest.raises(fileio.JsonlError, match=r"cannot read .*rows\.jsonl\.gz \(corrupt or truncated\?\): "):
        fileio.count_jsonl_rows(path)


def test_log_readers_skip_partial_last_line_and_garbage(tmp_path):
    path = tmp_path / "log.jsonl"
    assert list(fileio.iter_jsonl(path)) == []  # missing file
    path.write_bytes(b'{"step": 1}\ngarbage\n[1]\n{"step": 2}\n{"step": 3')
    assert list(fileio.iter_jsonl(path)) == [{"step": 1}, {"step": 2}]
    assert fileio.last_jsonl_record(path) == {"step": 2}
    assert fileio.last_jsonl_record(tmp_path / "missing.jsonl") is None
    big = tmp_path / "big.jsonl"
    big.write_bytes(b"".join(json.dumps({"step": i, "pad": "x" * 50}).encode() + b"\n" for i in range(1000)))
    assert fileio.last_jsonl_record(big, max_bytes=200) == json.loads(big.read_bytes().splitlines()[-1])
    assert fileio.complete_lines(b'{"a":1}\n{"b":2}\n{"c"') == ([b'{"a":1}', b'{"b":2}'], 16)
    assert fileio.complete_lines(b"no newline yet") == ([], 0)


def test_atomic_write_keeps_the_old_file_and_no_temp_on_failure(tmp_path):
    path = tmp_path / "state.json"
    fileio.write_json_atomic(path, {"loss": float("nan"), "step": 3})
    assert json.loads(path.read_text()) == {"loss": None, "step": 3}
    with pytest.raises(RuntimeError, match="boom"):
        with fileio.atomic_file(path, "w") as f:
            f.write("half")
            raise RuntimeError("boom")
    assert json.loads(path.read_text()) == {"loss": None, "step": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
    fileio.write_jsonl_atomic(tmp_path / "p.jsonl", [{"a": 1}, {"b": Path("x")}])
    assert (tmp_path / "p.jsonl").read_text() == '{"a": 1}\n{"b": "x"}\n'
    fileio.write_bytes_atomic(tmp_path / "b", b"\x00\x01")
    assert (tmp_path / "b").read_bytes() == b"\x00\x01"


def test_append_line(tmp_path):
    path = tmp_path / "log.jsonl"
    fileio.append_line(path, b'{"step": 1}\n')
    fileio.append_line(path, b'{"step": 2}\n')
    assert list(fileio.iter_jsonl(path)) == [{"step": 1}, {"step": 2}]


def test_fileio_imports_only_the_standard_library():
    code = ("import sys; before = set(sys.modules); import trainkit.fileio; "
            "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
            "print(sorted(new - set(sys.stdlib_module_names) - {'trainkit'}))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"

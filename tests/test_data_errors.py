"""Bad data files give one error naming the file and its 1-based line (blank lines counted), on the
train_qlora.py path (trainkit.data) and the distill.py path (trainkit.text_windows); empty texts are
counted and left out, an all-empty file is an error. The scripts turn them into one line, exit 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from helpers_qlora import REPO, run_script, tiny_config
from trainkit.config import ConfigError, validate
from trainkit.config.base import TrainConfig
from trainkit.data import build_datasets
from trainkit.text_windows import WindowStream, estimate_data
from trainkit.tokenizer import build_byte_level_tokenizer

TOK = build_byte_level_tokenizer()
GOOD = [json.dumps({"text": f"document number {i} with some words in it"}) for i in range(12)]


def qlora_data(path: Path):
    cfg = validate({"paths": {"data_path": str(path)}, "model": {"config": {"model_type": "llama"}},
                    "training": {"seed": 3, "val_split": 0.1, "max_seq_length": 16}}, TrainConfig)
    return build_datasets(cfg, TOK)


def distill_data(path: Path, text_field: str | None = "text"):
    source = {"path": str(path), "key": "paths.data_path", "text_field": text_field}
    estimate = estimate_data(source, TOK, 8)
    next(iter(WindowStream(source, TOK, 8)))
    return estimate


def distill_chat(path: Path):
    return distill_data(path, text_field=None)


def error_of(load, path: Path) -> str:
    with pytest.raises(ConfigError) as e:
        load(path)
    message = str(e.value)
    assert "\n" not in message
    return message


def write(path: Path, lines: list[str] | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(lines if isinstance(lines, bytes) else ("\n".join(lines) + "\n").encode())
    return path


def test_mixed_formats_in_one_file(tmp_path):
    path = write(tmp_path / "mixed.jsonl", GOOD[:2] + [""] + [json.dumps({"prompt": "Q?", "response": "A."})] + GOOD[2:])
    message = error_of(qlora_data, path)
    assert message == (f"paths.data_path: {path} line 4 is a `prompt`/`response` row, but {path} line 1 is a `text` row: "
                       "use one format per dataset")


@pytest.mark.parametrize("load", [qlora_data, distill_data], ids=["qlora", "distill"])
def test_lone_surrogate_names_the_line(tmp_path, load):
    path = write(tmp_path / "surrogate.jsonl", GOOD[:2] + ['{"text": "broken \\ud800 text"}'] + GOOD[2:])
    assert error_of(load, path) == (f"paths.data_path: {path} line 3: a string holds a lone surrogate \\ud800, "
                                    "which is not valid Unicode text")


@pytest.mark.parametrize("load", [qlora_data, distill_data], ids=["qlora", "distill"])
def test_non_utf8_byte_names_the_line(tmp_path, load):
    path = write(tmp_path / "latin1.jsonl", ("\n".join(GOOD[:2]) + "\n\n").encode() + b'{"text": "caf\xe9"}\n'
                 + ("\n".join(GOOD[2:]) + "\n").encode())
    assert error_of(load, path) == f"paths.data_path: {path} line 4: not valid UTF-8 (byte 0xe9 at column 14)"


@pytest.mark.parametrize("load,expected", [(qlora_data, "line 9: `text` must be a string (got int)"),
                                           (distill_data, "line 9 has a int in the `text` field (fields: text)")],
                         ids=["qlora", "distill"])
def test_errors_name_the_file_line_not_the_row(tmp_path, load, expected):
    # rows 1-6 on lines 1-8 (two blank lines), the bad row 7 on line 9
    lines = GOOD[:3] + [""] + GOOD[3:5] + ["   "] + GOOD[5:6] + [json.dumps({"text": 5})] + GOOD[6:]
    path = write(tmp_path / "blank_lines.jsonl", lines)
    assert error_of(load, path) == f"paths.data_path: {path} {expected}"


@pytest.mark.parametrize("load", [qlora_data, distill_data], ids=["qlora", "distill"])
def test_directory_errors_name_the_file_inside(tmp_path, load):
    write(tmp_path / "shards" / "a.jsonl", GOOD)
    bad = write(tmp_path / "shards" / "b.jsonl", GOOD[:1] + [json.dumps({"text": None, "body": "x"})])
    message = error_of(load, tmp_path / "shards")
    assert message.startswith(f"paths.data_path: {bad} line 2"), message


@pytest.mark.parametrize("load", [qlora_data, distill_chat], ids=["qlora", "distill-stage2"])
def test_unknown_chat_role_names_the_line(tmp_path, load):
    def chat(role):
        return json.dumps({"messages": [{"role": role, "content": "Hello there"}, {"role": "assistant", "content": "Hi!"}]})
    path = write(tmp_path / "chat.jsonl", [chat("user")] * 2 + [chat("robot")] + [chat("user")] * 9)
    message = error_of(load, path)
    assert message.startswith(f"paths.data_path: {path} line 3") and "unknown role robot" in message, message


def test_empty_texts_are_counted_and_left_out(tmp_path):
    empty = [json.dumps({"text": ""})] * 100 + [json.dumps({"text": "   "})] * 100
    path = write(tmp_path / "some_empty.jsonl", GOOD + empty)
    train, val, info = qlora_data(path)
    assert info["empty_rows"] == 200 and info["first_empty_row"] == f"{path} line 13"
    assert info["rows"] == len(GOOD)
    estimate = distill_data(path)
    assert estimate.empty_rows == 200 and estimate.first_empty_row == f"{path} line 13"
    assert estimate.tokens == estimate_data(str(write(tmp_path / "good.jsonl", GOOD)), TOK, 8).tokens


@pytest.mark.parametrize("load", [qlora_data, distill_data], ids=["qlora", "distill"])
def test_all_empty_texts_are_an_error(tmp_path, load):
    path = write(tmp_path / "empty.jsonl", [json.dumps({"text": ""})] * 200)
    message = error_of(load, path)
    assert "all 200 rows" in message and f"(first: {path} line 1)" in message, message


# ---------------------------------------------------------------- the scripts: one line, exit 2

def assert_config_error(result, *parts: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("config error: ") and all(p in last for p in parts), last


def test_train_qlora_mixed_file_is_one_line(tmp_path):
    path = write(tmp_path / "mixed.jsonl", GOOD[:2] + [json.dumps({"prompt": "Q?", "response": "A."})] + GOOD[2:])
    config = tiny_config(tmp_path, paths={"data_path": str(path)})
    assert_config_error(run_script(["--config", str(config)]), f"{path} line 3", "one format")


def test_distill_lone_surrogate_is_one_line(tmp_path):
    from test_distill import distill_config
    path = write(tmp_path / "surrogate.jsonl", GOOD[:2] + ['{"text": "broken \\ud800 text"}'] + GOOD[2:])
    config = distill_config(tmp_path, paths={"data_path": str(path)})
    assert_config_error(run_script(["--config", str(config)], script="distill.py"), f"{path} line 3", "lone surrogate")


def test_train_lora_task_file_with_bad_byte_is_one_line(tmp_path):
    from test_train_lora import lora_config
    glue = tmp_path / "glue"
    shutil.copytree(REPO / "data" / "tasks" / "glue", glue)
    train = glue / "sst2" / "train.jsonl"
    train.write_bytes(train.read_bytes() + b'{"sentence": "caf\xe9", "label": 1}\n')
    n_lines = train.read_bytes().count(b"\n")
    config = lora_config(tmp_path, task={"local_dir": str(glue)})
    assert_config_error(run_script(["--config", str(config)], script="train_lora.py"), f"{train} line {n_lines}",
                        "not valid UTF-8")

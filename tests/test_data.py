"""trainkit.data: loading, format detection, split, packing, loss masks, collator, errors."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from trainkit.config import ConfigError, validate
from trainkit.config.base import TrainConfig
from trainkit.data import (IGNORE_INDEX, build_datasets, count_target_tokens, detect_format, load_rows,
                           make_collator, split_indices)
from trainkit.tokenizer import build_byte_level_tokenizer

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"


@pytest.fixture(scope="module")
def tok():
    return build_byte_level_tokenizer()


def make_cfg(data_path, **training):
    return validate({"paths": {"data_path": str(data_path)}, "model": {"config": {"model_type": "llama"}},
                     "training": {"seed": 3, "val_split": 0.1, "max_seq_length": 64, **training}}, TrainConfig)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def as_lists(ds):
    return [{k: list(v) for k, v in ds[i].items()} for i in range(len(ds))]


# ------------------------------------------------------------------------- shipped data

def test_shipped_data_is_small_and_well_formed():
    total = sum(p.stat().st_size for p in DATA.iterdir())
    assert total < 2_000_000
    corpus = read_jsonl(DATA / "tiny_corpus.jsonl")
    assert len(corpus) >= 500 and all(isinstance(r["text"], str) and r["text"] for r in corpus)
    instr = read_jsonl(DATA / "tiny_instructions.jsonl")
    assert len(instr) >= 200 and all(set(r) == {"prompt", "response"} for r in instr)
    chat = read_jsonl(DATA / "tiny_chat.jsonl")
    assert len(chat) >= 100 and all(r["messages"][-1]["role"] == "assistant" for r in chat)


# ------------------------------------------------------------------------- format detection

@pytest.mark.parametrize("name,fmt", [("tiny_corpus.jsonl", "text"), ("tiny_instructions.jsonl", "prompt_response"),
                                      ("tiny_chat.jsonl", "messages")])
def test_detects_format_of_shipped_files(tok, name, fmt):
    _, _, info = build_datasets(make_cfg(DATA / name), tok)
    assert info["format"] == fmt


def test_detect_format_columns():
    assert detect_format(["text", "id"]) == "text"
    assert detect_format(["prompt", "completion"]) == "prompt_response"
    assert detect_format(["messages", "text"]) == "messages"
    with pytest.raises(ConfigError) as e:
        detect_format(["prompt", "answer"])
    assert str(e.value) == ("paths.data_path: unknown row format (columns: answer, prompt); "
                            "expected `text`, `messages`, or `prompt` and `response`")


# ------------------------------------------------------------------------- errors

def test_error_missing_file(tmp_path, tok):
    with pytest.raises(ConfigError) as e:
        build_datasets(make_cfg(tmp_path / "nope.jsonl"), tok)
    assert str(e.value) == f"paths.data_path: no such file or directory: {tmp_path / 'nope.jsonl'}"


def test_error_empty_file(tmp_path, tok):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(ConfigError) as e:
        build_datasets(make_cfg(path), tok)
    assert str(e.value) == f"paths.data_path: {path} holds no rows (empty file or only blank lines)"


def test_error_unknown_columns(tmp_path, tok):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"question": "a", "answer": "b"}] * 3)
    with pytest.raises(ConfigError) as e:
        build_datasets(make_cfg(path), tok)
    assert str(e.value) == (f"paths.data_path: {path} line 1: unknown row format (columns: answer, question); "
                            "expected `text`, `messages`, or `prompt` and `response`")


def test_error_bad_json_and_bad_rows(tmp_path, tok):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(ConfigError) as e:
        load_rows(make_cfg(path))
    assert str(e.value).startswith(f"paths.data_path: {path} line 2 is not valid JSON")
    path = write_jsonl(tmp_path / "mixed.jsonl", [{"text": "ok"}, {"text": 5}])
    with pytest.raises(ConfigError) as e:
        load_rows(make_cfg(path))
    assert str(e.value) == f"paths.data_path: {path} line 2: `text` must be a string (got int)"


def test_error_empty_directory_and_too_little_text(tmp_path, tok):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("x")
    with pytest.raises(ConfigError) as e:
        load_rows(make_cfg(tmp_path / "d"))
    assert str(e.value) == f"paths.data_path: no *.jsonl or *.jsonl.gz files in directory {tmp_path / 'd'} (found: notes.txt)"
    path = write_jsonl(tmp_path / "short.jsonl", [{"text": "tiny"}] * 3)
    with pytest.raises(ConfigError) as e:
        build_datasets(make_cfg(path, max_seq_length=64), tok)
    assert str(e.value).startswith("paths.data_path: ") and "training.max_seq_length=64" in str(e.value)


def test_error_bad_hub_id(tok, monkeypatch):
    import datasets
    import huggingface_hub

    # Offline (CI has no hub): both libraries read these flags at import time.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(ConfigError) as e:
        load_rows(make_cfg("no-such-org-xyz/no-such-dataset"))
    msg = str(e.value)
    assert msg.startswith("paths.data_path: cannot load dataset 'no-such-org-xyz/no-such-dataset' (split 'train'): ")
    assert "\n" not in msg


def test_directory_of_jsonl_and_gz(tmp_path, tok):
    d = tmp_path / "shards"
    d.mkdir()
    write_jsonl(d / "a.jsonl", [{"text": "alpha"}, {"text": "beta"}])
    with gzip.open(d / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "gamma"}) + "\n")
    rows = load_rows(make_cfg(d))
    assert rows["text"] == ["alpha", "beta", "gamma"]


# ------------------------------------------------------------------------- split

def test_split_deterministic_disjoint_complete():
    a = split_indices(1000, 0.05, seed=1)
    assert a == split_indices(1000, 0.05, seed=1)
    train, val = a
    assert len(val) == 50 and not set(train) & set(val) and sorted(train + val) == list(range(1000))
    assert split_indices(1000, 0.05, seed=2)[1] != val
    assert split_indices(2, 0.01, seed=0)[1] and split_indices(2, 0.99, seed=0)[0]  # never empty either side
    assert split_indices(10, 0.0, seed=0) == (list(range(10)), [])
    assert split_indices(1, 0.5, seed=0) == ([0], [])


def test_split_is_on_rows_before_tokenization(tmp_path, tok):
    rows = [{"prompt": f"Q{i}:", "response": f" answer number {i}"} for i in range(40)]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    train, val, info = build_datasets(make_cfg(path, val_split=0.25), tok)
    assert (info["train_rows"], info["val_rows"]) == (30, 10)
    decode = lambda ds: {tok.decode(ex["input_ids"]) for ex in as_lists(ds)}
    train_text, val_text = decode(train), decode(val)
    assert not train_text & val_text
    assert train_text | val_text == {r["prompt"] + r["response"] + tok.eos_token for r in rows}
    # Same split for another max_seq_length (the split does not depend on tokenization).
    _, val2, _ = build_datasets(make_cfg(path, val_split=0.25, max_seq_length=32), tok)
    assert {t[:20] for t in decode(val2)} == {t[:20] for t in val_text}


def test_build_is_deterministic(tok):
    cfg = make_cfg(DATA / "tiny_corpus.jsonl", max_seq_length=128)
    a_train, a_val, a_info = build_datasets(cfg, tok)
    b_train, b_val, b_info = build_datasets(cfg, tok)
    assert a_info == b_info
    assert a_train.data.table.equals(b_train.data.table) and a_val.data.table.equals(b_val.data.table)


def test_no_cache_sharing_between_seq_lengths_or_tokenizers(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "word " * 50}] * 20)
    a, _, _ = build_datasets(make_cfg(path, max_seq_length=32), tok)
    b, _, _ = build_datasets(make_cfg(path, max_seq_length=16), tok)
    assert len(a[0]["input_ids"]) == 32 and len(b[0]["input_ids"]) == 16
    other = build_byte_level_tokenizer()
    other.add_tokens(["word"])  # a different tokenizer must give different ids
    c, _, _ = build_datasets(make_cfg(path, max_seq_length=32), other)
    assert c[0]["input_ids"] != a[0]["input_ids"]


# ------------------------------------------------------------------------- packing

def test_packing_windows_exact_and_lossless(tmp_path, tok):
    docs = [f"Document {i}: " + "héllo wörld " * (i % 7 + 1) for i in range(60)]
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in docs])
    L = 48
    train, val, info = build_datasets(make_cfg(path, max_seq_length=L, val_split=0.1), tok)
    train_idx, val_idx = split_indices(len(docs), 0.1, seed=3)
    for ds, idx in ((train, train_idx), (val, val_idx)):
        stream = [t for i in idx for t in tok(docs[i], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
        windows = as_lists(ds)
        assert windows and all(len(w["input_ids"]) == L for w in windows)
        assert all(w["labels"] == w["input_ids"] and w["attention_mask"] == [1] * L for w in windows)
        flat = [t for w in windows for t in w["input_ids"]]
        assert flat == stream[: len(stream) // L * L]  # concatenation = docs + eos, only the tail dropped
    assert info["train_examples"] == len(train) and info["train_tokens"] == len(train) * L
    assert info["packing"] is True and tok.pad_token_id not in flat


def test_no_packing_truncates_each_row(tmp_path, tok):
    docs = ["short", "x" * 100, "medium length text"]
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in docs])
    train, val, info = build_datasets(make_cfg(path, max_seq_length=16, packing=False, val_split=0.0), tok)
    got = as_lists(train)
    expect = [(tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])[:16] for d in docs]
    assert [g["input_ids"] for g in got] == expect
    assert all(g["labels"] == g["input_ids"] for g in got)
    assert info["truncated_rows"] == 2 and len(val) == 0


def test_validation_never_empty_with_short_val_text(tmp_path, tok):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": "a fairly long document " * 10}] * 9 + [{"text": "hi"}])
    _, val, info = build_datasets(make_cfg(path, max_seq_length=64, val_split=0.1, seed=0), tok)
    assert info["val_rows"] == 1 and len(val) >= 1


# ------------------------------------------------------------------------- loss masks

def test_prompt_response_masks_exactly_the_prompt(tok):
    train, val, info = build_datasets(make_cfg(DATA / "tiny_instructions.jsonl", max_seq_length=256), tok)
    rows = {r["prompt"] + r["response"]: r for r in read_jsonl(DATA / "tiny_instructions.jsonl")}
    examples = as_lists(train) + as_lists(val)
    assert len(examples) == len(rows) == info["rows"] and info["dropped_rows"] == 0
    for ex in examples:
        text = tok.decode(ex["input_ids"])
        row = rows[text[: -len(tok.eos_token)]]
        n_prompt = len(tok(row["prompt"], add_special_tokens=False)["input_ids"])
        assert ex["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
        assert tok.decode([t for t in ex["labels"] if t != IGNORE_INDEX]) == row["response"] + tok.eos_token


def test_chat_loss_only_on_assistant_turns(tmp_path, tok):
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                          {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3+3?"},
                          {"role": "assistant", "content": "Six, 6."}]},
            {"messages": [{"role": "user", "content": "Héllo 🙂"}, {"role": "assistant", "content": "Grüße!"}]}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    train, _, _ = build_datasets(make_cfg(path, val_split=0.0, max_seq_length=256), tok)
    for ex, row in zip(as_lists(train), rows):
        assert tok.decode(ex["input_ids"]) == tok.apply_chat_template(row["messages"], tokenize=False)
        # Targets are exactly the assistant contents, each followed by eos, in order.
        runs, cur = [], []
        for t, lab in zip(ex["input_ids"], ex["labels"]):
            if lab == IGNORE_INDEX:
                if cur:
                    runs.append(cur)
                cur = []
            else:
                assert lab == t
                cur.append(t)
        runs += [cur] if cur else []
        assert [tok.decode(r) for r in runs] == [m["content"] + tok.eos_token for m in row["messages"]
                                                 if m["role"] == "assistant"]


def test_chat_matches_template_assistant_mask(tok):
    train, _, _ = build_datasets(make_cfg(DATA / "tiny_chat.jsonl", max_seq_length=1024, val_split=0.0), tok)
    rows = read_jsonl(DATA / "tiny_chat.jsonl")
    for ex, row in zip(as_lists(train)[:50], rows[:50]):
        ref = tok.apply_chat_template(row["messages"], return_dict=True, return_assistant_tokens_mask=True)
        assert ex["input_ids"] == ref["input_ids"]
        assert [lab != IGNORE_INDEX for lab in ex["labels"]] == [bool(m) for m in ref["assistant_masks"]]


def test_truncation_keeps_targets_or_drops_row(tmp_path, tok):
    rows = [{"prompt": "p" * 30, "response": "r" * 30},   # truncated inside the response: kept
            {"prompt": "q" * 100, "response": "long answer"},  # response cut away entirely: dropped
            {"prompt": "ok?", "response": " yes"}]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    train, _, info = build_datasets(make_cfg(path, max_seq_length=40, val_split=0.0), tok)
    got = as_lists(train)
    assert len(got) == 2 and info["dropped_rows"] == 1 and info["truncated_rows"] == 2
    assert all(len(g["input_ids"]) <= 40 for g in got)
    assert got[0]["labels"] == [IGNORE_INDEX] * 30 + [ord("r")] * 10


# ------------------------------------------------------------------------- collator

def test_collator_pads_right(tok):
    collate = make_collator(tok)
    batch = collate([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "attention_mask": [1, 1, 1]},
                     {"input_ids": torch.tensor([4]), "labels": torch.tensor([4]), "attention_mask": torch.tensor([1])}])
    pad = tok.pad_token_id
    assert all(v.dtype == torch.long for v in batch.values())
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, pad, pad]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert count_target_tokens(batch) == 3
    assert make_collator(tok, pad_to_multiple_of=8)([{"input_ids": [1], "labels": [1]}])["input_ids"].shape == (1, 8)


def test_collator_on_real_dataset_with_dataloader(tok):
    from torch.utils.data import DataLoader

    train, _, info = build_datasets(make_cfg(DATA / "tiny_chat.jsonl", max_seq_length=128), tok)
    loader = DataLoader(train, batch_size=8, shuffle=False, collate_fn=make_collator(tok))
    total = 0
    for batch in loader:
        assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
        assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
        total += count_target_tokens(batch)
    assert total == info["train_target_tokens"]

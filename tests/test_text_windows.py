"""trainkit.text_windows (+ text_shards, text_documents, shard_writer): packed windows (contents, sources, ranks, resume, epochs), estimates,
write_shards / scripts/make_shards.py, chat rendering, and the one-line errors."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainkit import shard_writer, text_documents
from trainkit import text_windows as tw
from trainkit.config import ConfigError
from trainkit.fileio import temp_path
from trainkit.shard_writer import read_shard_rows, write_shards
from trainkit.text_windows import WindowStream, estimate_data, estimate_windows
from trainkit.tokenizer import build_byte_level_tokenizer

REPO = Path(__file__).resolve().parents[1]
TINY_CORPUS = REPO / "data" / "tiny_corpus.jsonl"


@pytest.fixture(scope="module")
def tok():
    return build_byte_level_tokenizer()


def corpus_rows(n: int) -> list[dict]:
    with open(TINY_CORPUS) as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


def write_jsonl(path: Path, rows: list[dict], gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def take(stream, n: int) -> list[torch.Tensor]:
    return [w for _, w in zip(range(n), stream)]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def manual_windows(texts: list[str], tok, seq_length: int) -> list[list[int]]:
    stream = []
    for t in texts:
        stream += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    width = seq_length + 1
    return [stream[i:i + width] for i in range(0, len(stream) - width + 1, width)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """60 corpus rows as one .jsonl, one .jsonl.gz, and a directory of 4 .jsonl.gz shards."""
    root = tmp_path_factory.mktemp("src")
    rows = corpus_rows(60)
    plain = write_jsonl(root / "all.jsonl", rows)
    gz = write_jsonl(root / "all.jsonl.gz", rows, gz=True)
    for i in range(4):
        write_jsonl(root / "dir" / f"part-{i}.jsonl.gz", rows[i * 15:(i + 1) * 15], gz=True)
    return {"rows": rows, "plain": plain, "gz": gz, "dir": root / "dir"}


# ---------------------------------------------------------------------------------- windows

def test_windows_are_documents_joined_with_eos(shards, tok):
    texts = [r["text"] for r in shards["rows"]]
    got = list(WindowStream(str(shards["plain"]), tok, 31, epochs=1))
    expected = manual_windows(texts, tok, 31)
    assert len(got) == len(expected) > 10
    assert all(w.dtype == torch.long and w.shape == (32,) for w in got)
    assert [w.tolist() for w in got] == expected  # the tail shorter than a window is dropped
    inputs, labels = got[0][:-1], got[0][1:]
    assert inputs.shape == labels.shape == (31,)


def test_file_gz_directory_and_glob_give_identical_windows(shards, tok):
    kw = dict(seq_length=47, seed=3, shuffle_buffer=5, epochs=1)
    plain = list(WindowStream(str(shards["plain"]), tok, **kw))
    gz = list(WindowStream(str(shards["gz"]), tok, **kw))
    directory = list(WindowStream(str(shards["dir"]), tok, shuffle_shards=False, **kw))
    pattern = list(WindowStream(str(shards["dir"] / "part-*.jsonl.gz"), tok, shuffle_shards=False, **kw))
    assert same(plain, gz) and same(plain, directory) and same(plain, pattern)
    # with shard shuffling on, a directory and the glob of its files are still the same source
    a = list(WindowStream(str(shards["dir"]), tok, **kw))
    b = list(WindowStream(str(shards["dir"] / "*.jsonl.gz"), tok, **kw))
    assert same(a, b) and not same(a, plain)


def test_ranks_are_disjoint_and_cover_the_epoch(shards, tok):
    kw = dict(seq_length=40, seed=5, shuffle_buffer=8, epochs=1)
    full = list(WindowStream(str(shards["dir"]), tok, **kw))
    world = 3
    per_rank = [list(WindowStream(str(shards["dir"]), tok, rank=r, world_size=world, **kw)) for r in range(world)]
    usable = len(full) // world * world  # the incomplete last round is dropped: ranks stay in lockstep
    assert all(len(p) == len(full) // world for p in per_rank)
    for r in range(world):
        assert same(per_rank[r], full[r:usable:world])


def test_resume_continues_exactly(shards, tok):
    kw = dict(seq_length=33, seed=11, shuffle_buffer=7)
    per_epoch = estimate_windows(str(shards["dir"]), tok, 33)
    total = per_epoch + 60  # crosses into epoch 1
    reference = take(WindowStream(str(shards["dir"]), tok, **kw), total)
    for k in (0, 1, 23, per_epoch - 1, per_epoch, per_epoch + 9):
        first = WindowStream(str(shards["dir"]), tok, **kw)
        it = iter(first)
        head = [next(it) for _ in range(k)]
        state = json.loads(json.dumps(first.state_dict()))  # JSON-able
        resumed = WindowStream(str(shards["dir"]), tok, **kw)
        resumed.load_state_dict(state)
        assert same(head + take(resumed, total - k), reference), k
    assert state["epoch"] == 1 and state["windows_consumed"] == 9


def test_resume_does_not_retokenize_the_epoch(shards, tok, monkeypatch):
    kw = dict(seq_length=33, seed=11, shuffle_buffer=4)
    first = WindowStream(str(shards["dir"]), tok, **kw)
    take(first, estimate_windows(str(shards["dir"]), tok, 33) - 3)  # near the end of epoch 0
    rendered = []
    real = tw.render_row
    monkeypatch.setattr(tw, "render_row", lambda row, *a, **k: rendered.append(row) or real(row, *a, **k))
    resumed = WindowStream(str(shards["dir"]), tok, **kw)
    resumed.load_state_dict(first.state_dict())
    take(resumed, 1)
    assert 0 < len(rendered) <= 5  # the rows of the last block only, not the 60 rows of the epoch


def test_resume_with_ranks_and_changed_world_size(shards, tok):
    kw = dict(seq_length=33, seed=2, shuffle_buffer=4)
    world = 2
    streams = [WindowStream(str(shards["dir"]), tok, rank=r, world_size=world, **kw) for r in range(world)]
    iters = [iter(s) for s in streams]
    for _ in range(17):
        for it in iters:
            next(it)
    states = [s.state_dict() for s in streams]
    assert states[0] == states[1]  # rank 0's state resumes every rank
    reference = take(WindowStream(str(shards["dir"]), tok, **kw), 34 + 10)
    single = WindowStream(str(shards["dir"]), tok, **kw)  # world size 2 -> 1: continues at the same window
    single.load_state_dict(states[0])
    assert same(take(single, 10), reference[34:])
    with pytest.raises(ValueError, match="seq_length"):
        WindowStream(str(shards["dir"]), tok, 34, seed=2, shuffle_buffer=4).load_state_dict(states[0])


def test_epoch_rollover_reshuffles_deterministically(shards, tok):
    kw = dict(seq_length=40, shuffle_buffer=6, epochs=2)
    per_epoch = len(list(WindowStream(str(shards["dir"]), tok, seed=7, **{**kw, "epochs": 1})))
    a = list(WindowStream(str(shards["dir"]), tok, seed=7, **kw))
    b = list(WindowStream(str(shards["dir"]), tok, seed=7, **kw))
    c = list(WindowStream(str(shards["dir"]), tok, seed=8, **kw))
    assert len(a) == 2 * per_epoch and same(a, b)
    assert not same(a[:per_epoch], a[per_epoch:])  # epoch 1 has its own shard and window order
    assert not same(a, c)
    orders = [WindowStream(str(shards["dir"]), tok, seed=7, **kw).shard_order(e) for e in range(6)]
    assert orders == [WindowStream(str(shards["dir"]), tok, seed=7, **kw).shard_order(e) for e in range(6)]
    assert len({tuple(o) for o in orders}) > 1 and all(sorted(o) == [0, 1, 2, 3] for o in orders)


def test_estimate_exact_for_small_and_close_from_a_sample(shards, tok):
    counted = len(list(WindowStream(str(shards["dir"]), tok, 50, epochs=1)))
    assert estimate_windows(str(shards["dir"]), tok, 50) == counted
    exact = estimate_data(str(shards["plain"]), tok, 50)
    assert exact.exact and exact.rows == 60 and exact.windows == counted
    sampled = estimate_data(str(shards["dir"]), tok, 50, sample_rows=20)
    assert not sampled.exact and sampled.rows == 60 and sampled.sampled_rows == 20
    assert abs(sampled.windows - counted) / counted < 0.25


def test_shipped_distill_data(tok):
    root = REPO / "data" / "distill"
    assert sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) < 1.5e6
    for name in ("pretrain", "eval", "stage2/chat", "stage2/instructions"):
        manifest = json.loads((root / name / "manifest.json").read_text())
        assert manifest["complete"] and manifest["rows"] == sum(s["rows"] for s in manifest["shards"])
    assert estimate_windows(str(root / "pretrain"), tok, 64) > 1000
    stage2 = WindowStream({"path": str(root / "stage2"), "text_field": None}, tok, 64, epochs=1)
    assert len(list(stage2)) == estimate_windows({"path": str(root / "stage2"), "text_field": None}, tok, 64)


# ---------------------------------------------------------------------------------- HF datasets paths

def test_parquet_through_datasets_matches_jsonl(shards, tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"text": [r["text"] for r in shards["rows"]], "id": list(range(60))}), path)
    jsonl = list(WindowStream(str(shards["plain"]), tok, 29, epochs=1))
    for streaming in (False, True):
        src = {"path": str(path), "streaming": streaming, "cache_dir": str(tmp_path / "cache")}
        assert same(list(WindowStream(src, tok, 29, epochs=1, shuffle_shards=False)), jsonl), streaming
        assert estimate_windows(src, tok, 29) == len(jsonl)


def test_unknown_hub_id_offline_is_one_line_error(tok, tmp_path):
    with pytest.raises(ConfigError, match=r"^data_path: cannot load dataset 'nobody/no-such-dataset'") as e:
        WindowStream({"path": "nobody/no-such-dataset", "local_files_only": True, "cache_dir": str(tmp_path)},
                     tok, 16).shards()
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------- write_shards

def test_write_shards_roundtrip_and_manifest(tmp_path, tok):
    rows = corpus_rows(25)
    src = write_jsonl(tmp_path / "in.jsonl", [{**r, "extra": i} for i, r in enumerate(rows)])
    out = tmp_path / "shards"
    manifest = write_shards(str(src), out, rows_per_shard=10, progress=False)
    assert [s["file"] for s in manifest["shards"]] == ["shard-00000.jsonl.gz", "shard-00001.jsonl.gz", "shard-00002.jsonl.gz"]
    assert [s["rows"] for s in manifest["shards"]] == [10, 10, 5]
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == manifest and on_disk["complete"] and on_disk["rows"] == 25
    assert on_disk["source"] == str(src) and on_disk["split"] == "train" and on_disk["created"]
    assert read_shard_rows(out) == [{"text": r["text"]} for r in rows]
    assert not list(out.glob(".*.tmp*"))
    assert same(list(WindowStream(str(out), tok, 30, epochs=1, shuffle_shards=False)),
                list(WindowStream(str(src), tok, 30, epochs=1)))
    with pytest.raises(ValueError, match="already holds shards"):
        write_shards(str(src), out, progress=False)
    small = write_shards(str(src), out, max_rows=7, overwrite=True, progress=False)
    assert small["rows"] == 7 and len(list(out.glob("shard-*"))) == 1
    by_tokens = write_shards(str(src), tmp_path / "tok", max_tokens=1500, tokenizer=tok, progress=False)
    counted = sum(len(r["text"].encode()) + 1 for r in rows[:by_tokens["rows"]])
    assert by_tokens["tokens"] == counted >= 1500 > counted - len(rows[by_tokens["rows"] - 1]["text"].encode()) - 1


def test_write_shards_whole_rows_and_missing_field(tmp_path):
    chat = REPO / "data" / "tiny_chat.jsonl"
    out = write_shards(str(chat), tmp_path / "chat", text_field=None, progress=False)
    with open(chat) as f:
        assert read_shard_rows(tmp_path / "chat") == [json.loads(line) for line in f]
    assert out["rows"] == 200
    with pytest.raises(ConfigError, match=r"row 0 has no `text` field \(fields: messages\)"):
        write_shards(str(chat), tmp_path / "bad", progress=False)


def test_interrupted_write_leaves_only_whole_shards_listed(tmp_path, tok, monkeypatch):
    src = write_jsonl(tmp_path / "in.jsonl", corpus_rows(30))
    real = shard_writer._write_shard
    calls = []

    def flaky(path, rows):
        calls.append(path)
        if len(calls) == 2:
            temp_path(path).write_bytes(b"\x1f\x8b partial")  # as a process killed while writing leaves it
            raise KeyboardInterrupt
        return real(path, rows)

    monkeypatch.setattr(shard_writer, "_write_shard", flaky)
    with pytest.raises(KeyboardInterrupt):
        write_shards(str(src), tmp_path / "out", rows_per_shard=10, progress=False)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert not manifest["complete"] and [s["file"] for s in manifest["shards"]] == ["shard-00000.jsonl.gz"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [temp_path(calls[1]).name, "manifest.json",
                                                                    "shard-00000.jsonl.gz"]
    assert len(read_shard_rows(tmp_path / "out")) == 10  # readers see the listed shards only


def test_make_shards_cli(tmp_path):
    script = REPO / "scripts" / "make_shards.py"
    help_run = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert help_run.returncode == 0 and "--rows-per-shard" in help_run.stdout
    src = write_jsonl(tmp_path / "in.jsonl", corpus_rows(12))
    run = subprocess.run([sys.executable, str(script), str(src), str(tmp_path / "out"), "--rows-per-shard", "5", "--quiet"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "wrote 12 rows in 3 shard(s)" in run.stdout
    bad = subprocess.run([sys.executable, str(script), str(tmp_path / "nope.jsonl"), str(tmp_path / "o2")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no such file or directory" in bad.stderr and "Traceback" not in bad.stderr


# ---------------------------------------------------------------------------------- rendering

def test_chat_and_prompt_rows_render_with_template(tok, tmp_path):
    chat = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}
    pr = {"prompt": "Q: 2+2?", "response": "4"}
    path = write_jsonl(tmp_path / "mixed.jsonl", [chat, pr, {"text": "plain"}])
    texts = [text_documents.render_row(r, tok, None) for r in (chat, pr, {"text": "plain"})]
    assert texts[0] == tok.apply_chat_template(chat["messages"], tokenize=False)
    assert texts[1] == "<|user|>\nQ: 2+2?\n<|assistant|>\n4<|endoftext|>"
    ids = text_documents.tokenize_documents(texts, tok, tok.eos_token_id)
    assert [int(x[-1]) for x in ids] == [tok.eos_token_id] * 3 and int(ids[0][-2]) != tok.eos_token_id  # one eos, not two
    got = list(WindowStream({"path": str(path), "text_field": None}, tok, 9, epochs=1))
    flat = [t for x in ids for t in x.tolist()]
    assert [w.tolist() for w in got] == [flat[i:i + 10] for i in range(0, len(flat) - 9, 10)]


def test_rows_render_plain_without_template(tok):
    plain_tok = build_byte_level_tokenizer()
    plain_tok.chat_template = None
    row = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                        {"role": "assistant", "content": "Hello."}]}
    assert text_documents.render_row(row, plain_tok, None) == "System: Be brief.\nUser: Hi?\nAssistant: Hello."
    assert text_documents.render_row({"prompt": "Q", "completion": "A"}, plain_tok, None) == "User: Q\nAssistant: A"


# ---------------------------------------------------------------------------------- errors

def one_line_error(fn, match: str, exc=ConfigError) -> str:
    with pytest.raises(exc, match=match) as e:
        fn()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_errors_name_the_path_and_line(tmp_path, tok):
    def windows(src, **kw):
        return lambda: list(WindowStream(src, tok, 8, epochs=1, **kw))

    one_line_error(windows(str(tmp_path / "none" / "*.jsonl.gz")), r"^data_path: no \*\.jsonl.* files match .*none/\*\.jsonl\.gz")
    one_line_error(windows(str(tmp_path / "missing.jsonl")), r"no such file or directory: .*missing\.jsonl")
    (tmp_path / "emptydir").mkdir()
    one_line_error(windows(str(tmp_path / "emptydir")), r"no \*\.jsonl.* files in directory")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, {"body": "no text here"}])
    msg = one_line_error(windows({"path": str(bad), "key": "paths.data_path"}),
                         r"^paths\.data_path: .*bad\.jsonl line 2 has no `text` field \(fields: body\)")
    assert str(bad) in msg
    one_line_error(windows({"path": str(bad), "text_field": "body"}), r"bad\.jsonl line 1 has no `body` field")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    one_line_error(windows(str(tmp_path / "blank.jsonl")), r"blank\.jsonl gives 0 window")
    one_line_error(lambda: estimate_windows(str(tmp_path / "blank.jsonl"), tok, 8), r"holds no rows")
    short = write_jsonl(tmp_path / "short.jsonl", [{"text": "ab"}])
    one_line_error(lambda: take(WindowStream(str(short), tok, 8), 1), r"fewer than the 1 process")
    good = write_jsonl(tmp_path / "good.jsonl.gz", corpus_rows(20), gz=True)
    corrupt = tmp_path / "corrupt.jsonl.gz"
    corrupt.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    one_line_error(windows(str(corrupt)), r"cannot read .*corrupt\.jsonl\.gz \(corrupt or truncated\?\)")
    (tmp_path / "notgz.jsonl.gz").write_text('{"text": "x"}\n')
    one_line_error(windows(str(tmp_path / "notgz.jsonl.gz")), r"cannot read .*notgz\.jsonl\.gz")
    (tmp_path / "notjson.jsonl").write_text('{"text": "x"}\n{oops\n')
    one_line_error(windows(str(tmp_path / "notjson.jsonl")), r"notjson\.jsonl line 2 is not valid JSON")
    weird = write_jsonl(tmp_path / "weird.jsonl", [{"foo": 1}])
    one_line_error(windows({"path": str(weird), "text_field": None}), r"weird\.jsonl line 1: unknown row format \(fields: foo\)")
    with pytest.raises(ValueError, match="unknown keys"):
        WindowStream({"path": str(good), "colour": "red"}, tok, 8)

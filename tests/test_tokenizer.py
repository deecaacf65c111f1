"""The built-in byte-level tokenizer and load_tokenizer's choices and errors."""

from __future__ import annotations

import pytest

from trainkit.config import ConfigError, validate
from trainkit.config.base import TrainConfig
from trainkit.tokenizer import (ASSISTANT_TOKEN, EOS_TOKEN, PAD_TOKEN, SYSTEM_TOKEN, USER_TOKEN,
                                build_byte_level_tokenizer, load_tokenizer, vocab_size_for)

UNICODE_TEXT = "Héllo wörld — 日本語, Ελληνικά, emoji 🙂👍🏽\n\ttabs  and  spaces\r\n\x00nul, trailing space "


@pytest.fixture(scope="module")
def tok():
    return build_byte_level_tokenizer()


def test_ids_are_bytes_and_specials(tok):
    assert len(tok) == vocab_size_for(tok) == 261
    ids = tok("Az\n", add_special_tokens=False)["input_ids"]
    assert ids == [ord("A"), ord("z"), ord("\n")]
    assert tok.eos_token == tok.bos_token == EOS_TOKEN
    assert tok.pad_token == PAD_TOKEN and tok.pad_token_id != tok.eos_token_id
    specials = [tok.convert_tokens_to_ids(t) for t in (EOS_TOKEN, PAD_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, SYSTEM_TOKEN)]
    assert specials == [256, 257, 258, 259, 260]
    # No bos/eos added implicitly: data.py decides where eos goes.
    assert tok("hi")["input_ids"] == [ord("h"), ord("i")]


def test_unicode_round_trip_is_lossless(tok):
    ids = tok(UNICODE_TEXT, add_special_tokens=False)["input_ids"]
    assert ids == list(UNICODE_TEXT.encode("utf-8"))
    assert tok.decode(ids) == UNICODE_TEXT


def test_special_token_strings_are_single_tokens(tok):
    ids = tok(f"a{USER_TOKEN}b{EOS_TOKEN}", add_special_tokens=False)["input_ids"]
    assert ids == [ord("a"), 258, ord("b"), 256]
    assert tok.decode(ids, skip_special_tokens=True) == "ab"


def test_chat_template_and_assistant_mask(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                {"role": "assistant", "content": "Hello."}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == "<|system|>\nBe brief.\n<|user|>\nHi?\n<|assistant|>\nHello.<|endoftext|>"
    prompt = tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert text.startswith(prompt) and prompt.endswith("<|assistant|>\n")
    out = tok.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    target = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tok.decode(target) == "Hello." + EOS_TOKEN
    with pytest.raises(Exception, match="unknown role"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}], tokenize=False)


def test_save_and_load_round_trip(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(loaded) == len(tok)
    assert loaded(UNICODE_TEXT, add_special_tokens=False)["input_ids"] == tok(UNICODE_TEXT, add_special_tokens=False)["input_ids"]
    assert loaded.decode(loaded(UNICODE_TEXT, add_special_tokens=False)["input_ids"]) == UNICODE_TEXT
    assert (loaded.eos_token_id, loaded.pad_token_id, loaded.bos_token_id) == (256, 257, 256)
    assert loaded.chat_template == tok.chat_template


def test_deterministic_build(tok):
    assert build_byte_level_tokenizer().backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()


def _cfg(**paths):
    return validate({"paths": paths, "model": {"config": {"model_type": "llama"}}}, TrainConfig)


def test_load_tokenizer_choices(tok, tmp_path):
    assert len(load_tokenizer(_cfg())) == 261  # model built from config: the byte-level one
    tok.save_pretrained(tmp_path / "tk")
    cfg = _cfg(tokenizer_name_or_path=str(tmp_path / "tk"))
    cfg.model.local_files_only = True
    loaded = load_tokenizer(cfg)
    assert len(loaded) == 261 and loaded.pad_token_id is not None


def test_load_tokenizer_adds_pad_from_eos(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path / "tk")
    no_pad = AutoTokenizer.from_pretrained(tmp_path / "tk", pad_token=None)
    no_pad.pad_token = None
    no_pad.save_pretrained(tmp_path / "nopad")
    assert AutoTokenizer.from_pretrained(tmp_path / "nopad").pad_token is None
    loaded = load_tokenizer(_cfg(tokenizer_name_or_path=str(tmp_path / "nopad")))
    assert loaded.pad_token_id == loaded.eos_token_id == 256


def test_load_tokenizer_error_names_key(tmp_path):
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    cfg = _cfg(tokenizer_name_or_path=str(empty))
    cfg.model.local_files_only = True
    with pytest.raises(ConfigError) as e:
        load_tokenizer(cfg)
    msg = str(e.value)
    assert msg.startswith(f"paths.tokenizer_name_or_path: cannot load tokenizer from {empty}: ")
    assert "\n" not in msg

    cfg = validate({"paths": {"model_name_or_path": "no-such-org/no-such-model"}, "model": {"local_files_only": True}},
                   TrainConfig)
    with pytest.raises(ConfigError) as e:
        load_tokenizer(cfg)
    assert str(e.value).startswith("paths.model_name_or_path: cannot load tokenizer from no-such-org/no-such-model: ")
    assert "\n" not in str(e.value)

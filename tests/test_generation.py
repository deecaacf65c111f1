"""trainkit.generation: batched left-padded generate(), length rules, version checks, label scoring.

A tiny random Llama (2 layers, hidden 64) and the byte-level tokenizer (ASCII char = 1 token);
biases on the logits (a forward hook on lm_head) make the model prefer or avoid given tokens.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from trainkit.generation import (
    GenerationSettings,
    check_generate_support,
    generate_texts,
    label_log_likelihoods,
    score_label_likelihood,
)
from trainkit.tokenizer import build_byte_level_tokenizer

PROMPTS = ["hello", "a much longer prompt, with more words in it", "x", "medium size", "the cat sat on"]


@pytest.fixture(scope="module")
def tok():
    return build_byte_level_tokenizer()


def make_model(tok, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=261, max_position_embeddings=256,
                      initializer_range=0.2,  # peaked logits: no near-ties for greedy to flip on
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    # printable ASCII or eos only: decoded text then has exactly one char per generated token
    banned = [i for i in range(261) if not (32 <= i < 127 or i == tok.eos_token_id)]
    model.get_output_embeddings().register_forward_hook(_ban(banned))
    return model


def _ban(token_ids):
    def hook(module, inputs, output):
        output = output.clone()
        output[..., token_ids] = -1e9
        return output
    return hook


@pytest.fixture(scope="module")
def model(tok):
    return make_model(tok)


@contextlib.contextmanager
def logit_bias(model, token_ids, amount):
    """Add `amount` to the logits of `token_ids` while inside."""
    head = model.get_output_embeddings()

    def hook(module, inputs, output):
        output = output.clone()
        output[..., list(token_ids)] += amount
        return output

    handle = head.register_forward_hook(hook)
    try:
        yield model
    finally:
        handle.remove()


def reference(model, tok, prompt, max_new_tokens, **kw):
    """Plain HF generate on one unpadded prompt: the new tokens, cut at eos."""
    ids = torch.tensor([tok(prompt)["input_ids"]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **kw)
    new = out[0, ids.shape[1]:].tolist()
    if tok.eos_token_id in new:
        new = new[: new.index(tok.eos_token_id)]
    return tok.decode(new, skip_special_tokens=True)


def n_tokens(tok, text):
    assert text.isascii()
    return len(tok(text, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------------------------- batching / padding

def test_batched_left_padded_equals_one_at_a_time(model, tok):
    settings = GenerationSettings(max_new_tokens=10, batch_size=3)
    with logit_bias(model, [tok.eos_token_id], -1e4):
        batched = generate_texts(model, tok, PROMPTS, settings)
        single = [generate_texts(model, tok, [p], GenerationSettings(max_new_tokens=10, batch_size=1)).texts[0]
                  for p in PROMPTS]
        ref = [reference(model, tok, p, 10) for p in PROMPTS]
    assert batched.texts == single == ref
    assert batched.new_tokens == 10 * len(PROMPTS)
    assert batched.truncated_prompts == 0 and batched.seconds > 0
    assert len(set(batched.texts)) == len(PROMPTS)  # distinct prompts, distinct outputs: order restored


def test_right_padding_breaks_batching_so_left_is_forced(model, tok):
    """force_left_pad=False pads on the tokenizer's side (right here): batched no longer matches."""
    with logit_bias(model, [tok.eos_token_id], -1e4):
        left = generate_texts(model, tok, PROMPTS, GenerationSettings(max_new_tokens=6, batch_size=8))
        right = generate_texts(model, tok, PROMPTS, GenerationSettings(max_new_tokens=6, batch_size=8,
                                                                       force_left_pad=False))
        ref = [reference(model, tok, p, 6) for p in PROMPTS]
    assert left.texts == ref
    assert right.texts != ref


def test_peft_model_batched_equals_single(tok):
    from peft import LoraConfig, get_peft_model

    base = make_model(tok, seed=1)
    torch.manual_seed(1)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False, task_type="CAUSAL_LM"))
    check_generate_support(peft_model, GenerationSettings())
    with logit_bias(base, [tok.eos_token_id], -1e4):
        batched = generate_texts(peft_model, tok, PROMPTS, GenerationSettings(max_new_tokens=8, batch_size=4))
        single = [generate_texts(peft_model, tok, [p], GenerationSettings(max_new_tokens=8)).texts[0] for p in PROMPTS]
        with peft_model.disable_adapter():
            plain = generate_texts(peft_model, tok, PROMPTS, GenerationSettings(max_new_tokens=8, batch_size=4))
    assert batched.texts == single
    assert plain.texts != batched.texts  # the adapter is active during generation


def test_tokenizer_and_train_mode_untouched(model, tok):
    assert tok.padding_side == "right"
    model.train()
    model.model.layers[0].eval()  # a mixed state must come back exactly as it was
    before = [(name, m.training) for name, m in model.named_modules()]
    seen = {}
    original_generate = model.generate

    def spy(*args, **kwargs):
        seen["training"] = model.training
        seen["grad"] = torch.is_grad_enabled()
        seen["last_row_mask"] = kwargs["attention_mask"][-1].tolist()
        return original_generate(*args, **kwargs)

    model.generate = spy
    try:
        generate_texts(model, tok, ["a", "longer prompt"], GenerationSettings(max_new_tokens=3))
        after = [(name, m.training) for name, m in model.named_modules()]
    finally:
        del model.generate
        model.eval()
    assert seen["training"] is False and seen["grad"] is False
    assert seen["last_row_mask"] == [0] * 12 + [1]  # the shortest prompt: left padded, mask passed
    assert after == before
    assert tok.padding_side == "right" and tok.pad_token_id == 257


def test_pad_token_falls_back_to_eos(model):
    tok = build_byte_level_tokenizer()
    tok.pad_token = None
    assert tok.pad_token_id is None
    with logit_bias(model, [tok.eos_token_id], -1e4):
        batched = generate_texts(model, tok, PROMPTS, GenerationSettings(max_new_tokens=5, batch_size=5))
        ref = [reference(model, tok, p, 5) for p in PROMPTS]
    assert batched.texts == ref
    assert tok.pad_token_id is None and tok.padding_side == "right"  # the tokenizer is not modified


# ---------------------------------------------------------------------------------- lengths

def test_max_new_tokens_vs_legacy_total_length(model, tok):
    with logit_bias(model, [tok.eos_token_id], -1e4):
        new = generate_texts(model, tok, PROMPTS, GenerationSettings(max_new_tokens=12, batch_size=3))
        legacy = generate_texts(model, tok, PROMPTS, GenerationSettings(use_max_new_tokens=False, max_length=20,
                                                                        batch_size=3))
        legacy_single = [generate_texts(model, tok, [p], GenerationSettings(use_max_new_tokens=False,
                                                                           max_length=20)).texts[0]
                         for p in PROMPTS]
        # unset max_length: the max_new_tokens number, read as a total length
        fallback = generate_texts(model, tok, ["hello"], GenerationSettings(use_max_new_tokens=False,
                                                                           max_new_tokens=8))
    assert [n_tokens(tok, t) for t in new.texts] == [12] * len(PROMPTS)
    room = {p: 20 - len(p) for p in PROMPTS}
    for p, text, new_text in zip(PROMPTS, legacy.texts, new.texts):
        if room[p] <= 0:
            assert text == ""
        else:
            assert n_tokens(tok, text) == room[p]  # per prompt: prompt + generated == max_length
            assert new_text.startswith(text) or text.startswith(new_text)  # greedy: one continuation, cut elsewhere
    assert legacy.texts == legacy_single  # a prompt's budget does not depend on its batch
    assert legacy.prompts_without_room == sum(r <= 0 for r in room.values()) == 1
    assert n_tokens(tok, fallback.texts[0]) == 8 - len("hello")


def test_min_new_tokens_suppresses_eos(model, tok):
    with logit_bias(model, [tok.eos_token_id], 50.0):  # argmax is eos everywhere
        plain = generate_texts(model, tok, PROMPTS, GenerationSettings(max_new_tokens=10))
        forced = generate_texts(model, tok, PROMPTS, GenerationSettings(max_new_tokens=10, min_new_tokens=5))
        legacy = generate_texts(model, tok, PROMPTS, GenerationSettings(use_max_new_tokens=False, max_length=60,
                                                                        min_length=12, batch_size=5))
    assert plain.texts == [""] * len(PROMPTS)
    assert plain.new_tokens == len(PROMPTS)  # each emitted eos first
    assert forced.new_tokens == 6 * len(PROMPTS)  # 5 forced tokens + eos
    assert all(n_tokens(tok, t) == 5 for t in forced.texts)
    # legacy min_length counts the prompt: each prompt gets exactly max(0, 12 - len) tokens
    assert legacy.new_tokens == sum(max(0, 12 - len(p)) + 1 for p in PROMPTS)


def test_beam_search_runs_and_matches_single(model, tok):
    settings = GenerationSettings(max_new_tokens=6, num_beams=3, batch_size=5)
    with logit_bias(model, [tok.eos_token_id], -1e4):
        batched = generate_texts(model, tok, PROMPTS, settings)
        ref = [reference(model, tok, p, 6, num_beams=3, early_stopping=True) for p in PROMPTS]
    assert batched.texts == ref
    assert batched.new_tokens == 6 * len(PROMPTS)


def test_left_truncation_of_long_prompts(model, tok):
    long = "this is the beginning that goes away ... and the end stays: answer"
    settings = GenerationSettings(max_new_tokens=6, max_source_length=12, batch_size=2)
    with logit_bias(model, [tok.eos_token_id], -1e4):
        result = generate_texts(model, tok, [long, "short", long + "!"], settings)
        ref = [reference(model, tok, p, 6) for p in (long[-12:], "short", (long + "!")[-12:])]
    assert result.truncated_prompts == 2
    assert result.texts == ref


# ---------------------------------------------------------------------------------- version checks

def simulate_old_transformers(monkeypatch, version, missing):
    """An older transformers: its GenerationConfig lacks the `missing` fields."""
    import transformers

    from trainkit import generation

    real = generation._supported_config_fields
    monkeypatch.setattr(generation, "_supported_config_fields", lambda: real() - set(missing))
    monkeypatch.setattr(transformers, "__version__", version)


def test_supported_fields_come_from_the_installed_generation_config():
    from trainkit.generation import _supported_config_fields

    fields = _supported_config_fields()
    assert {"max_new_tokens", "min_new_tokens", "max_length", "num_beams", "early_stopping"} <= fields
    assert "surely_not_a_generation_argument" not in fields


def test_unsupported_argument_fails_fast(model, tok, monkeypatch):
    simulate_old_transformers(monkeypatch, "4.21.0", ["max_new_tokens", "min_new_tokens"])
    calls = []
    monkeypatch.setattr(model, "generate", lambda *a, **k: calls.append(1), raising=False)

    with pytest.raises(ValueError) as err:
        check_generate_support(model, GenerationSettings(max_new_tokens=8, min_new_tokens=2))
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("transformers 4.21.0 does not support generate(max_new_tokens=...)")
    assert "GLA_USE_MAX_NEW_TOKENS=0" in msg

    with pytest.raises(ValueError, match=r"transformers 4\.21\.0 does not support generate\(max_new_tokens"):
        generate_texts(model, tok, PROMPTS, GenerationSettings())
    assert calls == []  # failed before any generation

    # the legacy switch passes only max_length: accepted by the old version
    check_generate_support(model, GenerationSettings(use_max_new_tokens=False, max_length=32, min_length=4))


def test_min_new_tokens_missing_named(model, monkeypatch):
    simulate_old_transformers(monkeypatch, "4.25.1", ["min_new_tokens"])
    check_generate_support(model, GenerationSettings(min_new_tokens=0))  # not passed when 0
    with pytest.raises(ValueError, match=r"^transformers 4\.25\.1 does not support generate\(min_new_tokens=\.\.\.\)"):
        check_generate_support(model, GenerationSettings(min_new_tokens=3))


@pytest.mark.parametrize("kwargs", [dict(min_new_tokens=9, max_new_tokens=4), dict(num_beams=0), dict(batch_size=0),
                                    dict(use_max_new_tokens=False, max_length=4, min_length=9),
                                    dict(max_source_length=0), dict(do_sample=True, temperature=0.0),
                                    dict(do_sample=True, top_p=0.0), dict(do_sample=True, top_p=1.5)])
def test_invalid_settings(model, kwargs):
    with pytest.raises(ValueError):
        check_generate_support(model, GenerationSettings(**kwargs))


def test_sampling_settings_reach_generate(model, tok):
    """temperature / top_p act when sampling: top_p that keeps only the most likely token samples the greedy
    text; a high temperature, another text; the same seed, the same sample."""
    greedy = generate_texts(model, tok, PROMPTS, GenerationSettings(max_new_tokens=8)).texts

    def sample(**kw):
        torch.manual_seed(1)
        return generate_texts(model, tok, PROMPTS, GenerationSettings(max_new_tokens=8, do_sample=True, **kw)).texts

    assert sample(top_p=1e-6) == greedy
    hot = sample(temperature=50.0)
    assert hot != greedy and sample(temperature=50.0) == hot


def test_empty_and_progress(model, tok):
    assert generate_texts(model, tok, [], GenerationSettings()).texts == []
    out = generate_texts(model, tok, ["ab", "cd"], GenerationSettings(max_new_tokens=2), progress=True)
    assert len(out.texts) == 2


# ---------------------------------------------------------------------------------- label scoring

def unbatched_score(model, tok, prompt, target):
    """log p(target tokens + eos | prompt), one unpadded sequence."""
    p = tok(prompt)["input_ids"]
    lab = tok(target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([p + lab])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    return sum(logp[len(p) - 1 + k, t].item() for k, t in enumerate(lab))


def test_label_likelihood_picks_biased_label_and_matches_unbatched(model, tok):
    labels = [" no", " yes", " maybe"]
    prompts = ["Is it good?", "A much longer question about something?", "Q:"]
    with logit_bias(model, list(b"yes"), 8.0):
        assert score_label_likelihood(model, tok, prompts, labels, batch_size=4).picks == [1, 1, 1]
    with logit_bias(model, list(b"no"), 8.0):
        assert score_label_likelihood(model, tok, prompts, labels, batch_size=2).picks == [0, 0, 0]

    scores = label_log_likelihoods(model, tok, prompts, labels, batch_size=4)
    for i, p in enumerate(prompts):
        for j, lab in enumerate(labels):
            assert scores[i][j] == pytest.approx(unbatched_score(model, tok, p, lab), abs=1e-4)
    one_by_one = label_log_likelihoods(model, tok, prompts, labels, batch_size=1)
    assert torch.allclose(torch.tensor(scores), torch.tensor(one_by_one), atol=1e-4)
    best = [max(range(3), key=lambda j: row[j]) for row in scores]
    assert score_label_likelihood(model, tok, prompts, labels, batch_size=3) == (best, 0)

    mean = label_log_likelihoods(model, tok, prompts, labels, normalization="mean")
    for i in range(len(prompts)):
        for j, lab in enumerate(labels):  # byte-level: one token per character, + eos
            assert mean[i][j] == pytest.approx(scores[i][j] / (len(lab) + 1), abs=1e-5)
    with pytest.raises(ValueError, match="normalization"):
        label_log_likelihoods(model, tok, prompts, labels, normalization="sum")


def test_label_likelihood_scores_exactly_the_training_target_tokens(model, tok):
    """The score is the log-probability of the tokens the training loss sees for the GLUE target
    (" positive" with its space, + eos): minus the summed training loss of that row."""
    from trainkit.data import tokenize_prompt_target
    from trainkit.tasks import get_task

    task = get_task("sst2")
    assert task.label_targets == [" negative", " positive"]
    assert tok(" positive", add_special_tokens=False)["input_ids"] != tok("positive", add_special_tokens=False)["input_ids"]
    prompt, prompt_cut = task.prompt({"sentence": "a fine film"})
    row = tokenize_prompt_target([prompt], [" positive"], tok, max_source_length=512, max_target_length=16)[0]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1].float()
    labels = torch.tensor(row["labels"][1:])
    trained = -torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").item()
    [[negative, positive]] = label_log_likelihoods(model, tok, [prompt], task.label_targets)
    assert positive == pytest.approx(trained, abs=1e-4)
    assert (labels != -100).sum().item() == len(" positive") + 1  # the space and eos are in what training scores
    assert positive != pytest.approx(unbatched_score(model, tok, prompt, "positive"), abs=1e-3)  # the old, space-less score
    # a prompt longer than max_source_length is cut as the training row's is (from its PromptCut)
    cut = tokenize_prompt_target([prompt], [" positive"], tok, max_source_length=20, max_target_length=16,
                                 cuts=[prompt_cut])[0]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([cut["input_ids"]])).logits[0, :-1].float()
    trained = -torch.nn.functional.cross_entropy(logits, torch.tensor(cut["labels"][1:]), ignore_index=-100,
                                                 reduction="sum").item()
    [[_, positive]] = label_log_likelihoods(model, tok, [prompt], task.label_targets, max_source_length=20,
                                            cuts=[prompt_cut])
    assert positive == pytest.approx(trained, abs=1e-4)
    # score_label_likelihood counts the prompts it cut, for eval_log's truncated_prompts
    short, short_cut = task.prompt({"sentence": "ok"})
    prompt_tokens = row["labels"].count(-100)
    picks = score_label_likelihood(model, tok, [prompt, short], task.label_targets, max_source_length=prompt_tokens - 1,
                                   cuts=[prompt_cut, short_cut])
    assert picks.truncated_prompts == 1 and len(picks.picks) == 2


def test_label_likelihood_restores_mode(model, tok):
    model.train()
    score_label_likelihood(model, tok, ["a"], ["b", "c"])
    assert model.training
    model.eval()

"""Task-aware prompt truncation (trainkit.data.fit_prompt with each task's PromptCut), the same for
training rows and generation, and the generation length derived from the training targets."""

from __future__ import annotations

from pathlib import Path

import pytest

from test_generation import make_model, reference
from trainkit.data import IGNORE_INDEX, fit_prompt, tokenize_prompt_target
from trainkit.generation import GenerationSettings, generate_texts, max_new_tokens_from_data
from trainkit.tasks import PromptCut, get_task
from trainkit.tasks.base import fill_prompt
from trainkit.tokenizer import build_byte_level_tokenizer

DATA = Path(__file__).resolve().parents[1] / "data" / "tasks"


@pytest.fixture(scope="module")
def tok():
    return build_byte_level_tokenizer()


@pytest.fixture(scope="module")
def bpe():
    """A real BPE tokenizer with merges (multi-character tokens whose edges move when text is cut),
    trained here on the task fixtures' prompts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [e.prompt + e.target for name, folder in [("spider", "spider"), ("samsum", "samsum"), ("mrpc", "glue")]
             for e in get_task(name).load(local_dir=DATA / folder)["train"]]
    model = Tokenizer(models.BPE(unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    model.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "</s>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=model, eos_token="</s>", unk_token="<unk>", pad_token="</s>")


def spider_example(split="validation", index=0):
    return get_task("spider").load(local_dir=DATA / "spider")[split][index]


def n_ids(tokenizer, text):
    return len(tokenizer(text)["input_ids"])


def schema_lines(prompt):
    return [line for line in prompt.splitlines() if line.startswith("CREATE TABLE")]


@pytest.mark.parametrize("tokenizer_name", ["tok", "bpe"])
def test_long_spider_prompt_keeps_question_and_cue_and_loses_schema_lines_last_first(request, tokenizer_name):
    tokenizer = request.getfixturevalue(tokenizer_name)
    e = spider_example()
    assert e.cut == PromptCut(e.prompt.index("CREATE TABLE"), e.prompt.index("\n\nQuestion:"), "right", True)
    full = n_ids(tokenizer, e.prompt)
    question = e.prompt[e.prompt.index("Question:"):].splitlines()[0]
    lines = schema_lines(e.prompt)
    assert len(lines) == 3
    for limit in (full - 1, full - 40, full - n_ids(tokenizer, "\n".join(lines[1:])) - 1):
        ids, cut = fit_prompt(tokenizer, e.prompt, e.cut, limit)
        text = tokenizer.decode(ids)
        assert cut and len(ids) <= limit
        assert text.startswith("Translate the question into a SQL query") and question in text and text.endswith("\nSQL:")
        kept = schema_lines(text)
        assert kept == lines[:len(kept)] and len(kept) < len(lines)  # whole lines, the last ones gone first
        assert ids == tokenizer(text)["input_ids"]  # the ids of a real text, not spliced ids
    # the old rule (keep the last tokens) lost the instruction and kept the schema's last line
    old = tokenizer.decode(tokenizer(e.prompt)["input_ids"][-(full - 40):])
    assert not old.startswith("Translate") and schema_lines(old)[-1] == lines[-1]
    # a prompt that fits is untouched
    assert fit_prompt(tokenizer, e.prompt, e.cut, full) == (tokenizer(e.prompt)["input_ids"], False)


def test_without_room_even_for_the_question_the_beginning_goes(tok):
    e = spider_example()
    ids, cut = fit_prompt(tok, e.prompt, e.cut, 40)
    assert cut and len(ids) == 40 and tok.decode(ids).endswith("\nSQL:")
    # no span: today's rule, the beginning goes
    assert fit_prompt(tok, e.prompt, None, 40) == (tok(e.prompt)["input_ids"][-40:], True)


def test_sides_and_mid_line_cuts(tok):
    template = "Instruction.\n{body}\nQuestion: q?\nAnswer:"
    body = "line one\nline two\nline three"
    prompt, cut = fill_prompt(template, "body", side="right", whole_lines=True, body=body)
    assert prompt[cut.start:cut.end] == body
    n = n_ids(tok, prompt)
    assert tok.decode(fit_prompt(tok, prompt, cut, n - 3)[0]) == "Instruction.\nline one\nline two\nQuestion: q?\nAnswer:"
    mid = PromptCut(cut.start, cut.end, "right", whole_lines=False)
    assert tok.decode(fit_prompt(tok, prompt, mid, n - 3)[0]) == "Instruction.\nline one\nline two\nline th\nQuestion: q?\nAnswer:"
    left = PromptCut(cut.start, cut.end, "left", whole_lines=True)
    assert tok.decode(fit_prompt(tok, prompt, left, n - 3)[0]) == "Instruction.\nline two\nline three\nQuestion: q?\nAnswer:"
    left_mid = PromptCut(cut.start, cut.end, "left")
    assert tok.decode(fit_prompt(tok, prompt, left_mid, n - 3)[0]) == "Instruction.\ne one\nline two\nline three\nQuestion: q?\nAnswer:"
    # one line longer than the room: whole_lines keeps what fits of it rather than nothing
    prompt, cut = fill_prompt(template, "body", side="right", whole_lines=True, body="a single long line")
    assert tok.decode(fit_prompt(tok, prompt, cut, n_ids(tok, prompt) - 5)[0]) == "Instruction.\na single long\nQuestion: q?\nAnswer:"


def test_each_task_names_the_part_that_may_go():
    def part(e):
        return e.prompt[e.cut.start:e.cut.end]

    e = get_task("samsum").load(local_dir=DATA / "samsum")["validation"][0]
    assert e.prompt == f"Summarize the following dialogue.\n\nDialogue:\n{part(e)}\n\nSummary:" and e.cut.whole_lines
    e = get_task("dart").load(local_dir=DATA / "dart")["validation"][0]
    assert e.prompt.endswith(f"Facts:\n{part(e)}\n\nText:") and " | " in part(e) and e.cut.whole_lines
    for split in ("train", "test"):
        e = get_task("dart").load(local_dir=DATA / "dart")[split][0]
        assert " | " in part(e)
    e = get_task("sst2").load(local_dir=DATA / "glue")["train"][0]
    assert part(e) == "the score is tedious ." and e.cut.side == "right"
    for e in get_task("mrpc").load(local_dir=DATA / "glue")["validation"]:  # pairs: the longer sentence
        s1, s2 = (line.split(": ", 1)[1] for line in e.prompt.splitlines()[1:3])
        assert part(e) == (s1 if len(s1) >= len(s2) else s2)
    assert spider_example("test").cut == spider_example("validation").cut


def test_training_rows_and_generation_cut_prompts_alike(tok):
    """A cut prompt is the same ids in a training row and at generation; the counts agree."""
    splits = get_task("spider").load(local_dir=DATA / "spider")
    examples = splits["validation"]
    limit = sorted(n_ids(tok, e.prompt) for e in examples)[len(examples) // 2]  # about half are too long
    rows = tokenize_prompt_target([e.prompt for e in examples], [e.target for e in examples], tok, limit, 64,
                                  cuts=[e.cut for e in examples])
    cut = [n_ids(tok, e.prompt) > limit for e in examples]
    assert [r["_truncated_prompt"] for r in rows] == cut and 0 < sum(cut) < len(examples)
    model = make_model(tok)
    settings = GenerationSettings(max_new_tokens=4, max_source_length=limit, batch_size=3)
    result = generate_texts(model, tok, [e.prompt for e in examples], settings, cuts=[e.cut for e in examples])
    assert result.truncated_prompts == sum(cut)
    for e, row, text in zip(examples, rows, result.texts):
        prompt_ids = [i for i, label in zip(row["input_ids"], row["labels"]) if label == IGNORE_INDEX]
        assert prompt_ids == fit_prompt(tok, e.prompt, e.cut, limit)[0]
        assert text == reference(model, tok, tok.decode(prompt_ids), 4)
        assert tok.decode(prompt_ids).endswith("\nSQL:")


def test_max_new_tokens_from_the_data():
    # classification: the longest label word + eos, no margin
    assert max_new_tokens_from_data([10, 9, 10], label_lengths=[9, 10])[0] == 10
    # otherwise the 99th percentile + 10 % (at least 2): one outlier in 200 does not count
    lengths = [20] * 199 + [300]
    value, how = max_new_tokens_from_data(lengths)
    assert value == 20 + 2 and "99th percentile of 200 training targets" in how and "longest 300" in how
    assert max_new_tokens_from_data([5, 6, 7])[0] == 7 + 2
    # capped by the positions the model has left after the prompt
    value, how = max_new_tokens_from_data([100] * 10, room=64)
    assert value == 64 and "capped at 64" in how
    with pytest.raises(ValueError):
        max_new_tokens_from_data([])


def test_settings_from_config_with_the_derived_length():
    from trainkit.config.lora import GenerationSection

    new = GenerationSettings.from_config(GenerationSection(), max_source_length=100, max_length=23)
    assert new.use_max_new_tokens and new.max_new_tokens == 23 and new.max_length is None
    # legacy total length: a null max_length leaves every prompt (<= max_source_length) 23 new tokens
    legacy = GenerationSettings.from_config(GenerationSection(use_max_new_tokens=False), 100, 23)
    assert legacy.max_length == 123
    given = GenerationSettings.from_config(GenerationSection(use_max_new_tokens=False, max_length=50), 100, 50)
    assert given.max_length == 50

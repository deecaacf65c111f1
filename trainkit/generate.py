"""Try a checkpoint on a prompt: `python -m trainkit.generate`.

    # a run's adapter (checkpoint-<step>/, final-checkpoint-<step>/, best-adapter/): the base is rebuilt
    # as training built it (4-bit where the run quantized) and the adapter put on it
    python -m trainkit.generate --checkpoint outputs/tiny-moe-qlora/best-adapter "The capital of France is"

    # a model directory: an export (python -m trainkit.export), a distill.py checkpoint, any save_pretrained
    python -m trainkit.generate --checkpoint exported/ "Hello" "Another prompt" --max-new-tokens 32

    # a train_lora.py adapter, the prompt built as its task builds it (here SST-2: the sentence alone)
    python -m trainkit.generate --checkpoint outputs/tiny-gla-lora-sst2/best-adapter --task-format "the pacing is nice ."

    # chat: a prompt loop on stdin with the tokenizer's chat template (/reset, /quit)
    python -m trainkit.generate --checkpoint outputs/tiny-moe-qlora/best-adapter --interactive

The generated text alone goes to stdout (one completion per prompt; with several prompts a line `---`
between them, or one JSON object per line with --jsonl); what was loaded, the device and the settings
go to stderr, so the output pipes. Generation settings are the run's evaluation settings
(trainkit.checkpoint_model), overridden by the flags. Bad input is one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from trainkit.cli import run_main

SEPARATOR = "---"
COMMANDS = {"/reset": "forget the conversation so far", "/quit": "exit (so does end of input)"}


class GenerateError(ValueError):
    """Bad command-line input: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainkit.generate",
                                     description="Generate text with a checkpoint, a best adapter, a distilled "
                                                 "student or an exported model.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompts, each generated from on its own")
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="checkpoint-<step>/, final-checkpoint-<step>/, best-adapter/ of a train_qlora.py or "
                             "train_lora.py run, a distill.py checkpoint, or a model directory (config.json + weights)")
    parser.add_argument("-i", "--interactive", action="store_true",
                        help="read prompts from stdin, one per line (the default when no prompt is given on a terminal)")
    parser.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                        help="format prompts with the tokenizer's chat template (interactive: the whole conversation); "
                             "default: on in interactive mode when the tokenizer has a template, off otherwise")
    parser.add_argument("--task-format", action="store_true",
                        help="a train_lora.py adapter: build each prompt as the run's task builds it (trainkit.tasks); "
                             "PROMPT is a JSON object of the task's input fields, or the text itself for a task with "
                             "one text field (sst2, cola, samsum)")
    parser.add_argument("--system", metavar="TEXT", help="with --chat: a system message first in every conversation")
    parser.add_argument("--max-new-tokens", type=int, metavar="N", help="new tokens to generate at most")
    sampling = parser.add_mutually_exclusive_group()
    sampling.add_argument("--do-sample", action="store_true", default=None, help="sample instead of greedy decoding")
    sampling.add_argument("--greedy", action="store_true", help="greedy decoding, also where the model's "
                                                                 "generation_config samples")
    parser.add_argument("--temperature", type=float, metavar="T", help="sampling temperature (implies --do-sample)")
    parser.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling threshold (implies --do-sample)")
    parser.add_argument("--num-beams", type=int, metavar="N", help="beam search width (1: none)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of sampling (default 0)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    parser.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"),
                        help="dtype of the weights that are not 4-bit; default: the run's (its auto: bfloat16 on GPUs "
                             "with native bf16, float32 on CPUs), auto for model directories")
    parser.add_argument("--jsonl", action="store_true",
                        help="print one JSON object per prompt (interactive: per line read): {\"prompt\", \"completion\"}")
    return parser


def generation_settings(base, args):
    """The loaded checkpoint's GenerationSettings with the command line's overrides."""
    changes: dict = {}
    if args.max_new_tokens is not None:
        if args.max_new_tokens < 1:
            raise GenerateError(f"--max-new-tokens: must be >= 1, got {args.max_new_tokens}")
        # the new-token meaning, also for a run evaluated with the legacy total length
        changes.update(max_new_tokens=args.max_new_tokens, use_max_new_tokens=True, max_length=None,
                       min_length=None, min_new_tokens=min(base.min_new_tokens or 0, args.max_new_tokens))
    if args.num_beams is not None:
        if args.num_beams < 1:
            raise GenerateError(f"--num-beams: must be >= 1, got {args.num_beams}")
        changes["num_beams"] = args.num_beams
    if args.greedy:
        changes.update(do_sample=False, temperature=None, top_p=None)
    elif args.do_sample or args.temperature is not None or args.top_p is not None:
        changes["do_sample"] = True
    if args.temperature is not None:
        if not args.temperature > 0:
            raise GenerateError(f"--temperature: must be > 0, got {args.temperature}")
        changes["temperature"] = args.temperature
    if args.top_p is not None:
        if not 0 < args.top_p <= 1:
            raise GenerateError(f"--top-p: must be in (0, 1], got {args.top_p}")
        changes["top_p"] = args.top_p
    return dataclasses.replace(base, **changes)


def describe_settings(settings) -> str:
    length = (f"max_new_tokens={settings.max_new_tokens}" if settings.use_max_new_tokens
              else f"max_length={settings.max_length or settings.max_new_tokens} (prompt + new tokens)")
    mode = "sampling" if settings.do_sample else "greedy"
    if settings.do_sample:
        mode += "".join(f" {k}={v}" for k, v in (("temperature", settings.temperature), ("top_p", settings.top_p))
                        if v is not None)
    extra = f", num_beams={settings.num_beams}" if settings.num_beams > 1 else ""
    source = f", prompts cut to {settings.max_source_length} tokens" if settings.max_source_length else ""
    return f"generation: {length}, {mode}{extra}{source}"


def chat_prompt(tokenizer, messages: list[dict]) -> str:
    """The conversation rendered by the tokenizer's chat template, ready for the assistant's turn. A
    template that writes the bos token itself loses it here, since tokenizing the prompt adds it again."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer.bos_token_id in tokenizer("", add_special_tokens=True)["input_ids"]:
        text = text[len(bos):]
    return text


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def task_prompt(task, text: str):
    """--task-format: (prompt, PromptCut) of one input, a JSON object of the task's input fields or, for a
    task with one text field, the text itself."""
    fields_help = ", ".join(task.input_fields)
    if text.lstrip().startswith("{"):
        try:
            fields = json.loads(text)
        except json.JSONDecodeError as e:
            raise GenerateError(f"--task-format: not a JSON object ({e.msg} at character {e.pos})") from None
        if not isinstance(fields, dict):
            raise GenerateError(f"--task-format: expected a JSON object with {fields_help}")
    elif task.input_fields in (("sentence",), ("dialogue",)):
        fields = {task.input_fields[0]: text}
    else:
        raise GenerateError(f"--task-format: {task.name} takes a JSON object with {fields_help}")
    try:
        return task.prompt_from_fields(fields)
    except ValueError as e:
        raise GenerateError(f"--task-format: {e}") from None


def run_task_of(path):
    """The task of a train_lora.py adapter directory (--task-format), before any model loads."""
    from trainkit.checkpoint_model import directory_kind
    from trainkit.checkpoints import checkpoint_config
    from trainkit.tasks import get_task

    if directory_kind(path) == "adapter":
        cfg = checkpoint_config(path)
        if cfg.script == "train_lora.py":
            return get_task(cfg.task.name)
    raise GenerateError(f"--task-format: {path} is not a train_lora.py adapter directory (no task to format for)")


def _generate(loaded, prompts: list[str], settings, cuts: list | None = None) -> list[str]:
    from trainkit.generation import generate_texts
    result = generate_texts(loaded.model, loaded.tokenizer, prompts, settings, device=loaded.device, cuts=cuts)
    if result.truncated_prompts:
        _say(f"note: {result.truncated_prompts} prompt(s) longer than {settings.max_source_length} tokens were cut "
             "from the beginning (the run's task.max_source_length)")
    return result.texts


def run_prompts(loaded, prompts: list[str], settings, chat: bool, system: str | None, jsonl: bool,
                task=None) -> None:
    cuts = None
    if task is not None:
        inputs, cuts = map(list, zip(*(task_prompt(task, p) for p in prompts)))
    elif chat:
        inputs = [chat_prompt(loaded.tokenizer, _conversation(system) + [{"role": "user", "content": p}]) for p in prompts]
    else:
        inputs = list(prompts)
    texts = _generate(loaded, inputs, settings, cuts)
    for i, (prompt, text) in enumerate(zip(prompts, texts)):
        if jsonl:
            print(_completion_line(prompt, text), flush=True)
        else:
            if i:
                print(SEPARATOR)
            print(text, flush=True)


def _completion_line(prompt: str, completion: str) -> str:
    return json.dumps({"prompt": prompt, "completion": completion}, ensure_ascii=False)


def _conversation(system: str | None) -> list[dict]:
    return [{"role": "system", "content": system}] if system else []


def interactive(loaded, settings, chat: bool, system: str | None, stdin=None, task=None, jsonl: bool = False) -> None:
    """A prompt loop: each line of stdin is a prompt (chat: the next user turn of the conversation; task: the
    task's input, as for --task-format); /reset forgets the conversation, /quit or the end of input ends the
    loop. Replies go to stdout, one per line read (a reply may span lines); the `>>> ` prompt, notes and a
    line that --task-format cannot read go to stderr."""
    stdin = stdin or sys.stdin
    conversation = _conversation(system)
    mode = ("chat (the conversation so far is the prompt)" if chat else
            f"each line is the input of a {task.name} example" if task is not None else "each line is a prompt on its own")
    _say(f"interactive: {mode}; " + "; ".join(f"{k}: {v}" for k, v in COMMANDS.items()))
    while True:
        print(">>> ", end="", file=sys.stderr, flush=True)
        line = stdin.readline()
        if not line:
            _say("")
            return
        text = line.rstrip("\r\n")
        command = text.strip()
        if command == "/quit":
            return
        if command == "/reset":
            conversation = _conversation(system)
            _say("(conversation cleared)")
            continue
        if not command:
            continue
        if chat:
            conversation.append({"role": "user", "content": text})
            reply = _generate(loaded, [chat_prompt(loaded.tokenizer, conversation)], settings)[0]
            conversation.append({"role": "assistant", "content": reply})
        elif task is not None:
            try:
                prompt, cut = task_prompt(task, text)
            except GenerateError as e:
                _say(f"error: {e}")
                continue
            reply = _generate(loaded, [prompt], settings, [cut])[0]
        else:
            reply = _generate(loaded, [text], settings)[0]
        print(_completion_line(text, reply) if jsonl else reply, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return generate(args)
    except GenerateError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


def generate(args) -> int:
    from trainkit.checkpoint_model import CheckpointError

    for i, prompt in enumerate(args.prompts):
        if not prompt.strip():
            raise GenerateError(f"prompt {i + 1} is empty")
    use_interactive = args.interactive or (not args.prompts and sys.stdin.isatty())
    if args.interactive and args.prompts:
        raise GenerateError("give prompts or --interactive, not both")
    if not args.prompts and not use_interactive:
        raise GenerateError("no prompt given: pass prompts as arguments, or --interactive to read them from stdin")
    if args.system and args.chat is False:
        raise GenerateError("--system needs --chat")
    if args.task_format and (args.chat or args.system):
        raise GenerateError("--task-format builds the prompt the run trained on: no --chat / --system with it")
    try:
        task = run_task_of(args.checkpoint) if args.task_format else None
        for prompt in args.prompts if task is not None else ():
            task_prompt(task, prompt)  # a bad input is reported before the model loads
        loaded, settings = _load(args)
    except (CheckpointError, FileNotFoundError) as e:  # a directory with no model / config: bad input
        raise GenerateError(str(e)) from None
    chat = args.chat if args.chat is not None else (
        use_interactive and task is None and has_chat_template(loaded.tokenizer))
    if (chat or args.system) and not has_chat_template(loaded.tokenizer):
        raise GenerateError(f"--chat: the tokenizer of {args.checkpoint} has no chat template")
    chat = chat or bool(args.system)

    import transformers
    transformers.set_seed(args.seed)
    if use_interactive:
        interactive(loaded, settings, chat, args.system, task=task, jsonl=args.jsonl)
    else:
        run_prompts(loaded, args.prompts, settings, chat, args.system, args.jsonl, task)
    return 0


def _load(args):
    """The checkpoint's model on the chosen device and the settings to generate with; notes to stderr."""
    from trainkit.checkpoint_model import directory_kind, load_checkpoint_model, resolve_device
    from trainkit.generation import check_generate_support
    from trainkit.patches.peft import quiet_known_warnings

    directory_kind(args.checkpoint)  # a bad directory is reported before anything heavy loads
    device = resolve_device(args.device)
    quiet_known_warnings()
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # "Loading weights" bars: noise in a terminal session
    loaded = load_checkpoint_model(args.checkpoint, device, args.dtype)
    settings = generation_settings(loaded.settings, args)
    try:
        check_generate_support(loaded.model, settings)
    except ValueError as e:
        raise GenerateError(str(e)) from None
    for note in loaded.notes:
        _say(note)
    _say(f"device: {loaded.device}, dtype {loaded.dtype}; {describe_settings(settings)}")
    return loaded, settings


if __name__ == "__main__":
    run_main(main)

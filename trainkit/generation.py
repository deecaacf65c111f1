"""Task evaluation through HF `.generate()`: batched, left-padded, length rules the trainer sets.

`generate_texts(model, tokenizer, prompts, settings)` returns one completion per prompt, in the
prompts' order:

- Prompts are tokenized as at training time (`data.tokenize_prompt_target`: special tokens
  on, no eos), and a prompt longer than `max_source_length` tokens is cut as training cuts it
  (`data.fit_prompt`): from the part of the prompt its PromptCut names (`cuts`: one
  trainkit.tasks.PromptCut or None per prompt; the schema's tail for Spider), else from its
  BEGINNING (the end, where the answer starts, stays). `GenerationResult.truncated_prompts` counts them.
- Prompts are sorted by length (longest first, so an out-of-memory shows on the first batch),
  cut into batches of `batch_size`, padded by hand to the LEFT (`force_left_pad`, default on:
  decoder-only and GLA models continue from the last position, so padding must come first) and
  passed with their attention mask. The tokenizer is never modified: its `padding_side` (right,
  for training) and pad token stay as they were. With no pad token, eos pads.
- Lengths: by default `max_new_tokens` / `min_new_tokens` count generated tokens only. With
  `use_max_new_tokens=False` (trainer env GLA_USE_MAX_NEW_TOKENS=0) the legacy meaning applies:
  `max_length` / `min_length` count prompt + generated tokens, per prompt (the prompt's own
  length after truncation, not the padded batch width, so a prompt's budget does not depend on
  which batch it lands in). Left unset, they take the `max_new_tokens` / `min_new_tokens`
  numbers, read with the total-length meaning (the trainer's EVAL_GEN_MAX_LENGTH is one number
  whose meaning the switch flips). Legacy mode passes only `max_length` to `generate()` (for
  transformers too old for `max_new_tokens`) and enforces per-prompt limits itself: the batch
  runs to the largest budget, each row is cut to its own (exact for greedy and sampling; beam
  search may rank a row's hypotheses against the longer batch budget), and a logits processor
  forbids eos until a row reaches its own minimum. A prompt that already fills `max_length` gets "" and is
  counted in `GenerationResult.prompts_without_room`.
- Greedy by default; `num_beams` > 1 runs beam search (`early_stopping`); `do_sample` samples, with
  `temperature` / `top_p` when set (None: the model's generation_config decides).
- Only new tokens are decoded, cut at the first eos (the tokenizer's and the model's
  `generation_config` eos ids), with `skip_special_tokens=True`; text is not stripped.

`check_generate_support(model, settings)` checks once, up front, that the installed
transformers knows every argument these settings pass to `generate()`, and raises a one-line
ValueError naming the version and the argument otherwise (instead of a confusing error from the
model's forward, deep in the first evaluation).

`score_label_likelihood(...)` ranks fixed label continuations (classification tasks) by their
log-likelihood: the tokens training produces for each label's target (`data.target_token_ids`:
" positive" with its leading space, + eos), summed or averaged per token;
`label_log_likelihoods(...)` returns the scores themselves.

The model runs in eval mode under `torch.no_grad()` (not `inference_mode`: a module that caches
a tensor during forward, e.g. a rotary table, would otherwise keep an inference tensor that the
next training step cannot use), and every module's train/eval flag is restored afterwards. Works
with a plain HF model and a PEFT-wrapped one. No distributed logic: under DDP the trainer gives
each process its own shard of prompts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import NamedTuple

import torch


@dataclass
class GenerationSettings:
    """What `generate_texts` does; plain values (the trainer maps config / env vars onto them).

    max_length / min_length are read only when use_max_new_tokens is False (see module doc).
    max_source_length: prompt tokens kept (data.fit_prompt says what is cut); None keeps all.
    early_stopping: beam search stops when num_beams finished candidates exist (num_beams > 1).
    use_cache: passed to generate() (the trainer sets config.use_cache=False for training).
    temperature / top_p: sampling only (do_sample); None leaves the model's generation_config value.
    """

    max_new_tokens: int = 64
    min_new_tokens: int = 0
    num_beams: int = 1
    batch_size: int = 8
    use_max_new_tokens: bool = True
    max_length: int | None = None
    min_length: int | None = None
    max_source_length: int | None = None
    force_left_pad: bool = True
    do_sample: bool = False
    early_stopping: bool = True
    use_cache: bool = True
    temperature: float | None = None
    top_p: float | None = None

    @classmethod
    def from_config(cls, gen, max_source_length: int, max_length: int) -> "GenerationSettings":
        """The settings of train_lora.py's `generation` config section (the legacy total-length
        meaning of max_length / min_length when use_max_new_tokens is false); `max_length`:
        generation.max_length, or the new tokens train_lora.py derived from the data when it is
        unset (legacy mode then allows max_source_length + that many tokens in all)."""
        total = not gen.use_max_new_tokens
        if total and gen.max_length is None:
            max_length = max_source_length + max_length
        return cls(max_new_tokens=max_length, min_new_tokens=gen.min_length, num_beams=gen.num_beams,
                   batch_size=gen.batch_size, use_max_new_tokens=gen.use_max_new_tokens,
                   max_length=max_length if total else None, min_length=gen.min_length if total else None,
                   max_source_length=max_source_length, force_left_pad=gen.force_left_pad)


@dataclass
class GenerationResult:
    texts: list[str]            # one per prompt, in the prompts' order
    truncated_prompts: int      # prompts cut to max_source_length (data.fit_prompt)
    seconds: float              # wall time of the whole call
    new_tokens: int             # tokens generated, summed over prompts: up to and including eos
    prompts_without_room: int = 0  # legacy mode: prompts already >= max_length (text "")


# ---------------------------------------------------------------------------------- settings

TARGET_PERCENTILE = 99   # generation.max_length unset: cover this percentile of the training targets ...
MARGIN_FRACTION = 0.1    # ... plus this fraction of it (at least MIN_MARGIN tokens)
MIN_MARGIN = 2


def max_new_tokens_from_data(target_lengths: list[int], label_lengths: list[int] | None = None,
                             room: int | None = None) -> tuple[int, str]:
    """New tokens to generate when generation.max_length is unset, and how they were computed.

    target_lengths: tokens of each training target as trained (target + eos, within
    task.max_target_length). label_lengths (classification): tokens of each label word as trained
    (" positive" + eos); the longest is enough, no margin. Otherwise the TARGET_PERCENTILE-th
    percentile of target_lengths plus MARGIN_FRACTION of it (at least MIN_MARGIN). Capped by
    `room`: the model's positions left after the longest prompt (None: no limit).
    """
    if label_lengths:
        value = max(label_lengths)
        how = f"longest label word + eos: {value} tokens"
    else:
        if not target_lengths:
            raise ValueError("no training targets to size generation from")
        import numpy as np

        covered = int(np.ceil(np.percentile(target_lengths, TARGET_PERCENTILE)))
        margin = max(MIN_MARGIN, int(np.ceil(MARGIN_FRACTION * covered)))
        value = covered + margin
        how = (f"{TARGET_PERCENTILE}th percentile of {len(target_lengths)} training targets + eos ({covered} tokens; "
               f"longest {max(target_lengths)}) + margin {margin}")
    if room is not None and value > room:
        value = room
        how += f", capped at {room} (the model's positions left after task.max_source_length)"
    return value, how


def _total_limits(settings: GenerationSettings) -> tuple[int, int]:
    """Legacy mode: (max total length, min total length) per prompt."""
    max_total = settings.max_length if settings.max_length is not None else settings.max_new_tokens
    min_total = settings.min_length if settings.min_length is not None else settings.min_new_tokens
    return int(max_total), int(min_total or 0)


def _validate_settings(settings: GenerationSettings) -> None:
    def positive(name, value):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"generation: {name} must be an integer >= 1, got {value!r}")

    def non_negative(name, value):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"generation: {name} must be an integer >= 0, got {value!r}")

    positive("num_beams", settings.num_beams)
    if settings.temperature is not None and not settings.temperature > 0:
        raise ValueError(f"generation: temperature must be > 0, got {settings.temperature!r}")
    if settings.top_p is not None and not 0 < settings.top_p <= 1:
        raise ValueError(f"generation: top_p must be in (0, 1], got {settings.top_p!r}")
    positive("batch_size", settings.batch_size)
    if settings.max_source_length is not None:
        positive("max_source_length", settings.max_source_length)
    if settings.use_max_new_tokens:
        positive("max_new_tokens", settings.max_new_tokens)
        non_negative("min_new_tokens", settings.min_new_tokens)
        if settings.min_new_tokens > settings.max_new_tokens:
            raise ValueError(f"generation: min_new_tokens ({settings.min_new_tokens}) > max_new_tokens "
                             f"({settings.max_new_tokens})")
    else:
        max_total, min_total = _total_limits(settings)
        positive("max_length (legacy total length)", max_total)
        non_negative("min_length (legacy total length)", min_total)
        if min_total > max_total:
            raise ValueError(f"generation: min_length ({min_total}) > max_length ({max_total}) "
                             "(legacy total lengths, use_max_new_tokens=False)")


def config_kwargs(settings: GenerationSettings) -> dict:
    """The GenerationConfig fields these settings pass to generate() (lengths: placeholders)."""
    kw: dict = {"do_sample": bool(settings.do_sample), "num_beams": int(settings.num_beams),
                "use_cache": bool(settings.use_cache)}
    if settings.num_beams > 1:
        kw["early_stopping"] = bool(settings.early_stopping)
    if settings.do_sample:
        if settings.temperature is not None:
            kw["temperature"] = float(settings.temperature)
        if settings.top_p is not None:
            kw["top_p"] = float(settings.top_p)
    if settings.use_max_new_tokens:
        kw["max_new_tokens"] = int(settings.max_new_tokens)
        if settings.min_new_tokens:
            kw["min_new_tokens"] = int(settings.min_new_tokens)
    else:
        kw["max_length"] = _total_limits(settings)[0]
    return kw


def _generate_kwargs(settings: GenerationSettings) -> list[str]:
    """generate() keyword arguments that are not GenerationConfig fields."""
    names = ["attention_mask"]
    if not settings.use_max_new_tokens and _total_limits(settings)[1] > 0:
        names.append("logits_processor")
    return names


def _transformers_version() -> str:
    import transformers
    return getattr(transformers, "__version__", "?")


def _supported_config_fields() -> set[str]:
    """Attributes a default GenerationConfig of the installed transformers has."""
    import transformers
    return set(vars(transformers.GenerationConfig()))


def check_generate_support(model, settings: GenerationSettings) -> None:
    """Raise a one-line ValueError if the settings are invalid or the installed transformers
    (or the model) cannot take an argument they need; call once before training starts."""
    _validate_settings(settings)
    version = _transformers_version()
    generate = getattr(model, "generate", None)
    if not callable(generate):
        raise ValueError(f"{type(model).__name__} has no generate(); evaluation by generation needs a causal LM")
    fields = _supported_config_fields()
    kwargs = config_kwargs(settings)
    for name, value in kwargs.items():
        if name not in fields:
            hint = ("or set use_max_new_tokens=False (GLA_USE_MAX_NEW_TOKENS=0) to use max_length/min_length"
                    if name in ("max_new_tokens", "min_new_tokens") else "or change the generation settings")
            raise ValueError(f"transformers {version} does not support generate({name}=...); "
                             f"upgrade transformers {hint}")
    import inspect
    try:
        params = inspect.signature(generate).parameters
    except (TypeError, ValueError):
        params = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()) or not params
    for name in _generate_kwargs(settings):
        if not takes_any and name not in params:
            raise ValueError(f"transformers {version} does not support generate({name}=...); upgrade transformers")
    try:
        import transformers
        transformers.GenerationConfig(**kwargs).validate()
    except Exception as e:  # noqa: BLE001 - any rejection means "these settings cannot run"
        msg = " ".join(str(e).split())
        raise ValueError(f"transformers {version} rejects the generation settings {kwargs}: {msg}") from None


# ---------------------------------------------------------------------------------- helpers

def _model_device(model, device):
    if device is not None:
        return torch.device(device)
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    raise ValueError("generation: the tokenizer has neither a pad token nor an eos token to pad with")


def _as_id_list(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if v is not None]
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.flatten().tolist()]
    return [int(value)]


def _eos_ids(model, tokenizer) -> list[int]:
    """Tokenizer eos first, then any other eos the model's generation_config lists (chat models)."""
    ids = _as_id_list(tokenizer.eos_token_id)
    gen_cfg = getattr(model, "generation_config", None)
    for i in _as_id_list(getattr(gen_cfg, "eos_token_id", None)):
        if i not in ids:
            ids.append(i)
    return ids


def _tokenize_prompts(tokenizer, prompts: list[str], max_source_length: int | None,
                      cuts: list | None = None) -> tuple[list[list[int]], int]:
    """Prompt ids as at training time (special tokens on), a long one cut as trainkit.data.fit_prompt
    cuts it (its PromptCut from `cuts`, else from the left); (ids, number cut)."""
    from trainkit.data import prompt_token_ids

    ids, was_cut = prompt_token_ids(tokenizer, prompts, max_source_length, cuts)
    out = []
    fallback = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    for p in ids:
        if not p:  # an empty prompt: generate from bos (else eos) rather than from nothing
            if fallback is None:
                raise ValueError("generation: an empty prompt and no bos/eos token to start from")
            p = [int(fallback)]
        out.append(p)
    return out, sum(was_cut)


def _pad(seqs: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        n = len(s)
        if left:
            ids[row, width - n:] = torch.tensor(s, dtype=torch.long)
            mask[row, width - n:] = 1
        else:
            ids[row, :n] = torch.tensor(s, dtype=torch.long)
            mask[row, :n] = 1
    return ids, mask


class _EvalMode:
    """model.eval() inside, then every module's own train/eval flag back as it was."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        return self.model

    def __exit__(self, *exc):
        for m, was in self.modes:
            m.training = was
        return False


def _min_length_processor(prompt_width: int, min_new_per_row: list[int], eos_ids: list[int], num_beams: int):
    """Legacy per-prompt minimum: eos forbidden for row i until it has min_new_per_row[i] new tokens."""
    from transformers import LogitsProcessor

    class PerRowMinNewTokens(LogitsProcessor):
        def __init__(self):
            self.need = torch.tensor(min_new_per_row, dtype=torch.long).repeat_interleave(num_beams)
            self.eos = torch.tensor(eos_ids, dtype=torch.long)

        def __call__(self, input_ids, scores):
            generated = input_ids.shape[-1] - prompt_width
            rows = (self.need.to(scores.device) > generated).nonzero().flatten()
            if rows.numel() and self.eos.numel():
                scores = scores.clone()
                eos = self.eos.to(scores.device)
                scores[rows.unsqueeze(1), eos.unsqueeze(0)] = -float("inf")
            return scores

    return PerRowMinNewTokens()


def _progress(iterable, enabled: bool, total: int, desc: str):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False)


# ---------------------------------------------------------------------------------- generation

def generate_texts(model, tokenizer, prompts: list[str], settings: GenerationSettings | None = None,
                   device=None, progress: bool = False, cuts: list | None = None) -> GenerationResult:
    """One completion per prompt (see module doc); raises ValueError up front on unsupported settings."""
    start = time.perf_counter()
    settings = settings or GenerationSettings()
    check_generate_support(model, settings)
    prompts = list(prompts)
    if not prompts:
        return GenerationResult([], 0, time.perf_counter() - start, 0)

    device = _model_device(model, device)
    pad_id = _pad_id(tokenizer)
    eos_ids = _eos_ids(model, tokenizer)
    eos_set = set(eos_ids)
    left = bool(settings.force_left_pad) or getattr(tokenizer, "padding_side", "right") == "left"
    ids, truncated = _tokenize_prompts(tokenizer, prompts, settings.max_source_length, cuts)

    base_kwargs = config_kwargs(settings)
    base_kwargs["pad_token_id"] = pad_id
    if eos_ids:
        base_kwargs["eos_token_id"] = eos_ids if len(eos_ids) > 1 else eos_ids[0]
    legacy = not settings.use_max_new_tokens
    max_total, min_total = _total_limits(settings)

    order = sorted(range(len(ids)), key=lambda i: (-len(ids[i]), i))
    texts: list[str] = [""] * len(ids)
    new_tokens = 0
    no_room = 0
    batches = [order[k:k + settings.batch_size] for k in range(0, len(order), settings.batch_size)]

    with _EvalMode(model), torch.no_grad():
        for batch in _progress(batches, progress, len(batches), "generate"):
            # per-row budget of new tokens (legacy: what the prompt leaves of max_length)
            if legacy:
                budgets = {i: max_total - len(ids[i]) for i in batch}
                runnable = [i for i in batch if budgets[i] > 0]
                no_room += len(batch) - len(runnable)
                if not runnable:
                    continue
            else:
                budgets = {i: settings.max_new_tokens for i in batch}
                runnable = batch
            seqs = [ids[i] for i in runnable]
            input_ids, attention_mask = _pad(seqs, pad_id, left)
            width = input_ids.shape[1]
            kwargs = dict(base_kwargs)
            if legacy:
                kwargs["max_length"] = width + max(budgets[i] for i in runnable)
                if min_total > 0:
                    need = [max(0, min_total - len(ids[i])) for i in runnable]
                    from transformers import LogitsProcessorList
                    kwargs["logits_processor"] = LogitsProcessorList(
                        [_min_length_processor(width, need, eos_ids, settings.num_beams)])
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **kwargs)
            if not isinstance(out, torch.Tensor):  # return_dict_in_generate set in a generation_config
                out = out.sequences
            gen = out[:, width:].tolist()
            for row, i in enumerate(runnable):
                toks = gen[row][: budgets[i]]
                for k, t in enumerate(toks):
                    if t in eos_set:
                        new_tokens += k + 1
                        toks = toks[:k]
                        break
                else:
                    # trailing pads after a finished row only appear after an eos; none here
                    new_tokens += len(toks)
                texts[i] = tokenizer.decode(toks, skip_special_tokens=True)

    return GenerationResult(texts=texts, truncated_prompts=truncated, seconds=time.perf_counter() - start,
                            new_tokens=new_tokens, prompts_without_room=no_room)


# ---------------------------------------------------------------------------------- label scoring

LABEL_NORMALIZATIONS = ("none", "mean")


def label_log_likelihoods(model, tokenizer, prompts: list[str], targets: list[str], batch_size: int = 8,
                          device=None, max_source_length: int | None = None,
                          normalization: str = "none", cuts: list | None = None) -> list[list[float]]:
    """log p(target | prompt) for every prompt x label target: scores[i][j].

    A target is scored as the exact token sequence training produces for it
    (`data.target_token_ids`: the target text, e.g. " positive" with its leading space, tokenized
    apart without special tokens, + eos when the tokenizer has one), so the score is the
    log-probability the training loss raised.

    normalization "none" (default): the sum over the target's tokens, the log-probability of the
    whole answer (eos included: the model must also stop). It favours shorter targets when they
    differ in token count. "mean": the sum divided by the target's token count (length-normalized).

    The prompt is tokenized as for generation (special tokens on; a prompt longer than
    max_source_length cut as trainkit.data.fit_prompt cuts it: its PromptCut from `cuts`, else from
    the left) and the target's ids are scored as its continuation. Pairs are batched
    `batch_size` at a time, sorted by length and RIGHT padded (every real token keeps its unpadded
    position and attends only to real tokens, so a batched score equals the unbatched one up to
    float rounding).
    """
    return _label_scores(model, tokenizer, prompts, targets, batch_size, device, max_source_length, normalization,
                         cuts)[0]


def _label_scores(model, tokenizer, prompts, targets, batch_size, device, max_source_length, normalization,
                  cuts) -> tuple[list[list[float]], int]:
    """label_log_likelihoods' scores, and how many prompts were cut to max_source_length."""
    from trainkit.data import target_token_ids

    if normalization not in LABEL_NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {', '.join(LABEL_NORMALIZATIONS)}, got {normalization!r}")
    if not targets:
        raise ValueError("targets is empty")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prompts = list(prompts)
    if not prompts:
        return [], 0
    device = _model_device(model, device)
    pad_id = _pad_id(tokenizer)
    prompt_ids, truncated = _tokenize_prompts(tokenizer, prompts, max_source_length, cuts)
    label_ids = target_token_ids(tokenizer, targets)
    for text, lab in zip(targets, label_ids):
        if not lab:
            raise ValueError(f"target {text!r} tokenizes to no tokens")

    pairs = [(i, j) for i in range(len(prompts)) for j in range(len(label_ids))]
    order = sorted(pairs, key=lambda p: -(len(prompt_ids[p[0]]) + len(label_ids[p[1]])))
    scores = [[0.0] * len(label_ids) for _ in prompts]
    batches = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    with _EvalMode(model), torch.no_grad():
        for batch in batches:
            seqs = [prompt_ids[i] + label_ids[j] for i, j in batch]
            input_ids, attention_mask = _pad(seqs, pad_id, left=False)
            out = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False)
            logits = out.logits if hasattr(out, "logits") else out[0]
            for row, (i, j) in enumerate(batch):
                p, n = len(prompt_ids[i]), len(label_ids[j])
                # logits at position t predict token t + 1
                step_logits = logits[row, p - 1:p - 1 + n].float()
                ids = torch.tensor(label_ids[j], dtype=torch.long, device=step_logits.device)
                lp = torch.log_softmax(step_logits, dim=-1).gather(1, ids.unsqueeze(1)).sum().item()
                scores[i][j] = lp / n if normalization == "mean" else lp
    return scores, truncated


class LabelPicks(NamedTuple):
    picks: list[int]            # per prompt, the index of the best-scoring target
    truncated_prompts: int      # prompts cut to max_source_length (data.fit_prompt)


def score_label_likelihood(model, tokenizer, prompts: list[str], targets: list[str], batch_size: int = 8,
                           device=None, max_source_length: int | None = None, normalization: str = "none",
                           cuts: list | None = None) -> LabelPicks:
    """For each prompt, the index of the target with the highest log-likelihood (first on ties), and
    the count of prompts cut; see `label_log_likelihoods` for the scored tokens, the cut and the
    normalization."""
    scores, truncated = _label_scores(model, tokenizer, prompts, targets, batch_size, device, max_source_length,
                                      normalization, cuts)
    return LabelPicks([max(range(len(row)), key=lambda j: (row[j], -j)) for row in scores], truncated)

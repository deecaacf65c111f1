"""What every task shares: Example, the Task base class, local-folder resolution, HF loading,
deterministic train/validation carving and the parsing of generated text."""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from trainkit.data_sources import load_hf_dataset
from trainkit.tasks.official import base_task, official_metrics

REPO = Path(__file__).resolve().parents[2]

HELDOUT_FRACTION = 0.1   # carved validation: 10% of the public train split ...
HELDOUT_CAP = 1000       # ... at most 1000 rows


class TaskDataError(FileNotFoundError):
    """Task data not found: a missing local folder or file, or HF datasets unreachable.
    The message names the environment variable (and config key) that points at a local copy."""


@dataclass(frozen=True)
class PromptCut:
    """The part of a prompt that may be shortened when the prompt is too long, and from which end.

    start, end: the character span [start, end) of the prompt (the schema, the dialogue, the facts,
    a sentence); the instruction, the question and the answer cue ("SQL:") lie outside it.
    side: "right" cuts the span's tail, "left" its beginning.
    whole_lines: drop whole lines of the span (Spider's CREATE TABLE lines, DART's triples) rather
    than stopping mid-line, unless not even its first line fits.
    trainkit.data.fit_prompt applies it, for training and for generation alike.
    """
    start: int
    end: int
    side: str = "right"
    whole_lines: bool = False

    def __post_init__(self):
        if self.side not in ("left", "right") or not 0 <= self.start <= self.end:
            raise ValueError(f"bad PromptCut {self}")


@dataclass
class Example:
    """One task example.

    prompt: the text the model sees; it ends where the answer starts ("...\\nAnswer:").
    target: the training completion, starting with a space (" positive", " SELECT ...").
    references: what predictions are scored against (label word, gold SQL, all reference texts).
    meta: per-task fields the scorer needs (label, idx, db_id/db_path, ...); JSON-serialisable.
    cut: the part of the prompt a too-long prompt loses (PromptCut); None: the prompt's beginning.
    """
    prompt: str
    target: str
    references: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    cut: PromptCut | None = None


def fill_prompt(template: str, shortenable: str, side: str = "right", whole_lines: bool = False,
                **values: str) -> tuple[str, PromptCut]:
    """template.format(**values) and the PromptCut of the field `shortenable` in it (its one
    occurrence in the template)."""
    before, after = template.split("{" + shortenable + "}")
    head = before.format(**values)
    prompt = head + values[shortenable] + after.format(**values)
    return prompt, PromptCut(len(head), len(head) + len(values[shortenable]), side, whole_lines)


class Task:
    """A task: loads examples (local folder or HF datasets) and scores generated text.

    Subclasses set name, env_var, layout (and kind, label_words, eval_splits where they differ from
    the defaults below), and implement
    _load(root, seed, cache_dir, local_files_only) and score().
    """

    name: str = ""
    kind: str = "generation"          # "classification" | "regression" | "generation"
    label_words: list[str] | None = None
    eval_splits: list[str] = ["validation"]  # shared by the tasks that keep it: never mutated (GLUE sets its own)
    env_var: str = ""
    layout: str = ""                  # expected local folder layout, for error messages
    tvt: bool = False

    @property
    def base(self) -> str:
        return base_task(self.name)

    @property
    def metrics(self) -> tuple[str, ...]:
        """Official metric names (eval_log fields) of this task."""
        return official_metrics(self.name)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} ({self.kind})>"

    # ------------------------------------------------------------------ loading
    def load(self, local_dir: str | os.PathLike | None = None, seed: int = 42, cache_dir: str | None = None,
             local_files_only: bool = False, max_train: int | None = None, max_eval: int | None = None,
             max_test: int | None = None) -> dict[str, list[Example]]:
        """split name -> examples. `local_dir` (argument / config) wins over the task's environment
        variable; with neither, HF datasets (cache_dir, local_files_only). Caps (first N, after any
        carving; None keeps all): max_train the training split, max_eval the validation splits,
        max_test the test splits (see cap_splits)."""
        root = resolve_local_dir(local_dir, self.env_var, self.name, self.layout)
        splits = self._load(root, seed=seed, cache_dir=cache_dir, local_files_only=local_files_only)
        return cap_splits(splits, max_train=max_train, max_eval=max_eval, max_test=max_test)

    def _load(self, root: Path | None, seed: int, cache_dir: str | None,
              local_files_only: bool) -> dict[str, list[Example]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def score(self, predictions: list[str], examples: list[Example], split: str | None = None) -> dict[str, float]:
        raise NotImplementedError  # pragma: no cover - abstract

    # ------------------------------------------------------------------ prompts by hand
    input_fields: tuple[str, ...] = ()  # what prompt_from_fields takes (the example's input, not its answer)

    def prompt_from_fields(self, fields: dict) -> tuple[str, PromptCut | None]:
        """The prompt (and its PromptCut) training builds for an example with these input fields, for prompting
        a tuned model by hand (python -m trainkit.generate --task-format). ValueError naming a missing field."""
        raise ValueError(f"{self.name}: no prompt builder for input fields; write the prompt yourself")

    def _check_fields(self, fields: dict) -> None:
        missing = [f for f in self.input_fields if f not in fields]
        if missing:
            raise ValueError(f"{self.name}: input without {', '.join(missing)} (fields: {', '.join(self.input_fields)})")


def is_test_split(name: str) -> bool:
    return name.startswith("test")


def cap_splits(splits: dict[str, list[Example]], max_train: int | None = None, max_eval: int | None = None,
               max_test: int | None = None) -> dict[str, list[Example]]:
    """The first N examples of each split: "train" by max_train, the test splits ("test",
    "test_matched", ...) by max_test, every other (validation) split by max_eval; None keeps all."""
    out = {}
    for split, examples in splits.items():
        cap = max_train if split == "train" else max_test if is_test_split(split) else max_eval
        out[split] = list(examples[:cap]) if cap is not None else list(examples)
    return out


def distinct_test_splits(splits: dict[str, list[Example]]) -> list[str]:
    """The non-empty test splits worth scoring at the end: none when every one of them is its
    validation split again (plain GLUE: test = public validation, whose test labels are hidden).
    Compare uncapped splits: a validation split capped by max_eval_samples is no longer equal to it."""
    names = [s for s in splits if is_test_split(s) and splits[s]]

    def prompts(name):
        return [e.prompt for e in splits.get(name) or []]

    if all(prompts(s) == prompts(s.replace("test", "validation", 1)) for s in names):
        return []
    return names


def check_lengths(predictions, examples) -> None:
    if len(predictions) != len(examples):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")


# ---------------------------------------------------------------------- local folders
def resolve_local_dir(local_dir, env_var: str, task: str, layout: str) -> Path | None:
    """The local data folder: the argument (task.local_dir) if given, else $env_var, else None (HF).
    A relative path that does not exist from the working directory is tried from the repo root
    (so `data/tasks/glue` works from anywhere). A folder that is named but missing is an error."""
    source = "task.local_dir"
    if local_dir in (None, ""):
        local_dir = os.environ.get(env_var) or None
        source = env_var
    if local_dir is None:
        return None
    path = Path(local_dir).expanduser()
    if not path.is_absolute() and not path.exists() and (REPO / path).exists():
        path = REPO / path
    if not path.is_dir():
        raise TaskDataError(f"{task}: local data folder {str(local_dir)!r} (from {source}) does not exist; "
                            f"set task.local_dir or {env_var} to a folder with {layout}")
    return path.resolve()


def need_file(path: Path, env_var: str, task: str, layout: str) -> Path:
    if not path.is_file():
        raise TaskDataError(f"{task}: {path} is missing; {env_var} / task.local_dir must be a folder with {layout}")
    return path


def load_hf(candidates: list[tuple[str, str | None]], task: str, env_var: str, layout: str,
            cache_dir: str | None, local_files_only: bool) -> tuple[str, dict[str, list[dict]]]:
    """The first of `candidates` ((path, config) pairs) that HF datasets loads: (path, split -> rows).
    Every failure together in one TaskDataError that names the environment variable."""
    errors = []
    for path, config in candidates:
        try:
            dataset = load_hf_dataset(path, split=None, name=config, cache_dir=cache_dir, local_files_only=local_files_only)
            return path, {split: dataset[split].to_list() for split in dataset}
        except Exception as e:  # noqa: BLE001 - every loader failure is reported below
            detail = str(e).splitlines()[0][:200] if str(e) else ""
            errors.append(f"{path}{'/' + config if config else ''}: {type(e).__name__}: {detail}")
    raise TaskDataError(f"{task}: could not load from HF datasets ({'; '.join(errors)}); "
                        f"set task.local_dir or {env_var} to a local copy: a folder with {layout}")


# ---------------------------------------------------------------------- carving
def carve(rows: list, seed: int, fraction: float = HELDOUT_FRACTION, cap: int = HELDOUT_CAP) -> tuple[list, list]:
    """Split rows into (train, held_out) deterministically: held_out is the `min(cap, round(fraction*n))`
    rows (at least 1 when n >= 2) whose sha256("{seed}:{position}") is smallest; both keep file order.
    Same rows, same seed -> same split, on any machine and library version."""
    n = len(rows)
    k = 0 if n < 2 else min(cap, max(1, round(fraction * n)))
    order = sorted(range(n), key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).digest())
    held = set(order[:k])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


# ---------------------------------------------------------------------- parsing generations
_EDGE = " \t\"'`.,;:!?()[]{}*<>"


def first_line(text: str) -> str:
    """strip, then the first line ("" for empty text)."""
    lines = (text or "").strip().splitlines()
    return lines[0].strip() if lines else ""


def parse_label(text: str, label_words: list[str]) -> int | None:
    """Index of the label word a generation names, or None (unparseable, scored as wrong).

    First line, case-insensitive, surrounding quotes/punctuation dropped; the whole line equal to a
    label word, else the line starting with one as a whole word (longest label first, so
    "unacceptable" is not read as "acceptable" and "not sure" is not "no")."""
    line = first_line(text).lower().strip(_EDGE)
    words = [w.lower() for w in label_words]
    if line in words:
        return words.index(line)
    for i in sorted(range(len(words)), key=lambda j: -len(words[j])):
        w = words[i]
        if line.startswith(w) and not (line[len(w):len(w) + 1].isalnum() or line[len(w):len(w) + 1] == "_"):
            return i
    return None


_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def parse_float(text: str, low: float | None = None, high: float | None = None) -> float | None:
    """The first number on the first line, clipped to [low, high]; None if there is none."""
    match = _NUMBER.search(first_line(text))
    if not match:
        return None
    value = float(match.group())
    if not math.isfinite(value):
        return None
    if low is not None:
        value = max(low, value)
    if high is not None:
        value = min(high, value)
    return value


def clean_generation(text: str) -> str:
    """Generated text for the generation tasks: stripped, cut at the first blank line (a new block is
    not part of the answer), remaining line breaks joined with spaces."""
    text = (text or "").strip()
    text = re.split(r"\n[ \t]*\n", text, maxsplit=1)[0]
    return " ".join(line.strip() for line in text.splitlines() if line.strip())

"""GLUE tasks (cola sst2 mrpc qqp stsb mnli qnli rte wnli): prompts, loading, official metrics.

Splits
    plain (`sst2`, `glue_sst2`): train = public train; validation = public validation; test = the
        public validation again (GLUE test labels are hidden), so a trainer sees test == validation.
        MNLI: validation_matched / validation_mismatched, and test_matched / test_mismatched = the same.
    carved (`glue-tvt_sst2`, `sst2-tvt`): test = public validation; the public train split is cut
        (trainkit.tasks.base.carve: by seed, 10% capped at 1000 rows) into train + a held-out
        validation. MNLI: validation_matched (held out from train, whose genres are the matched ones),
        test_matched and test_mismatched (the two public validation sets, whole).

Scoring parses the first line of a generation (trainkit.tasks.base.parse_label / parse_float):
classification takes the label word (case-insensitive), STS-B the first number clipped to [0, 5].
An unparseable answer follows T5's convention (t5/data/postprocessors.py string_label_to_class_id
and string_to_float, default -1): it is INVALID (-1), a class of its own that is never right.
Accuracy counts it wrong; MCC sees a third class (all-invalid CoLA answers: MCC 0, as a constant
prediction); F1 counts it as the label opposite to gold (T5's f1_score_with_invalid); STS-B
correlates -1.0, a score outside [0, 5].
"""

from __future__ import annotations

from pathlib import Path

from trainkit.tasks import metrics as M
from trainkit.tasks.base import (Example, PromptCut, Task, carve, check_lengths, fill_prompt, load_hf, need_file, parse_float,
                                 parse_label)

ENV_VAR = "GLUE_LOCAL_DIR"
HF_PATH = "nyu-mll/glue"
LAYOUT = ("<task>/train.jsonl and <task>/validation.jsonl (MNLI: validation_matched.jsonl, validation_mismatched.jsonl) "
          "of HF GLUE rows (sentence / sentence1,sentence2 / question1,question2 / premise,hypothesis / question,sentence; "
          "label; idx)")

# task -> (HF text columns, label words by label id (None: regression), prompt template)
SPECS: dict[str, tuple[tuple[str, ...], tuple[str, ...] | None, str]] = {
    "cola": (("sentence",), ("unacceptable", "acceptable"),
             "Is the following sentence grammatically acceptable? Answer acceptable or unacceptable.\n"
             "Sentence: {sentence}\nAnswer:"),
    "sst2": (("sentence",), ("negative", "positive"),
             "What is the sentiment of the following sentence? Answer positive or negative.\n"
             "Sentence: {sentence}\nAnswer:"),
    "mrpc": (("sentence1", "sentence2"), ("no", "yes"),
             "Do the two sentences mean the same thing? Answer yes or no.\n"
             "Sentence 1: {sentence1}\nSentence 2: {sentence2}\nAnswer:"),
    "qqp": (("question1", "question2"), ("no", "yes"),
            "Do the two questions ask the same thing? Answer yes or no.\n"
            "Question 1: {question1}\nQuestion 2: {question2}\nAnswer:"),
    "stsb": (("sentence1", "sentence2"), None,
             "How similar are the two sentences in meaning, from 0 (unrelated) to 5 (equivalent)?\n"
             "Sentence 1: {sentence1}\nSentence 2: {sentence2}\nAnswer:"),
    "mnli": (("premise", "hypothesis"), ("entailment", "neutral", "contradiction"),
             "Does the premise entail the hypothesis? Answer entailment, neutral or contradiction.\n"
             "Premise: {premise}\nHypothesis: {hypothesis}\nAnswer:"),
    "qnli": (("question", "sentence"), ("yes", "no"),
             "Does the sentence answer the question? Answer yes or no.\n"
             "Question: {question}\nSentence: {sentence}\nAnswer:"),
    "rte": (("sentence1", "sentence2"), ("yes", "no"),
            "Does the first sentence entail the second? Answer yes or no.\n"
            "Sentence 1: {sentence1}\nSentence 2: {sentence2}\nAnswer:"),
    "wnli": (("sentence1", "sentence2"), ("no", "yes"),
             "Does the first sentence entail the second? Answer yes or no.\n"
             "Sentence 1: {sentence1}\nSentence 2: {sentence2}\nAnswer:"),
}
GLUE_TASKS = tuple(SPECS)
MNLI_SETS = ("matched", "mismatched")
INVALID = -1  # an unparseable answer: label -1, STS-B score -1.0 (T5's postprocessor default)


def answer_target(answer: str) -> str:
    """The training target for an answer: a space, then the answer (the prompt ends at "Answer:")."""
    return " " + answer


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a local task file; a bad line is a ConfigError naming the file and its line."""
    from trainkit.data_sources import iter_jsonl_rows

    return [row for _, _, row in iter_jsonl_rows(path, "task.local_dir")]


class GlueTask(Task):
    env_var = ENV_VAR
    layout = LAYOUT

    def __init__(self, base: str, tvt: bool = False):
        self.tvt = tvt
        self.name = f"{base}-tvt" if tvt else base
        self.fields, words, self.template = SPECS[base]
        self.label_words = list(words) if words else None
        self.kind = "regression" if base == "stsb" else "classification"
        if base == "mnli":
            self.eval_splits = ["validation_matched"] if tvt else ["validation_matched", "validation_mismatched"]
        else:
            self.eval_splits = ["validation"]

    # ------------------------------------------------------------------ examples
    @property
    def label_targets(self) -> list[str]:
        """The training target of each label id (" negative", " positive"): what label-likelihood
        scoring scores (trainkit.generation.label_log_likelihoods)."""
        return [answer_target(w) for w in self.label_words]

    def prompt(self, row: dict) -> tuple[str, PromptCut]:
        """The prompt, and its PromptCut: a prompt too long for task.max_source_length loses the tail of
        its sentence (of pairs: the longer one), never the instruction or "Answer:"."""
        values = {f: str(row[f]).strip() for f in self.fields}
        longest = max(self.fields, key=lambda f: len(values[f]))  # the first on ties
        return fill_prompt(self.template, longest, side="right", **values)

    @property
    def input_fields(self) -> tuple[str, ...]:
        return self.fields

    def prompt_from_fields(self, fields: dict) -> tuple[str, PromptCut]:
        self._check_fields(fields)
        return self.prompt(fields)

    def example(self, row: dict, split: str) -> Example:
        missing = [f for f in (*self.fields, "label") if f not in row]
        if missing:
            raise ValueError(f"{self.base} ({split}): row without {', '.join(missing)}: {str(row)[:200]}")
        label = row["label"]
        if self.kind == "regression":
            label = float(label)
            answer = f"{label:.1f}"
            references = [f"{label:g}"]
        else:
            label = int(label)
            answer = self.label_words[label]
            references = [answer]
        meta = {"idx": row.get("idx"), "label": label, "split": split}
        if self.base == "mnli":
            meta["mnli_set"] = "mismatched" if "mismatched" in split else "matched"
        prompt, cut = self.prompt(row)
        return Example(prompt=prompt, target=answer_target(answer), references=references, meta=meta, cut=cut)

    def _examples(self, rows: list[dict], split: str) -> list[Example]:
        # label -1: an unlabeled (test) row; only labeled rows can be trained on or scored
        return [self.example(r, split) for r in rows if r.get("label", -1) not in (-1, None)]

    # ------------------------------------------------------------------ loading
    def _public_names(self) -> list[str]:
        if self.base == "mnli":
            return ["train", "validation_matched", "validation_mismatched"]
        return ["train", "validation"]

    def _read(self, root: Path | None, cache_dir, local_files_only) -> dict[str, list[dict]]:
        names = self._public_names()
        if root is None:
            _, rows = load_hf([(HF_PATH, self.base)], self.base, ENV_VAR, LAYOUT, cache_dir, local_files_only)
            return {n: rows[n] for n in names}
        folder = root / self.base if (root / self.base).is_dir() else root  # GLUE root, or the task folder itself
        return {n: read_jsonl(need_file(folder / f"{n}.jsonl", ENV_VAR, self.base, LAYOUT)) for n in names}

    def _load(self, root, seed, cache_dir, local_files_only) -> dict[str, list[Example]]:
        public = self._read(root, cache_dir, local_files_only)
        if self.base == "mnli":
            tests = {f"test_{s}": self._examples(public[f"validation_{s}"], f"test_{s}") for s in MNLI_SETS}
            if self.tvt:
                train_rows, held = carve(public["train"], seed)
                return {"train": self._examples(train_rows, "train"),
                        "validation_matched": self._examples(held, "validation_matched"), **tests}
            vals = {f"validation_{s}": self._examples(public[f"validation_{s}"], f"validation_{s}") for s in MNLI_SETS}
            return {"train": self._examples(public["train"], "train"), **vals, **tests}
        test = self._examples(public["validation"], "test")
        if self.tvt:
            train_rows, held = carve(public["train"], seed)
            return {"train": self._examples(train_rows, "train"), "validation": self._examples(held, "validation"),
                    "test": test}
        return {"train": self._examples(public["train"], "train"),
                "validation": self._examples(public["validation"], "validation"), "test": test}

    # ------------------------------------------------------------------ scoring
    def parse(self, text: str):
        """Label id (classification) or float in [0, 5] (STS-B) that a generation names; None if none."""
        if self.kind == "regression":
            return parse_float(text, 0.0, 5.0)
        return parse_label(text, self.label_words)

    def score(self, predictions: list[str], examples: list[Example], split: str | None = None) -> dict[str, float]:
        check_lengths(predictions, examples)
        if not examples:
            return {"num_examples": 0}
        gold = [e.meta["label"] for e in examples]
        pred = [INVALID if p is None else p for p in map(self.parse, predictions)]
        out: dict[str, float] = {}
        if self.base == "stsb":
            out.update(M.correlations(gold, [float(p) for p in pred]))
        elif self.base == "mnli":
            if split is not None and "matched" in split:
                sets = ["mismatched" if "mismatched" in split else "matched"] * len(examples)
            else:
                sets = [e.meta.get("mnli_set", "matched") for e in examples]
            for s in MNLI_SETS:
                idx = [i for i, x in enumerate(sets) if x == s]
                if idx:
                    out[f"accuracy_{s}"] = M.accuracy([gold[i] for i in idx], [pred[i] for i in idx])
        else:
            for metric in self.metrics:
                out[metric] = {"accuracy": M.accuracy, "f1": M.f1, "mcc": M.mcc}[metric](gold, pred)
        out["num_examples"] = len(examples)
        return out

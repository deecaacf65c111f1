"""DART data-to-text: the official evaluation's BLEU, plus sacreBLEU and TER.

Scores (Task.score): `bleu` is the official pipeline's (Yale-LILY/dart evaluation/run_eval_on_dart.sh):
Moses multi-bleu.perl (metrics.multi_bleu) over the first 3 references of each tripleset, on text
tokenised and lower-cased as the released references (all-delex-reference{0,1,2}.lex) are (see
official_tokenize); an example with fewer than 3 references has empty ones, as the reference
files have empty lines there, and multi-bleu.perl counts those. It ranks (task_score). Reported
beside it: `sacrebleu` (sacreBLEU defaults on the raw text, all references), `ter` (sacrebleu's
TER on the official tokenised text and the same non-empty references the official tercom run
gets; lower is better) and `signatures` {"sacrebleu": ..., "ter": ...} (sacrebleu's signature
strings). `ter` is left out for split "validation" (the evaluations during training): sacrebleu's
TER is pure Python, about 70 ms per example on a busy 2-core machine (6 minutes for the 5,097
test examples); the final test evaluation and scoring without a split name compute it.
METEOR is not computed (see README, "Tasks and metrics").

Local copy ($DART_LOCAL_DIR or task.local_dir): the release JSON files
dart-v1.1.1-full-train.json, dart-v1.1.1-full-dev.json, dart-v1.1.1-full-test.json, each a list of
{"tripleset": [[subject, predicate, object], ...], "subtree_was_extended": ..., "annotations":
[{"source": ..., "text": ...}, ...]}. HF: GEM/dart, else dart (converted to the same shape).

Splits: train has one example per annotation (every reference text is a training target);
validation (dev) and test have one example per tripleset with all its annotation texts as
references (target: the first). Entries without annotations are dropped.
The prompt lists one triple per line as "subject | predicate | object"; a prompt too long for
task.max_source_length loses whole triples from the end of the list.
"""

from __future__ import annotations

import json
import re

from trainkit.tasks import metrics as M
from trainkit.tasks.base import Example, PromptCut, Task, check_lengths, clean_generation, fill_prompt, load_hf, need_file

ENV_VAR = "DART_LOCAL_DIR"
HF_CANDIDATES = [("GEM/dart", None), ("dart", None)]
SPLIT_FILES = {"train": "dart-v1.1.1-full-train.json", "validation": "dart-v1.1.1-full-dev.json",
               "test": "dart-v1.1.1-full-test.json"}
LAYOUT = ", ".join(SPLIT_FILES.values()) + " (the DART release JSON)"
OFFICIAL_REFERENCES = 3  # the official script reads all-delex-reference0/1/2.lex
_TOKEN = re.compile(r"\w+|[^\w\s]")  # a run of word characters, or one other non-space character
PROMPT = "Write a short text that states all of the following facts.\n\nFacts:\n{facts}\n\nText:"


def from_hf_row(row: dict) -> dict:
    """A GEM/dart or dart row -> the release's {tripleset, annotations} shape."""
    if "annotations" in row and isinstance(row["annotations"], dict):  # dart: {"source": [...], "text": [...]}
        ann = row["annotations"]
        return {"tripleset": row["tripleset"],
                "annotations": [{"source": s, "text": t} for s, t in zip(ann.get("source", []), ann.get("text", []))]}
    texts = list(row.get("references") or []) or [row.get("target", "")]  # GEM/dart
    sources = row.get("target_sources") or []
    return {"tripleset": row["tripleset"],
            "annotations": [{"source": sources[i] if i < len(sources) else "", "text": t} for i, t in enumerate(texts)]}


def official_tokenize(text: str) -> str:
    """Text as the DART references were prepared for the official BLEU: every run of word characters
    and every other non-space character is a token, then lower-cased; tokens joined with spaces.
    "Hawaii Five-O's 65.38%." -> "hawaii five - o ' s 65 . 38 % ." (tokenising before lower-casing
    keeps "İzmir" one token, as in the references)."""
    return " ".join(token.lower() for token in _TOKEN.findall(text or ""))


def official_bleu(predictions: list[str], references: list[list[str]]) -> float:
    """The official DART BLEU: multi-bleu.perl over the first 3 references (missing ones empty) on
    official_tokenize'd text."""
    refs = [[official_tokenize(r) for r in example[:OFFICIAL_REFERENCES]] for example in references]
    refs = [r + [""] * (OFFICIAL_REFERENCES - len(r)) for r in refs]
    return M.multi_bleu([official_tokenize(p) for p in predictions], refs)


def official_ter(predictions: list[str], references: list[list[str]]) -> tuple[float, str]:
    """sacrebleu's TER on what the official tercom run gets: official_tokenize'd text, the non-empty
    ones of the first 3 references."""
    refs = [[t for r in example[:OFFICIAL_REFERENCES] if (t := official_tokenize(r))] or [""] for example in references]
    return M.ter([official_tokenize(p) for p in predictions], refs)


class DartTask(Task):
    name = "dart"
    env_var = ENV_VAR
    layout = LAYOUT

    @staticmethod
    def prompt(tripleset: list) -> tuple[str, PromptCut]:
        """The prompt, and its PromptCut: a prompt too long for task.max_source_length loses its last triples."""
        facts = "\n".join(" | ".join(" ".join(str(x).split()) for x in triple) for triple in tripleset)
        return fill_prompt(PROMPT, "facts", side="right", whole_lines=True, facts=facts)

    input_fields = ("tripleset",)

    def prompt_from_fields(self, fields: dict) -> tuple[str, PromptCut]:
        self._check_fields(fields)
        tripleset = fields["tripleset"]
        if not isinstance(tripleset, list) or not all(isinstance(t, list) and len(t) == 3 for t in tripleset):
            raise ValueError("dart: tripleset must be a list of [subject, predicate, object] triples")
        return self.prompt(tripleset)

    def examples(self, entries: list[dict], split: str) -> list[Example]:
        out = []
        for n, entry in enumerate(entries):
            texts = [" ".join(a["text"].split()) for a in entry.get("annotations") or [] if a.get("text", "").strip()]
            if not texts:
                continue
            prompt, cut = self.prompt(entry["tripleset"])
            if split == "train":
                out.extend(Example(prompt, " " + t, [t], {"entry": n, "split": split}, cut) for t in texts)
            else:
                out.append(Example(prompt, " " + texts[0], texts, {"entry": n, "split": split}, cut))
        return out

    def _load(self, root, seed, cache_dir, local_files_only):
        if root is None:
            _, data = load_hf(HF_CANDIDATES, self.name, ENV_VAR, LAYOUT, cache_dir, local_files_only)
            data = {"train": data["train"], "validation": data["validation"], "test": data["test"]}
            data = {s: [from_hf_row(r) for r in rows] for s, rows in data.items()}
        else:
            data = {s: json.loads(need_file(root / f, ENV_VAR, self.name, LAYOUT).read_text(encoding="utf-8"))
                    for s, f in SPLIT_FILES.items()}
        return {s: self.examples(entries, s) for s, entries in data.items()}

    def score(self, predictions, examples, split=None):
        check_lengths(predictions, examples)
        if not examples:
            return {"num_examples": 0}
        texts = [clean_generation(p) for p in predictions]
        references = [e.references for e in examples]
        sacrebleu_score, sacrebleu_signature = M.sacrebleu(texts, references)
        out = {"bleu": official_bleu(texts, references), "sacrebleu": sacrebleu_score,
               "signatures": {"sacrebleu": sacrebleu_signature}, "num_examples": len(examples)}
        if split != "validation":  # TER is slow (see the module docstring): not at every validation
            out["ter"], out["signatures"]["ter"] = official_ter(texts, references)
        return out

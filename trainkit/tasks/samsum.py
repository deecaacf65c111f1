"""SAMSum dialogue summarisation: ROUGE-Lsum (ranks), ROUGE-1/2/L (rouge_score, stemming, F-measure x100;
Lsum over sentences split by metrics.split_sentences, one per line).

Local copy ($SAMSUM_LOCAL_DIR or task.local_dir): train.csv, validation.csv, test.csv with columns
id, dialogue, summary (the public CSV release). HF: knkarthick/samsum, else Samsung/samsum.
Dialogue line breaks ("\\r\\n" in the release) become "\\n". Training rows with an empty dialogue or
summary are dropped; evaluation rows are kept.
"""

from __future__ import annotations

import csv
from pathlib import Path

from trainkit.tasks import metrics as M
from trainkit.tasks.base import (Example, PromptCut, Task, check_lengths, clean_generation, fill_prompt, load_hf,
                                  need_file)

ENV_VAR = "SAMSUM_LOCAL_DIR"
HF_CANDIDATES = [("knkarthick/samsum", None), ("Samsung/samsum", None)]
LAYOUT = "train.csv, validation.csv, test.csv (columns id, dialogue, summary: the public CSV release)"
PROMPT = "Summarize the following dialogue.\n\nDialogue:\n{dialogue}\n\nSummary:"
SPLIT_FILES = {"train": "train.csv", "validation": "validation.csv", "test": "test.csv"}


def read_csv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and not {"dialogue", "summary"} <= rows[0].keys():
        raise ValueError(f"{path}: columns {list(rows[0])}, expected id, dialogue, summary")
    return rows


def _text(value) -> str:
    return (value or "").replace("\r\n", "\n").replace("\r", "\n").strip()


class SamsumTask(Task):
    name = "samsum"
    env_var = ENV_VAR
    layout = LAYOUT

    input_fields = ("dialogue",)

    def prompt_from_fields(self, fields: dict) -> tuple[str, PromptCut]:
        """The prompt of a dialogue; one too long for task.max_source_length loses the dialogue's last turns."""
        self._check_fields(fields)
        return fill_prompt(PROMPT, "dialogue", side="right", whole_lines=True, dialogue=_text(fields["dialogue"]))

    def example(self, row: dict, split: str) -> Example:
        summary = _text(row.get("summary"))
        prompt, cut = self.prompt_from_fields({"dialogue": row.get("dialogue")})
        return Example(prompt=prompt, target=" " + summary, references=[summary],
                       meta={"id": str(row.get("id", "")), "split": split}, cut=cut)

    def _load(self, root, seed, cache_dir, local_files_only):
        if root is None:
            _, data = load_hf(HF_CANDIDATES, self.name, ENV_VAR, LAYOUT, cache_dir, local_files_only)
        else:
            data = {s: read_csv(need_file(root / f, ENV_VAR, self.name, LAYOUT)) for s, f in SPLIT_FILES.items()}
        out = {}
        for split in SPLIT_FILES:
            rows = data[split]
            if split == "train":
                rows = [r for r in rows if _text(r.get("dialogue")) and _text(r.get("summary"))]
            out[split] = [self.example(r, split) for r in rows]
        return out

    def score(self, predictions, examples, split=None):
        check_lengths(predictions, examples)
        if not examples:
            return {"num_examples": 0}
        out = M.rouge([clean_generation(p) for p in predictions], [e.references for e in examples])
        out["num_examples"] = len(examples)
        return out

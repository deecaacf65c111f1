"""Evaluation during training: the validation loss (every script with labelled validation data) and
train_lora.py's task evaluation by generation (trainkit.generation + the task's official metrics).
distill.py's KD evaluation is trainkit.kd.evaluate_kd.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from trainkit.fileio import write_jsonl_atomic

PREDICTIONS_DIR = "predictions"  # <run_dir>/predictions/<tag>-<split>.jsonl


def eval_loader(rows, batch_size: int, accelerator, max_batches: int | None = None, **loader_options):
    """This process's share of the labelled validation `rows` (a list of dict rows or an HF Dataset
    with input_ids and labels) as a plain DataLoader (not prepared by
    accelerate, whose sampler completes the last batches with rows from the start: under several
    processes those rows would be counted twice in the loss). Every process sees the first
    `max_batches` x `batch_size` rows of the split between them (the same rows on any number of
    processes), process i the rows i, i + N, ..., and every process the same number of rows:
    the shorter shares are filled up with a row whose labels are all -100, which adds no loss and no
    tokens, so each process runs the same number of forwards (what a sharded model needs)."""
    from torch.utils.data import DataLoader

    from trainkit.data import IGNORE_INDEX

    count = min(len(rows), max_batches * batch_size) if max_batches else len(rows)
    rank, world = accelerator.process_index, accelerator.num_processes
    share = [rows[i] for i in range(rank, count, world)]
    if count:
        filler = {**rows[0], "labels": [IGNORE_INDEX] * len(rows[0]["labels"])}
        share += [filler] * (-(-count // world) - len(share))
    return DataLoader(share, batch_size=batch_size, shuffle=False, **loader_options)


def evaluate_loss(model, loader, accelerator) -> dict:
    """Token-level LM loss on a labelled loader (labels -100 are ignored), summed over processes.
    Computed from the logits, not the model's loss, which may include a MoE router aux loss.
    `loader`: eval_loader's share of the rows (which applies training.max_eval_batches)."""
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    tokens = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    started = time.time()
    with torch.no_grad():
        for batch in loader:
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            loss_sum += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                        ignore_index=-100, reduction="sum")
            tokens += (labels != -100).sum()
    model.train(was_training)
    loss_sum, tokens = accelerator.reduce(torch.stack([loss_sum, tokens]), "sum").tolist()
    eval_loss = loss_sum / max(tokens, 1)
    return {"eval_loss": eval_loss, "perplexity": math.exp(min(eval_loss, 50)), "eval_tokens": int(tokens),
            "eval_seconds": round(time.time() - started, 3)}



class TaskEvaluator:
    """Generates (or scores label likelihoods) for every example of a split, scores the texts with the
    task's official metrics and saves the predictions under <run_dir>/predictions/. Under DDP each
    process takes every world_size-th example; the main process scores, every process gets the result."""

    def __init__(self, accelerator, model, tokenizer, task, splits: dict, generation, *, label_likelihood: bool,
                 test_splits: list[str], batch_size: int, run_dir: Path, progress: bool, say, verbose: bool = False,
                 label_normalization: str = "none"):
        self.accelerator, self.model, self.tokenizer, self.task, self.splits = accelerator, model, tokenizer, task, splits
        self.generation, self.label_likelihood, self.batch_size = generation, label_likelihood, batch_size
        self.label_normalization = label_normalization
        self.test_splits = list(test_splits)  # trainkit.tasks.base.distinct_test_splits of the uncapped splits
        self.run_dir, self.progress, self.say, self.verbose = Path(run_dir), progress, say, verbose

    def predict(self, split: str) -> tuple[list[str], float, int]:
        """Predictions for every example of `split`, in order, on every process; the seconds taken; and
        how many prompts were cut to task.max_source_length (every process's, summed)."""
        from accelerate.utils import gather_object

        from trainkit.generation import generate_texts, score_label_likelihood

        acc, examples = self.accelerator, self.splits[split]
        mine = list(range(acc.process_index, len(examples), acc.num_processes))
        prompts = [examples[i].prompt for i in mine]
        model = acc.unwrap_model(self.model)
        started = time.time()
        if self.label_likelihood:
            # the label targets as trained (" positive" + eos), prompts cut as at training time
            picks, truncated = score_label_likelihood(model, self.tokenizer, prompts, self.task.label_targets,
                                                      batch_size=self.batch_size, device=acc.device,
                                                      max_source_length=self.generation.max_source_length,
                                                      normalization=self.label_normalization,
                                                      cuts=[examples[i].cut for i in mine])
            texts = [self.task.label_words[i] for i in picks]
        else:
            generated = generate_texts(model, self.tokenizer, prompts, self.generation, device=acc.device,
                                       progress=acc.is_main_process and self.progress, cuts=[examples[i].cut for i in mine])
            texts, truncated = generated.texts, generated.truncated_prompts
        by_index = dict(gather_object(list(zip(mine, texts))))
        truncated = sum(gather_object([truncated]))
        return [by_index[i] for i in range(len(examples))], time.time() - started, truncated

    def score(self, split_names: list[str], tag: str) -> dict:
        """Generate, score and save predictions of each split; flat metrics (+ task_score) on every process."""
        from accelerate.utils import broadcast_object_list

        from trainkit.tasks.official import TASK_SCORE, selection_score

        is_main = self.accelerator.is_main_process
        result: dict = {"truncated_prompts": 0}
        for split in split_names:
            texts, seconds, truncated = self.predict(split)
            if not is_main:
                continue
            result["truncated_prompts"] += truncated
            examples = self.splits[split]
            metrics = self.task.score(texts, examples, split=split)
            result.update({k: v for k, v in metrics.items() if k != "num_examples"})
            result[f"{split}_examples"] = metrics.get("num_examples", len(texts))
            result["generation_seconds"] = round(result.get("generation_seconds", 0) + seconds, 3)
            result.setdefault("predictions", []).append(self.save_predictions(f"{tag}-{split}", examples, texts))
            if self.verbose and texts:
                self.say(f"{split} sample: {examples[0].prompt[-80:]!r} -> {texts[0]!r} (ref {examples[0].references[:1]})")
        if is_main:
            result[TASK_SCORE] = selection_score(self.task.name, result)
            if result["truncated_prompts"]:  # once per evaluation: the score is of shortened prompts
                self.say(f"warning: {result['truncated_prompts']} {'/'.join(split_names)} prompts are longer than "
                         f"task.max_source_length={self.generation.max_source_length} tokens and were cut "
                         f"(from the part of the prompt {self.task.name} lets go; eval_log field truncated_prompts)")
        return broadcast_object_list([result])[0]

    def save_predictions(self, name: str, examples, texts: list[str]) -> str:
        """<run_dir>/predictions/<name>.jsonl, one line per example; returns its path relative to the run dir."""
        out = self.run_dir / PREDICTIONS_DIR / f"{name}.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl_atomic(out, ({"prompt": e.prompt, "prediction": text, "references": e.references, **e.meta}
                                 for e, text in zip(examples, texts)))
        return str(out.relative_to(self.run_dir))

    def evaluate_test(self, run, state, load_adapter, best_dir: Path) -> None:
        """The best adapter on the test splits: one eval_log line with split 'test' at the last step.
        Runs after the final checkpoint is saved (the model's last use: the best adapter may replace
        the final one). Nothing to do when the test split is the validation split again (plain GLUE).
        Every example of each test split is scored unless task.max_test_samples capped it (never
        task.max_eval_samples); the counts are logged (<split>_examples) and printed."""
        from trainkit.tasks.official import TASK_SCORE

        test_splits = self.test_splits
        if not test_splits:
            return
        if state.best_step is not None and (best_dir / "adapter_model.safetensors").exists():
            load_adapter(str(best_dir))
        result = {"task": self.task.name, "split": "test", "evaluated_step": state.best_step,
                  **self.score(test_splits, f"test-best-step-{state.best_step}")}
        run.runlog.write("eval", {"step": state.step, **result, "metric": run.log_cfg.metric_for_best,
                                  "metric_value": None, "is_best": False})
        counts = ", ".join(f"{s} {result.get(f'{s}_examples')} examples" for s in test_splits)
        run.say(f"test ({counts}) with the adapter of step {state.best_step}: {TASK_SCORE} {result.get(TASK_SCORE)}")

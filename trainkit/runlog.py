"""The run directory: the contract between the trainers and the dashboard.

Every trainer writes, and every reader reads, the layout below. Field names live in
this module (and in README.md, "Run directory"); nothing here imports torch, so a
reader can interpret a run without importing a trainer.

    <output_dir>/<run_name>/
      run.json                     RUN_FIELDS
      logs/training_log.jsonl      TRAINING_FIELDS, one line per logged optimizer step
      logs/eval_log.jsonl          EVAL_FIELDS, one line per evaluation
      logs/expert_usage_log.jsonl  EXPERT_FIELDS, MoE router statistics
      logs/error_log.jsonl         ERROR_FIELDS, one line per error
      logs/events.jsonl            EVENT_FIELDS, one line per event (EVENTS)
      checkpoint-<step>/           adapter + tokenizer + accelerate state + trainer_state.json
      best-adapter/                copy of the best checkpoint's adapter
      final-checkpoint-<step>/

Every JSONL line is one JSON object with at least ``step`` and ``time`` (unix
seconds). JSON has no NaN: a field whose value is NaN (a metric undefined on its input, e.g.
MCC when gold has one class, or a diverged loss) is written as null and its name listed in the
line's ``nan_fields`` (``read_number`` gives it back as NaN); null without that means missing. Only the main process writes. A line is written with a single ``write`` of
the whole line and flushed, so a reader sees it whole or not at all; readers skip a
partial last line. After a resume from step S the lines with step > S from the earlier
attempt are dropped (``RunLog.truncate_after``), except error lines and the ``stop`` and
``preempted`` events, which record how that attempt ended; a reader that sees a step go
backwards must also drop the later steps of the earlier attempt's series (training, eval,
experts), not its errors and events.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import socket
import time
from pathlib import Path
from typing import Any

from trainkit.fileio import append_line, iter_jsonl, json_safe, read_json, write_json_atomic, write_text_atomic

LOGS_DIR = "logs"
RUN_INFO_FILE = "run.json"
TRAINER_STATE_FILE = "trainer_state.json"  # inside every checkpoint-<step>/
BEST_ADAPTER_DIR = "best-adapter"
CHECKPOINT_PREFIX = "checkpoint-"
FINAL_CHECKPOINT_PREFIX = "final-checkpoint-"

STREAMS = {
    "training": "training_log.jsonl",
    "eval": "eval_log.jsonl",
    "experts": "expert_usage_log.jsonl",
    "errors": "error_log.jsonl",
    "events": "events.jsonl",
}

# run.json
RUN_FIELDS = {
    "run_name": "name of the run (the directory name)",
    "script": "entry point that wrote the run (train_qlora.py, train_lora.py, distill.py)",
    "status": "running | finished | failed | preempted (stopped by SIGTERM/SIGINT; launch_training.sh resumes it) (a reader may show 'stalled' for a running run whose logs stopped)",
    "exit_code": "exit code of the trainer's processes when the run ended (0 finished, 1 failed, 2 config error, 143/130 preempted by SIGTERM/SIGINT), null while running or when killed without a record (SIGKILL); launch_training.sh writes 1 when a rank died without an exit code and rank 0 could not record it",
    "start_time": "unix seconds of the first start",
    "last_start_time": "unix seconds of the latest start or resume",
    "end_time": "unix seconds when the run finished or failed, else null",
    "total_steps": "optimizer steps the run will take",
    "world_size": "number of processes",
    "num_machines": "number of nodes",
    "distributed_type": "how the processes share the work, accelerate's DistributedType: NO (one process), MULTI_GPU / MULTI_CPU (DDP: every process holds the whole model), FSDP (weights sharded), DEEPSPEED",
    "mixed_precision": "no | bf16 | fp16",
    "host": "hostname of the main process",
    "pid": "process id of the main process",
    "resumed_from": "checkpoint path of the latest resume, else null",
    "attempt": "id of the latest attempt (a start or a resume); written at a resume and with each checkpoint",
    "lineage": "[[attempt, last step or null], ...]: the checkpoints the latest attempt continues; --resume and the launcher resume the newest checkpoint on it",
    "versions": "python and the installed versions of torch, transformers, accelerate, peft, bitsandbytes, datasets, flash-linear-attention, fla-core, triton, tokenizers, safetensors, deepspeed (those installed), cuda and gpu on a GPU",
    "patches": "patches of library internals that acted in this run (trainkit/patches): [{name, library, version, why}]",
    "model": "model summary: name, family, is_moe, parameter counts, 4-bit parameter count; activation_checkpointing: memory.gradient_checkpointing's decision {policy (auto, true, false), layers (checkpointed: the first ones), of (decoder layers), tokens (per micro batch), estimated_gib_per_layer, estimated_gib (activations with this choice), budget_gib, budget_from}, the estimates and budget null for true and false; sharding (FSDP: what the largest process holds against the whole; distill.py: student.sharding for the student, sharding for a teacher.shard teacher, each with units)",
    "config": "the full validated config (secrets redacted)",
    "config_path": "the config file the run was started with",
    "error": "one-line message of the fatal error, when status is failed",
    "data": "data summary: sizes, splits, stages; empty_rows and first_empty_row: rows of empty text left out (distill.py: per stage); train_lora.py: truncated_train_prompts / truncated_train_targets (training rows cut to task.max_source_length / max_target_length), max_new_tokens and max_new_tokens_from (the generation length and how it was set or derived from the data)",
    "task": "train_lora.py: the task",
    "env_overrides": "environment variables applied (HP_LR, ...), {VAR: {key, value}}",
}

NAN_FIELDS = "nan_fields"


def json_record(record: dict) -> dict:
    """`record` as a log line holds it: its NaN fields named in `nan_fields` (so null reads as "NaN",
    not "missing"), every non-finite number null (fileio.json_safe)."""
    nan = [k for k, v in record.items() if isinstance(v, float) and math.isnan(v)]
    return json_safe({**record, NAN_FIELDS: nan} if nan else record)


def read_number(record: dict, name: str) -> float | None:
    """A numeric field of a log line: NaN when the line lists it in nan_fields (written as null),
    None when it is missing, null or not a finite number."""
    nan = record.get(NAN_FIELDS)
    if isinstance(nan, list) and name in nan:
        return math.nan
    value = record.get(name)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


# logs/training_log.jsonl
TRAINING_FIELDS = {
    "step": "optimizer step (1-based) this line reports",
    "time": "unix seconds",
    "epoch": "fractional epoch at this step",
    "loss": "mean training loss over the steps since the last logged line",
    "lr": "learning rate used at this step",
    "grad_norm": "global gradient norm before clipping",
    "tokens": "cumulative non-padding tokens seen (all processes)",
    "tokens_per_sec": "non-padding tokens per second over the logged interval (all processes)",
    "step_time": "mean seconds per optimizer step over the logged interval",
    "eta_seconds": "estimated seconds to the end of training",
    "total_steps": "optimizer steps the run will take",
    "memory_allocated_gb": "device memory allocated now (GiB; CPU runs: process RSS)",
    "memory_peak_gb": "peak device memory allocated since start (GiB; CPU runs: peak RSS)",
    "router_aux_loss": "MoE router load-balancing loss (null for dense models)",
}
# logs/training_log.jsonl, distill.py only (besides TRAINING_FIELDS)
DISTILL_TRAINING_FIELDS = {
    "stage": "distill.py: 1 (pre-training text) or 2 (instruction data)",
    "kd_loss": "distill.py: T^2-scaled KL(teacher || student) over the interval",
    "ce_loss": "distill.py: the student's hard-label cross-entropy over the interval",
    "top1_agreement": "distill.py: fraction of tokens where the student's argmax equals the teacher's",
}

# logs/eval_log.jsonl
EVAL_FIELDS = {
    "step": "optimizer step of the evaluation",
    "time": "unix seconds",
    "eval_loss": "mean token-level loss on the validation split",
    "perplexity": "exp(eval_loss)",
    "eval_tokens": "number of target tokens evaluated",
    "eval_seconds": "seconds the evaluation took",
    "metric": "name of the metric used to pick the best checkpoint",
    "metric_value": "its value at this evaluation",
    "is_best": "true when this evaluation is the best so far",
    "nan_fields": "names of the fields whose value was NaN (undefined: MCC when gold has one class, a correlation of constant input; a diverged eval_loss), written as null (JSON has no NaN); absent when none",
}
# logs/eval_log.jsonl, train_lora.py only (besides EVAL_FIELDS)
LORA_EVAL_FIELDS = {
    "task": "train_lora.py: task name (sst2, mnli, samsum, spider, ...)",
    "split": "train_lora.py: validation, or test for the best adapter's final test evaluation",
    "evaluated_step": "train_lora.py, split test: the step whose adapter was evaluated",
    "task_score": "train_lora.py: mean of the task's official metrics (trainkit/tasks/official.py)",
    "<official metric>": "train_lora.py: accuracy, f1, mcc, pearson, spearman, accuracy_matched, accuracy_mismatched, rougeLsum, exact_match, execution_accuracy, bleu (0-100)",
    "<extra metric>": "train_lora.py, reported but not in task_score: rouge1, rouge2, rougeL (SAMSum), sacrebleu, ter (DART; ter lower is better, not on validation lines) (0-100)",
    "signatures": "train_lora.py, DART: sacrebleu's signature strings, {\"sacrebleu\": ..., \"ter\": ...}",
    "<split>_examples": "train_lora.py: examples scored in that split",
    "<metric>_<hardness>": "train_lora.py, spider: exact_match_<level>, execution_accuracy_<level> (undefined, null, for a level without items) and num_examples_<level>, level easy/medium/hard/extra (official hardness of the gold query); num_gold_unparsed",
    "generation_seconds": "train_lora.py: seconds spent generating",
    "truncated_prompts": "train_lora.py: prompts of this evaluation longer than task.max_source_length tokens, cut from the part the task lets go (Spider: the schema's last CREATE TABLE lines; beginning if none), label_likelihood included",
    "predictions": "train_lora.py: run-directory-relative JSONL files of this evaluation's predictions",
}
# logs/eval_log.jsonl, distill.py only (besides EVAL_FIELDS; eval_loss is the student's cross-entropy)
DISTILL_EVAL_FIELDS = {
    "eval_kd_loss": "distill.py: KD loss on the held-out windows",
    "eval_top1_agreement": "distill.py: teacher-student top-1 agreement on the held-out windows",
}

# logs/expert_usage_log.jsonl
EXPERT_FIELDS = {
    "step": "optimizer step of the snapshot",
    "time": "unix seconds",
    "num_experts": "experts per MoE layer",
    "top_k": "experts chosen per token",
    "tokens_routed": "token-expert assignments of the training forwards in the snapshot window (evaluations not counted; a resumed run restores the window's counts from the checkpoint)",
    "mean_load_imbalance": "mean over layers of max/mean tokens per expert",
    "total_dead_experts": "experts that got no token in the window, summed over layers",
    "layers": "list of {layer, tokens_per_expert, load_imbalance, router_entropy, dead_experts}",
}

# logs/error_log.jsonl
ERROR_FIELDS = {
    "step": "optimizer step when the error happened",
    "time": "unix seconds",
    "type": "exception class name, or NonFiniteLoss, or, written by launch_training.sh after the processes ended: RankDied (a training process ended without an exit code of its own: killed by SIGKILL or the OOM killer, or crashed hard) or RunEnded (the processes failed and left run.json saying running)",
    "message": "one-line message",
    "traceback": "full traceback text (null for non-fatal errors and launch_training.sh's lines)",
    "fatal": "true when the run stopped because of it",
    "ranks": "launch_training.sh's lines: the ranks that ended without an exit code",
    "exit_code": "launch_training.sh's lines: the exit code it exited with",
}

# logs/events.jsonl
EVENT_FIELDS = {
    "step": "optimizer step of the event",
    "time": "unix seconds",
    "event": "one of EVENTS",
    "message": "human-readable one-line description",
}
EVENTS = {
    "start": "a fresh run started (total_steps, world_size)",
    "resume": "the run resumed (path: checkpoint it resumed from)",
    "config_changed": "on resume, the config differs from the checkpoint's (changes: {key: [old, new]}, path)",
    "eval": "an evaluation finished (eval_loss, metric, metric_value)",
    "new_best": "a new best checkpoint by the configured metric (metric, metric_value, path)",
    "checkpoint_saved": "a checkpoint was written (path, size_bytes, metric, metric_value)",
    "checkpoint_deleted": "a checkpoint was removed by top-K retention (path)",
    "nan_skip": "a non-finite loss or gradient skipped an optimizer step (consecutive)",
    "preempted": "SIGTERM/SIGINT stopped the run (signal, checkpoint: the checkpoint saved at this step or null, exit_code, grace_seconds)",
    "stop": "the run ended (reason: finished | failed | nan_limit | max_steps | preempted)",
}


# Lines a resume keeps even when their step is after the checkpoint: the records of how an attempt
# ended (fatal errors, stop and preempted events). Non-fatal ones (nan_skip) belong to the dropped
# steps, which the resumed attempt runs, and logs, again.
def kept_on_resume(stream: str, record: dict) -> bool:
    if stream == "errors":
        return record.get("fatal") is True
    return stream == "events" and record.get("event") in ("stop", "preempted")


# ---------------------------------------------------------------- write failures
# errno of a failed write -> the words that start its one-line message
WRITE_FAILURES = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "read-only file system",
    errno.EIO: "I/O error",
}


class RunWriteError(OSError):
    """A file of the run could not be written (disk full, quota, permission, read-only file system).
    Its message is one line naming what was being written and where."""

    def __init__(self, code: int, what: str, path: str | os.PathLike):
        super().__init__(code, os.strerror(code), str(path))
        self.what = what

    def __str__(self) -> str:
        return f"{WRITE_FAILURES.get(self.errno, 'write failed')}: could not write {self.what} ({self.filename}): {self.strerror}"


def _errno_in_chain(exc: BaseException | None) -> int | None:
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in WRITE_FAILURES:
            return exc.errno
        exc = exc.__cause__ or exc.__context__
    return None


def _probe_write(path: Path) -> int | None:
    """errno of a small real write next to `path`, or None when it works. Used when a library lost the
    OSError of a failed write (torch.save reports a full disk as RuntimeError 'iostream error')."""
    directory = path if path.is_dir() else path.parent
    while not directory.is_dir() and directory != directory.parent:
        directory = directory.parent
    probe = directory / f".write-probe-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 65536)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return e.errno if e.errno in WRITE_FAILURES else None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return None


def write_failure(exc: BaseException, what: str, path: str | os.PathLike) -> RunWriteError | None:
    """`exc` raised while writing `what` at `path` as a RunWriteError, or None when it is no write failure."""
    if isinstance(exc, RunWriteError):
        return exc
    if not isinstance(exc, Exception):
        return None  # KeyboardInterrupt, SystemExit: not about the disk
    code = _errno_in_chain(exc)
    if code is None and not isinstance(exc, OSError):
        code = _probe_write(Path(path))
    return None if code is None else RunWriteError(code, what, path)


@contextlib.contextmanager
def writing(what: str, path: str | os.PathLike):
    """Turn a failed write inside the block into one RunWriteError naming `what` and `path`."""
    try:
        yield
    except Exception as exc:
        error = write_failure(exc, what, path)
        if error is None or error is exc:
            raise
        raise error from exc


def release_frames(exc: BaseException) -> None:
    """Clear the local variables of the frames in `exc`'s tracebacks (its text stays printable). A
    library's half-written file may still be open there; this closes it, so deleting it frees the space."""
    import traceback

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__


def _overwrite_in_place(path: Path, obj: Any) -> bool:
    """Last resort for run.json when its temp file cannot be written: rewrite the file in place, compact, when that fits
    in the bytes it already holds (no new blocks needed). True when written."""
    data = json.dumps(json_safe(obj), default=str, separators=(",", ":")).encode()
    try:
        if len(data) > path.stat().st_size:
            return False
        with open(path, "r+b") as f:
            f.write(data)
            f.truncate()
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        return False
    return True


class RunLog:
    """Writes the JSONL streams and run.json of one run. Inert on non-main processes."""

    def __init__(self, run_dir: str | os.PathLike, is_main: bool = True):
        self.run_dir = Path(run_dir)
        self.logs_dir = self.run_dir / LOGS_DIR
        self.is_main = is_main
        if is_main:
            with writing("the logs directory", self.logs_dir):
                self.logs_dir.mkdir(parents=True, exist_ok=True)

    def path(self, stream: str) -> Path:
        return self.logs_dir / STREAMS[stream]

    def write(self, stream: str, record: dict) -> None:
        if not self.is_main:
            return
        record = {"step": record.get("step", 0), "time": record.get("time", time.time()), **record}
        line = json.dumps(json_record(record), default=str, separators=(",", ":")) + "\n"
        # One write() of the whole line on an O_APPEND file: readers never see half a line
        # except while it is being written, and then without its newline.
        path = self.path(stream)
        with writing(f"the {path.name} line of step {record['step']}", path):
            append_line(path, line.encode())

    def event(self, step: int, event: str, message: str = "", **fields: Any) -> None:
        assert event in EVENTS, f"unknown event {event!r}"
        self.write("events", {"step": step, "event": event, "message": message, **fields})

    def error(self, step: int, type_: str, message: str, traceback: str | None = None, fatal: bool = False,
              **fields: Any) -> None:
        self.write("errors", {"step": step, "type": type_, "message": message,
                              "traceback": traceback, "fatal": fatal, **fields})

    def truncate_after(self, step: int) -> None:
        """Drop the lines with step > ``step`` from every stream (after a resume from ``step``), except
        the records of how the earlier attempt ended (kept_on_resume): they describe the past."""
        if not self.is_main:
            return
        for stream in STREAMS:
            path = self.path(stream)
            if not path.exists():
                continue
            kept = [json.dumps(r, separators=(",", ":")) + "\n" for r in iter_jsonl(path)
                    if isinstance(r.get("step"), (int, float)) and (r["step"] <= step or kept_on_resume(stream, r))]
            with writing(f"{path.name} (dropping the lines after step {step})", path):
                write_text_atomic(path, "".join(kept))

    def update_run_info(self, **fields: Any) -> dict:
        if not self.is_main:
            return {}
        path = self.run_dir / RUN_INFO_FILE
        info = read_json(path, default={}) or {}
        info.update(fields)
        info.setdefault("run_name", self.run_dir.name)
        info.setdefault("host", socket.gethostname())
        try:
            with writing(RUN_INFO_FILE, path):
                write_json_atomic(path, info)
        except RunWriteError:
            # A full disk (or a run directory that no longer takes new files) must still be able to
            # say `failed`: run.json is small, rewrite it where it is.
            if not _overwrite_in_place(path, info):
                raise
        return info

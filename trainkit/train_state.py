"""The state a training loop carries from one optimizer step to the next, as one object.

A checkpoint's trainer_state.json holds `TrainState.to_dict()` (plus the checkpoint's own fields,
trainkit.loop.Checkpointer); a resume restores it whole with `load_dict`. The field names are those
of the JSON file, so checkpoints written before these classes existed resume unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass
class Interval:
    """Accumulators of the current logging interval (kept in checkpoints, so that a resumed run
    logs the same lines). `sums` holds per-step means summed over the finite steps: the loss and
    the script's own values (router aux loss, KD statistics)."""

    names: tuple[str, ...] = ()
    steps: int = 0          # finite optimizer steps
    all_steps: int = 0      # every optimizer step, skipped ones included (for step time and ETA)
    tokens: int = 0
    seconds: float = 0.0
    sums: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        for name in ("loss", *self.names):
            self.sums.setdefault(name, 0.0)

    def add(self, finite: bool, tokens: int, seconds: float, **values: float) -> None:
        self.all_steps += 1
        self.tokens += tokens
        self.seconds += seconds
        if finite:
            self.steps += 1
            for name, value in values.items():
                self.sums[name] = self.sums.get(name, 0.0) + value

    def means(self) -> dict[str, float | None]:
        """Mean of each summed value over the finite steps (None when there were none)."""
        return {k: (v / self.steps if self.steps else None) for k, v in self.sums.items()}

    def reset(self) -> None:
        self.steps, self.all_steps, self.tokens, self.seconds = 0, 0, 0, 0.0
        self.sums = {name: 0.0 for name in ("loss", *self.names)}

    def to_dict(self) -> dict:
        return {"steps": self.steps, "all_steps": self.all_steps, "tokens": self.tokens, "seconds": self.seconds,
                "sums": dict(self.sums)}


@dataclass
class TrainState:
    """What every script's loop carries: progress, the evaluation metric and the best so far."""

    step: int = 0                       # optimizer steps done
    tokens_seen: int = 0
    nonfinite_streak: int = 0           # consecutive optimizer steps skipped for NaN/inf
    best_metric: float | None = None
    best_step: int | None = None
    metric_value: float | None = None   # the latest evaluation's metric (ranks the checkpoint saved next)
    metric_step: int | None = None
    interval: Interval = field(default_factory=Interval)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["interval"] = self.interval.to_dict()
        return out

    def load_dict(self, saved: dict) -> None:
        """Restore from a checkpoint's trainer_state.json; fields it lacks keep their values."""
        for f in fields(self):
            if f.name not in saved:
                continue
            if f.name == "interval":
                self.interval = Interval(self.interval.names, **saved["interval"])
            else:
                setattr(self, f.name, saved[f.name])


@dataclass
class EpochTrainState(TrainState):
    """A loop over a map-style DataLoader (train_qlora.py, train_lora.py): its position in the data."""

    epoch: int = 0
    batches_in_epoch: int = 0           # micro batches of this epoch already consumed
    router_counts: list | None = None   # MoE: router counts since the last expert snapshot (train_qlora.py)

    def next_epoch(self) -> None:
        self.epoch += 1
        self.batches_in_epoch = 0


@dataclass
class StageTrainState(TrainState):
    """distill.py's loop over stages of streamed text windows."""

    stage: int = 0                      # index into the stages
    stage_step: int = 0                 # optimizer steps done in this stage
    data_state: dict | None = None      # the window stream's cursor (trainkit.text_windows)

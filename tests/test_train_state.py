"""TrainState: saved and restored as one object, in the trainer_state.json format checkpoints already use."""

import json

from trainkit.train_state import EpochTrainState, Interval, StageTrainState

# trainer_state.json fields as train_qlora.py wrote them before TrainState existed (a MoE run, step 8)
OLD_QLORA_STATE = {"step": 8, "epoch": 1, "batches_in_epoch": 3, "tokens_seen": 4096, "best_metric": 2.5,
                   "best_step": 4, "metric_value": 2.7, "metric_step": 8, "nonfinite_streak": 0,
                   "interval": {"steps": 1, "all_steps": 2, "tokens": 512, "seconds": 0.25,
                                "sums": {"loss": 2.9, "aux": 0.01}},
                   "router_counts": [[1, 2], [3, 4]],
                   "time": 1764500000.0, "metric_name": "eval_loss", "attempt": "a1", "lineage": ["a1"], "config": {}}
OLD_DISTILL_STATE = {"step": 6, "stage": 1, "stage_step": 2, "data_state": {"cursor": [0, 17]}, "tokens_seen": 960,
                     "best_metric": None, "best_step": None, "metric_value": None, "metric_step": None,
                     "nonfinite_streak": 1, "interval": {"steps": 0, "all_steps": 1, "tokens": 160, "seconds": 0.1,
                                                         "sums": {"loss": 0.0, "kd_loss": 0.0, "ce_loss": 0.0,
                                                                  "top1_agreement": 0.0}}}


def test_an_old_checkpoint_restores_whole_and_saves_the_same_fields():
    state = EpochTrainState(interval=Interval(("aux",)))
    state.load_dict(json.loads(json.dumps(OLD_QLORA_STATE)))
    assert (state.step, state.epoch, state.batches_in_epoch, state.best_metric) == (8, 1, 3, 2.5)
    assert state.router_counts == [[1, 2], [3, 4]] and state.interval.means() == {"loss": 2.9, "aux": 0.01}
    saved = state.to_dict()
    checkpoint_fields = {"time", "metric_name", "attempt", "lineage", "config"}  # Checkpointer's own
    assert saved == {k: v for k, v in OLD_QLORA_STATE.items() if k not in checkpoint_fields}

    stage_state = StageTrainState(interval=Interval(("kd_loss", "ce_loss", "top1_agreement")))
    stage_state.load_dict(OLD_DISTILL_STATE)
    assert stage_state.to_dict() == OLD_DISTILL_STATE


def test_interval_sums_only_finite_steps_and_restarts_with_its_names():
    interval = Interval(("aux",))
    interval.add(True, tokens=100, seconds=0.5, loss=2.0, aux=0.2)
    interval.add(False, tokens=100, seconds=0.5, loss=float("nan"), aux=float("nan"))
    interval.add(True, tokens=100, seconds=0.5, loss=4.0, aux=0.4)
    assert (interval.steps, interval.all_steps, interval.tokens) == (2, 3, 300)
    assert interval.means() == {"loss": 3.0, "aux": 0.30000000000000004}
    interval.reset()
    assert interval.to_dict() == {"steps": 0, "all_steps": 0, "tokens": 0, "seconds": 0.0, "sums": {"loss": 0.0, "aux": 0.0}}
    assert Interval().means() == {"loss": None}

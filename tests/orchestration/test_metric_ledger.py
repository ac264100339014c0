"""Exactly-once metrics: the ledger that commits metrics only with a checkpoint covering them.

Failure points are replayed the way the Ray Train layer meets them (worker-side buffer lost at a kill,
re-run steps after a restore, a checkpoint written but never registered, a commit repeated after a driver
crash); the last test commits into a real MLflow server.
"""
from __future__ import annotations

import json

import pytest

from updetr import tracking as T
from updetr.metric_ledger import TAG_COMMITTED, MarkerUnavailable, MetricLedger, commit, read_ledger, write_ledger


class RecordingTracker(T.Tracker):
    """A tracker that keeps what it was given (as MLflow would: metric history entries and tags)."""

    def __init__(self):
        self.history: list[tuple[int, str, float]] = []
        self.tags: dict[str, str] = {}

    def log_metrics(self, metrics, step, timestamp_ms=None):
        self.history += [(step, k, float(v)) for k, v in metrics.items()]

    def set_tags(self, tags):
        self.tags.update({k: str(v) for k, v in tags.items()})

    def get_tag(self, key):
        return self.tags.get(key)

    def steps(self, key: str) -> list[int]:
        return [s for s, k, _ in self.history if k == key]

    def values(self, key: str) -> dict[int, float]:
        return {s: v for s, k, v in self.history if k == key}


def train(ledger: MetricLedger, steps: range, epoch_of, offset: float = 0.0) -> None:
    for s in steps:
        ledger.add((s, epoch_of(s)), {"loss": s + offset, "not_a_number": "x"})


def test_worker_killed_after_a_registered_checkpoint_logs_each_step_once(tmp_path):
    tracker = RecordingTracker()
    ledger = MetricLedger()
    train(ledger, range(1, 5), lambda s: 0)
    (tmp_path / "ck4").mkdir()
    write_ledger(tmp_path / "ck4", ledger.take(upto=(4, 0)))     # checkpoint 4 written ...
    assert commit(read_ledger(tmp_path / "ck4"), tracker) == 4    # ... registered -> committed
    train(ledger, range(5, 7), lambda s: 0)                        # steps 5-6, then the worker dies
    ledger = MetricLedger()                                        # the new worker starts empty from ck4
    assert commit(read_ledger(tmp_path / "ck4"), tracker) == 0    # catch-up after the restore: nothing new
    train(ledger, range(5, 9), lambda s: 0, offset=0.5)            # steps 5-8 re-run
    assert commit(ledger.take(upto=(8, 0)), tracker) == 4
    assert tracker.steps("loss") == list(range(1, 9))
    assert tracker.values("loss")[6] == 6.5                        # the run the checkpoints continue
    assert tracker.steps("not_a_number") == [] and tracker.tags[TAG_COMMITTED] == "8,0"


def test_checkpoint_written_but_never_registered_commits_nothing_of_its_own():
    tracker = RecordingTracker()
    ledger = MetricLedger()
    train(ledger, range(1, 5), lambda s: 0)
    commit(ledger.take(upto=(4, 0)), tracker)
    train(ledger, range(5, 9), lambda s: 0)
    lost = ledger.take(upto=(8, 0))   # written to storage, the worker dies before the controller registers it
    del lost                          # never committed (only registered checkpoints are)
    ledger = MetricLedger()           # restore from ck4
    train(ledger, range(5, 13), lambda s: 0, offset=0.25)
    commit(ledger.take(upto=(12, 0)), tracker)
    assert tracker.steps("loss") == list(range(1, 13))
    assert all(tracker.values("loss")[s] == s + 0.25 for s in range(5, 13))


def test_epoch_summaries_commit_with_the_checkpoint_after_the_epoch_end():
    tracker = RecordingTracker()
    ledger = MetricLedger()
    train(ledger, range(1, 5), lambda s: 0)
    ledger.add((4, 1), {"epoch/loss": 1.0}, step=0)    # epoch 0 ends after step 4 ...
    commit(ledger.take(upto=(4, 0)), tracker)            # ... a checkpoint at step 4 mid-epoch state misses it
    assert tracker.steps("epoch/loss") == []
    commit(ledger.take(upto=(4, 1)), tracker)            # the end-of-run checkpoint (same step, next epoch)
    commit({"upto": [4, 1], "entries": [{"pos": [4, 1], "step": 0, "metrics": {"epoch/loss": 9.0}}]}, tracker)
    assert tracker.steps("epoch/loss") == [0] and tracker.values("epoch/loss")[0] == 1.0


def test_state_dict_round_trip_and_unreadable_tracker_commits_nothing():
    ledger = MetricLedger()
    train(ledger, range(1, 4), lambda s: 0)
    other = MetricLedger()
    other.load_state_dict(ledger.state_dict())
    assert len(other) == 3 and other.take(upto=(2, 0))["entries"] == ledger.take(upto=(2, 0))["entries"]

    class Down(RecordingTracker):
        def get_tag(self, key):
            raise MarkerUnavailable("down")

    down = Down()
    assert commit(ledger.take(upto=(3, 0)), down) == 0 and down.history == []
    with pytest.raises(ValueError):
        commit(ledger.state_dict(), RecordingTracker())  # only a checkpoint's part can be committed


def test_commit_into_mlflow_twice_logs_once(mlflow_server):
    t = T.start_tracking(True, mlflow_server.uri, "t-ledger", "r1", "/store/ledger", {}, "")
    ledger = MetricLedger()
    train(ledger, range(1, 7), lambda s: 0)
    state = ledger.take(upto=(6, 0))
    assert commit(state, t) == 6
    again = T.MlflowTracker.attach(mlflow_server.uri, t.run_id)  # e.g. the restarted worker's tracker
    assert commit(state, again) == 0
    history = mlflow_server.client().get_metric_history(t.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 7))


def test_a_commit_cut_off_before_its_marker_logs_each_step_once_when_repeated(mlflow_server):
    """A kill between logging a checkpoint's metrics and moving the marker: the resumed run commits the same
    ledger again; its rows carry the recorded timestamps, so MLflow keeps one row per step."""
    t = T.start_tracking(True, mlflow_server.uri, "t-ledger", "r2", "/store/ledger2", {}, "")
    ledger = MetricLedger()
    train(ledger, range(1, 5), lambda s: 0)
    state = json.loads(json.dumps(ledger.take(upto=(4, 0))))  # as read back from the checkpoint folder

    class CutBeforeMarker:  # the process dies after log_metrics, before set_tags
        def log_metrics(self, metrics, step, timestamp_ms=None):
            t.log_metrics(metrics, step, timestamp_ms)

        def set_tags(self, tags):
            raise KeyboardInterrupt("killed")

        def get_tag(self, key):
            return t.get_tag(key)

    with pytest.raises(KeyboardInterrupt):
        commit(state, CutBeforeMarker())
    again = T.MlflowTracker.attach(mlflow_server.uri, t.run_id)
    assert commit(state, again) == 4
    history = mlflow_server.client().get_metric_history(t.run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]

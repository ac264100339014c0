"""Exactly-once metrics: buffer per-step / per-epoch metrics, commit them only with a checkpoint that covers them.

Why: after a worker restart (or a re-run of a crashed driver) training resumes from the last registered
checkpoint and re-runs the steps after it. Metrics logged as they happen would then appear twice in the
tracker. Instead the process that owns tracking (Ray Train rank 0, or any single-process driver):

  1. `ledger.add(position, metrics)` for every logged step / epoch (the terminal view stays live);
  2. at a checkpoint, `ledger.take(upto=position)` and stores that state *inside the checkpoint*
     (`write_ledger(folder, state)`: a small JSON file next to `checkpoint.pt`);
  3. once the checkpoint is registered (Ray Train: the controller's `after_report`; a local driver: right
     after the atomic save), `commit(state, tracker)` logs the entries to the tracker and then advances a
     committed-position marker (the run tag `updetr.metrics_committed`);
  4. committing again (a restarted worker catching up after a driver crash, a repeated callback) skips every
     entry at or before the marker, so it is idempotent;
  5. every entry carries the wall-clock time it was recorded at, and is logged with it: a commit cut off between
     logging and moving the marker (a kill in that instant) repeats byte-identical metric rows on the next
     commit, and MLflow's store keeps identical rows once.

Steps re-run after a restore are added again, and commit only when a later checkpoint covers them, by which
time the marker has moved past the old ones: each step lands in the tracker once, with the value of the run
that the checkpoints continue. Guarantee: exactly once across worker and driver failures, including a kill
between logging a batch and moving the marker (step 5). While the tracker cannot read the marker (server
away, or earlier writes still kept), the commit itself is kept by the tracker (`keep_commit`) and runs,
marker check included, when the server answers: store and forward, updetr/tracking_spool.py.

Position = `(step, epoch)` of the `TrainState` after the event, ordered lexicographically: a step at
`(s, e)`; the end of epoch e after step s at `(s, e + 1)`; a checkpoint covers every position <= its state.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Protocol

TAG_COMMITTED = "updetr.metrics_committed"   # "step,epoch" of the last committed position
LEDGER_FILE = "metrics.json"                 # inside each checkpoint folder
FORMAT = "updetr-metric-ledger"

Position = tuple[int, int]


class MarkerUnavailable(RuntimeError):
    """The tracker cannot tell what was committed (server down): committing now could log twice."""


class CommitTarget(Protocol):
    """What `commit` needs from a tracker (updetr.tracking.Tracker implements it)."""

    def log_metrics(self, metrics: Mapping[str, Any], step: int, timestamp_ms: Optional[int] = None) -> None: ...
    def set_tags(self, tags: Mapping[str, Any]) -> None: ...
    def get_tag(self, key: str) -> Optional[str]:
        """The run's tag value (None: not set); raises MarkerUnavailable when the run cannot be read."""


def _pos(value: Any) -> Position:
    step, epoch = value
    return int(step), int(epoch)


def parse_marker(text: Optional[str]) -> Optional[Position]:
    """`"12,1"` -> (12, 1); None / malformed -> None (nothing committed yet)."""
    if not text:
        return None
    try:
        step, epoch = str(text).split(",")
        return int(step), int(epoch)
    except ValueError:
        return None


def format_marker(pos: Position) -> str:
    return f"{pos[0]},{pos[1]}"


class MetricLedger:
    """Metrics waiting for a checkpoint. Entries: position, tracker step, {name: float}."""

    def __init__(self) -> None:
        self._entries: list[dict] = []

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, position: Position, metrics: Mapping[str, Any], step: Optional[int] = None,
            timestamp_ms: Optional[int] = None) -> None:
        """Buffer `metrics` (non-numeric values dropped) recorded at `position`.

        Args:
            position: `(state.step, state.epoch)` after the event.
            metrics: name -> number.
            step: the tracker's x axis for these metrics (default: the global step); epoch summaries
                use the epoch index.
            timestamp_ms: when it was recorded (default: now); logged with it, so a repeated commit writes
                identical rows.
        """
        pos = _pos(position)
        clean: dict[str, float] = {}
        for k, v in metrics.items():
            try:
                clean[str(k)] = float(v)
            except (TypeError, ValueError):
                continue
        self._entries.append({"pos": list(pos), "step": int(pos[0] if step is None else step),
                              "metrics": clean,
                              "ts": int(time.time() * 1000) if timestamp_ms is None else int(timestamp_ms)})

    def take(self, upto: Position) -> dict:
        """Remove and return (as a state dict) the entries at or before `upto`: what a checkpoint covers."""
        upto = _pos(upto)
        covered = [e for e in self._entries if _pos(e["pos"]) <= upto]
        self._entries = [e for e in self._entries if _pos(e["pos"]) > upto]
        return {"format": FORMAT, "version": 1, "upto": list(upto), "entries": covered}

    def state_dict(self) -> dict:
        """Everything still buffered (JSON- and `weights_only`-safe)."""
        return {"format": FORMAT, "version": 1, "upto": None, "entries": [dict(e) for e in self._entries]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._entries = [dict(e) for e in state.get("entries", [])]


def plan_commit(state: Mapping[str, Any], marker: Optional[Position]
                ) -> Optional[tuple[Position, list[tuple[int, dict[str, float], Optional[int]]], int]]:
    """What committing `state` after `marker` logs: (new marker, [(step, metrics, timestamp_ms)] by step,
    number of ledger entries), or None when the marker already covers it."""
    upto = state.get("upto")
    if upto is None:
        raise ValueError("commit needs a ledger state from MetricLedger.take(upto=...)")
    upto = _pos(upto)
    if marker is not None and upto <= marker:
        return None
    fresh = [e for e in state.get("entries", []) if marker is None or _pos(e["pos"]) > marker]
    by_step: dict[int, dict[str, float]] = {}
    stamp: dict[int, Optional[int]] = {}
    for e in fresh:  # one tracker call per x-axis step; later entries win within a step
        by_step.setdefault(int(e["step"]), {}).update(e["metrics"])
        stamp.setdefault(int(e["step"]), e.get("ts"))    # ledgers written before timestamps: None (now)
    return upto, [(step, by_step[step], stamp[step]) for step in sorted(by_step)], len(fresh)


def commit(state: Mapping[str, Any], tracker: CommitTarget) -> int:
    """Log the entries of `state` (from `MetricLedger.take`) after the tracker's marker; move the marker.

    Returns the number of entries logged (0 when all were committed before: idempotent). When the marker
    cannot be read, a tracker with `keep_commit` keeps the whole commit for later (0 now); one without
    it drops it.
    """
    if state.get("upto") is None:
        raise ValueError("commit needs a ledger state from MetricLedger.take(upto=...)")
    try:
        marker = parse_marker(tracker.get_tag(TAG_COMMITTED))
    except MarkerUnavailable:
        keep = getattr(tracker, "keep_commit", None)
        if keep is not None:
            keep(state)
        return 0
    plan = plan_commit(state, marker)
    if plan is None:
        return 0
    upto, rows, n = plan
    for step, metrics, ts in rows:
        tracker.log_metrics(metrics, step=step, timestamp_ms=ts)
    tracker.set_tags({TAG_COMMITTED: format_marker(upto)})
    return n


def write_ledger(folder: str | os.PathLike, state: Mapping[str, Any]) -> Path:
    """Store a ledger state in a checkpoint folder (before the folder is handed to storage)."""
    path = Path(folder) / LEDGER_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state))
    tmp.replace(path)
    return path


def read_ledger(folder: str | os.PathLike) -> Optional[dict]:
    """The ledger state stored in a checkpoint folder, or None (older checkpoints have none)."""
    path = Path(folder) / LEDGER_FILE
    if not path.is_file():
        return None
    state = json.loads(path.read_text())
    if state.get("format") != FORMAT:
        raise ValueError(f"{path}: not an updetr metric ledger")
    return state

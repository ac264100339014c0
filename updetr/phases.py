"""Timestamps of where a run's time goes (start-up, Ray, workers, first report, shutdown), on request.

With `UPDETR_PHASE_LOG=/abs/file` set, `mark(name)` appends one JSON line — phase, wall clock, this
process' CPU seconds, pid — to that file; without it, `mark` is a dictionary lookup and nothing else.
The variable reaches Ray Train workers like every `UPDETR_*` variable (launch.WORKER_ENV_PREFIXES), so the
driver and the workers write to the same file; `benchmarks/bench_stage_overhead.py` reads it back.
Appends of one short line each are atomic on a local file system, so processes do not interleave lines.
"""
from __future__ import annotations

import json
import os
import time

ENV = "UPDETR_PHASE_LOG"


def mark(name: str) -> None:
    path = os.environ.get(ENV)
    if not path:
        return
    line = json.dumps({"phase": name, "t": time.time(), "cpu": time.process_time(), "pid": os.getpid()})
    try:
        with open(path, "a") as fh:
            fh.write(line + "\n")
    except OSError:  # a measurement aid must never fail a run
        pass


def read(path: str) -> list[dict]:
    """The marks of a log, in time order (lines a crashed writer left half-written are skipped)."""
    marks = []
    try:
        with open(path) as fh:
            for line in fh:
                try:
                    marks.append(json.loads(line))
                except ValueError:
                    continue
    except OSError:
        return []
    return sorted(marks, key=lambda m: m["t"])

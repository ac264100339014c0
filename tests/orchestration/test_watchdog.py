"""StallWatchdog without Ray: waiting time (not step time) is what counts; warn once, then fail."""
from __future__ import annotations

import time

import pytest

from updetr.orchestration.watchdog import StallError, StallWatchdog, _progress_blocks


def slow_items(delays):
    for i, d in enumerate(delays):
        time.sleep(d)
        yield i


def test_steady_pipeline_with_slow_consumer_is_not_a_stall():
    warned = []
    dog = StallWatchdog(slow_items([0.0] * 5), warn_s=0.3, fail_s=0.6, on_warn=warned.append, poll_s=0.05)
    out = []
    for item in dog:
        time.sleep(0.4)  # a long training step: the consumer is busy, not waiting
        out.append(item)
    assert out == [0, 1, 2, 3, 4] and not warned


def test_stall_warns_once_with_report_then_fails():
    warned = []
    dog = StallWatchdog(slow_items([0.0, 5.0]), warn_s=0.3, fail_s=1.0, describe=lambda: "ReadX waits on CPU",
                        on_warn=warned.append, poll_s=0.05)
    it = iter(dog)
    assert next(it) == 0
    t0 = time.monotonic()
    with pytest.raises(StallError) as e:
        next(it)
    assert 0.9 < time.monotonic() - t0 < 3
    assert len(warned) == 1 and "no batch for" in warned[0] and "ReadX waits on CPU" in warned[0]
    assert "batch 2" in str(e.value) and "ReadX waits on CPU" in str(e.value)


def test_errors_pass_through_and_disabled_watchdog_is_transparent():
    def broken():
        yield 1
        raise ValueError("bad shard")

    with pytest.raises(ValueError, match="bad shard"):
        list(StallWatchdog(broken(), warn_s=1, fail_s=2, poll_s=0.05))
    assert list(StallWatchdog(iter([1, 2]), warn_s=0, fail_s=0)) == [1, 2]


def test_progress_dump_parsing():
    log = "\n".join([
        "2026-11-25 10:00:00,000\tDEBUG streaming_executor.py:752 -- Execution Progress:",
        "2026-11-25 10:00:00,001\tDEBUG streaming_executor.py:755 -- 0: ReadBinary - Tasks: 0 "
        "[backpressured:tasks(ResourceBudget)]; Actors: 0; Queued blocks: 0 (0.0B); Resources: 0.0 CPU, 0.0B "
        "object store: budget=(cpu=0.0,gpu=0.0), Blocks Outputted: 0/None",
        "2026-11-25 10:00:00,002\tDEBUG streaming_executor.py:755 -- 1: MapBatches(PretrainPreprocessor) - "
        "Tasks: 0; Actors: 1; Queued blocks: 0 (0.0B); Resources: 1.0 CPU, Blocks Outputted: 0/None",
        "2026-11-25 10:00:00,003\tDEBUG streaming_executor.py:771 -- Operator Metrics:",
    ])
    blocks = _progress_blocks(log)
    assert len(blocks) == 1 and blocks[0][0].startswith("ReadBinary: Tasks: 0 [backpressured:tasks(ResourceBudget)]")
    assert blocks[0][1].startswith("MapBatches(PretrainPreprocessor): Tasks: 0")

"""StallWatchdog without Ray: waiting time (not step time) is what counts; warn once, then fail."""
from __future__ import annotations

import time

import pytest

from updetr.orchestration.watchdog import StallError, StallWatchdog, last_progress_report


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


# Lines as Ray Data 2.60 writes them to logs/ray-data/ray-data*.log (from the hang of issue 12).
DUMP = """\
2026-11-25 16:56:38,261\tDEBUG streaming_executor.py:752 -- Execution Progress:
2026-11-25 16:56:38,261\tDEBUG streaming_executor.py:755 -- 0: Input - Tasks: 0; Actors: 0; Queued blocks: 0 (0.0B); Resources: 0.0 CPU, 0.0B object store (in=0.0B,out=0.0B), Blocks Outputted: 4/4
2026-11-25 16:56:38,261\tDEBUG streaming_executor.py:755 -- 1: ReadBinary - Tasks: 0 [backpressured:tasks(ResourceBudget)]; Actors: 0; Queued blocks: 3 (0.0B); Resources: 0.0 CPU, 0.0B object store (in=0.0B,out=0.0B), alloc=(cpu=0.0,mem=0.0B,gpu=0.0,obj_store=0.0B), budget=(cpu=0.0,mem=0.0B,gpu=0.0,obj_store=0.0B,out=1.0B), Blocks Outputted: 0/None
2026-11-25 16:56:38,261\tDEBUG streaming_executor.py:755 -- 2: MapBatches(PretrainPreprocessor) - Tasks: 0; Actors: 1 (running=1, restarting=0, pending=0, active=0, idle=1, util=0.000, tasks_in_flight=0); Queued blocks: 0 (0.0B); Resources: 1.0 CPU, 0.0B object store (in=0.0B,out=0.0B), alloc=(cpu=1.0,mem=0.0B,gpu=0.0,obj_store=0.0B), budget=(cpu=0.0,mem=0.0B,gpu=0.0,obj_store=0.0B,out=1.0B); [all objects local], Blocks Outputted: 0/None
2026-11-25 16:56:38,262\tDEBUG streaming_executor.py:771 -- Operator Metrics:
"""


def test_progress_dump_names_the_waiting_operator_and_its_budget(tmp_path):
    (tmp_path / "ray-data").mkdir()
    (tmp_path / "ray-data" / "ray-data.log").write_text(DUMP)
    ops = last_progress_report(str(tmp_path))
    assert len(ops) == 2  # the finished Input operator is left out
    assert ops[0] == ("ReadBinary: tasks 0 [backpressured:tasks(ResourceBudget)], queued blocks: 3, "
                      "using 0.0 CPU, budget cpu=0.0 gpu=0.0")
    assert ops[1].startswith("MapBatches(PretrainPreprocessor): tasks 0, actors 1 (running 1, pending 0), using 1.0 CPU")

"""The `updetr run` terminal filter (no Ray): routine Ray lines dropped, ours unprefixed, tracebacks of a
failed training function replaced by the driver's one line, everything else passed through."""
from __future__ import annotations

from updetr.orchestration.console import _filtered


def feed(lines, is_err=False):
    passed = []
    _filtered(passed.append, ["[smoke] "], {"lines": lines, "is_err": is_err, "pid": 1, "ip": "x"})
    return [ln for d in passed for ln in d["lines"]]


def test_routine_lines_dropped_own_lines_printed_plain(capsys):
    rest = feed(["Reporting training result 1: TrainingReport(checkpoint=None, ...)",
                 "Checkpoint successfully created at: Checkpoint(filesystem=local, path=/x)",
                 "[smoke] step 5/18 ep 0 | loss 13.4",
                 "something Ray wants you to see"])
    assert rest == ["something Ray wants you to see"]
    assert capsys.readouterr().out == "[smoke] step 5/18 ep 0 | loss 13.4\n"


def test_failure_tracebacks_dropped_but_retry_decision_kept():
    rest = feed(["[FailurePolicy] RETRY", "  Source: worker group", "  Error count: 1 (max allowed: 2)",
                 "Traceback (most recent call last):", '  File "w.py", line 1, in f', "StallError: stalled"],
                is_err=True)
    assert rest == ["[FailurePolicy] RETRY", "  Error count: 1 (max allowed: 2)"]
    assert feed(["[FailurePolicy] RAISE", "  Error count: 1 (max allowed: 0)", "Traceback (most recent call last):"],
                is_err=True) == []  # the final failure is the driver's one line
    assert feed(["a warning that is not a failure"], is_err=True) == ["a warning that is not a failure"]


def test_indented_lines_after_ours_are_ours(capsys):
    rest = feed(["[smoke] eval after epoch 5: 16 images", "      AP   AP50", "    0.91   2.29",
                 "Ray says", "  not ours: after a foreign line"])
    assert rest == ["Ray says", "  not ours: after a foreign line"]
    assert capsys.readouterr().out == "[smoke] eval after epoch 5: 16 images\n      AP   AP50\n    0.91   2.29\n"


def test_with_a_log_file_nothing_of_ray_reaches_the_terminal(tmp_path, capsys):
    from updetr.orchestration.console import RayLog, _Seen

    log, seen, passed = RayLog(tmp_path / "ray.log"), _Seen(), []
    worker = {"pid": 42, "actor_name": "RayTrainWorker", "ip": "10.0.0.1", "localhost": "10.0.0.1", "is_err": True}
    _filtered(passed.append, ["[smoke] "], dict(worker, lines=[
        "[smoke] step 1/4 ep 0 | loss 15.4",
        "INFO local_loader.py:123 -- data: epoch 0 (rank 0): no bad items",
        "\x1b[33mWARNING\x1b[0m something Ray wants you to see [repeated 3x across cluster]"]), log=log, seen=seen)
    _filtered(passed.append, ["[smoke] "], {"pid": "raylet", "ip": "10.0.0.1", "is_err": True, "lines": [
        "WARNING: 8 PYTHON worker processes have been started on node: abc"]}, log=log, seen=seen)
    # the same data line again (another rank's copy, a retried batch): printed once
    _filtered(passed.append, ["[smoke] "], dict(worker, pid=43, lines=[
        "INFO local_loader.py:123 -- data: epoch 0 (rank 0): no bad items"]), log=log, seen=seen)
    assert passed == []
    err = capsys.readouterr().err
    assert err == "[smoke] step 1/4 ep 0 | loss 15.4\ndata: epoch 0 (rank 0): no bad items\n"
    text = (tmp_path / "ray.log").read_text()
    assert "(RayTrainWorker pid=42) WARNING something Ray wants you to see" in text    # Ray's prefix, no ANSI
    assert "(raylet) WARNING: 8 PYTHON worker processes" in text
    assert "\x1b" not in text and text.count("no bad items") == 2                        # the log keeps all


def test_restart_decision_is_printed_without_the_prefix(tmp_path, capsys):
    from updetr.orchestration.console import RayLog

    passed = []
    _filtered(passed.append, ["[smoke] "], {"pid": 7, "actor_name": "TrainController", "is_err": True, "lines": [
        "[FailurePolicy] RETRY", "  Error count: 1 (max allowed: 2)", "Traceback (most recent call last):",
        "StallError: stalled"]}, log=RayLog(tmp_path / "r.log"))
    assert passed == [] and capsys.readouterr().err == "[FailurePolicy] RETRY\n  Error count: 1 (max allowed: 2)\n"
    assert "(TrainController pid=7) Traceback" in (tmp_path / "r.log").read_text()


def test_tune_fetch_warning_is_counted_not_printed():
    import logging

    from updetr.orchestration.console import FetchWarnings

    f = FetchWarnings()
    logger = logging.getLogger("test.fetch")
    logger.addFilter(f)
    try:
        rec = logger.makeRecord("test.fetch", logging.WARNING, "x.py", 1,
                                "Failed to fetch metrics for 2 trial(s):\n- _trial_1_00000: FileNotFoundError()\n"
                                "- _trial_1_00001: FileNotFoundError()", (), None)
        assert f.filter(rec) is False and f.trials == ["_trial_1_00000", "_trial_1_00001"]
        other = logger.makeRecord("test.fetch", logging.WARNING, "x.py", 1, "something else", (), None)
        assert f.filter(other) is True
    finally:
        logger.removeFilter(f)


def test_raylet_warnings_from_the_error_listener_go_to_the_log(tmp_path, capsys, monkeypatch):
    import ray._private.worker as ray_worker

    from updetr.orchestration.console import RayLog, _route_error_listener

    printed = []
    monkeypatch.setattr(ray_worker, "print_to_stdstream", lambda data, ignore_prefix=False: printed.append(data))
    _route_error_listener(("[x] ",), RayLog(tmp_path / "r.log"))
    # what ray._private.worker.listen_error_messages calls, by name
    ray_worker.print_to_stdstream({"lines": ["WARNING: 8 PYTHON worker processes have been started on node: n"],
                                   "pid": "raylet", "is_err": False}, ignore_prefix=False)
    assert printed == [] and capsys.readouterr().out == ""
    assert "(raylet) WARNING: 8 PYTHON worker" in (tmp_path / "r.log").read_text()

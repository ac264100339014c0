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

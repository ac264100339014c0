"""Keep the `updetr run` terminal readable: Ray's own chatter must not bury the progress lines.

Ray forwards every worker's stdout/stderr to the driver (`log_to_driver`), prefixed with
`(ActorName pid=N)`. Most of it is routine (Train's "Reporting training result", worker-group
placement, Ray Data's per-pass "execution finished", deprecation warnings, the C++ note about actor
constructor arguments). `install()` swaps Ray's printer for one that drops those lines and prints
updetr's own lines (`[<experiment>] ...`) without the Ray prefix; everything else — errors, retries,
warnings — passes through unchanged, except Ray's tracebacks of a failed training function, which
`updetr run` replaces with its one `training failed: <reason>` line (they stay in Ray's session logs). `UPDETR_RAY_LOGS=all` turns the filter off.

This hooks Ray's driver-side log dispatcher (`ray._private.ray_logging.global_worker_stdstream_dispatcher`,
an internal API, checked in the test of `updetr run`); if the hook is absent nothing is filtered.
"""
from __future__ import annotations

import functools
import os
import re
import sys
from typing import Sequence

# Lines that are routine on every run (matched anywhere in the line).
NOISE = tuple(re.compile(p) for p in (
    r"Reporting training result \d+",
    r"Checkpoint successfully created at",
    r"Requesting resources: \{",
    r"Attempting to start training worker group",
    r"Started training worker group of size",
    r"^- \(ip=[^)]*\) world_rank=",
    r"Setting up process group for",
    r"has constructor arguments in the object store and max_restarts > 0",
    r"Deprecation ?Warning",
    r"^\s+self\.\w+ = \w+$",              # the source line Python prints under a warning
    r"^\s*warnings\.warn\(",
    r"Progress bars disabled",
    r"execution finished in [\d.]+ seconds",
    r"Registered dataset logger for dataset",
    r"Starting execution of Dataset",
    r"Execution plan of Dataset",
    r"Ray deduplicates logs by default",
    r"Tip: Use `take_batch\(\)`",
    r"PYTHON worker processes have been started on node",   # expected: a sweep's trial drivers take 0.01 CPU
))


# Ray's own reports of a training failure (the worker's traceback, repeated by the controller). The driver
# ends with one `updetr: error: training failed: <reason>` line; the tracebacks stay in Ray's session logs.
FAILURE_REPORT = tuple(re.compile(p) for p in (
    r"Traceback \(most recent call last\)",
    r"Error in training function",
    r"Training failed due to worker errors",
    r"\[Rank \d+ Error Snippet\]",
))


def is_noise(line: str) -> bool:
    return any(p.search(line) for p in NOISE)


def is_failure_report(lines: Sequence[str]) -> bool:
    return any(p.search(ln) for ln in lines for p in FAILURE_REPORT)


def _filtered(original, own_prefixes: Sequence[str], data: dict) -> None:
    lines = [ln for ln in data.get("lines", []) if not is_noise(ln)]
    if data.get("is_err") and is_failure_report(lines):
        # keep a retry decision ("[FailurePolicy] RETRY" + its error count), drop the tracebacks; a final
        # failure (RAISE) is the driver's own one line
        retry = any("[FailurePolicy] RETRY" in ln for ln in lines)
        lines = [ln for ln in lines if retry and ("[FailurePolicy] RETRY" in ln or ln.startswith("  Error count:"))]
    own, rest, after_own = [], [], False
    for ln in lines:
        # an indented line right after one of ours continues it (a stage summary, the rows of an AP table)
        after_own = ln.startswith(tuple(own_prefixes)) or (after_own and ln[:1].isspace() and bool(ln.strip()))
        (own if after_own else rest).append(ln)
    if own:
        sink = sys.stderr if data.get("is_err") else sys.stdout
        sink.write("".join(f"{ln}\n" for ln in own))
        sink.flush()
    if rest:
        original(dict(data, lines=rest))


def install(own_prefixes: Sequence[str]) -> bool:
    """Filter Ray's forwarded worker output (module docstring). Returns False when nothing was hooked."""
    if os.environ.get("UPDETR_RAY_LOGS", "").lower() == "all":
        return False
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return False
    with dispatcher._lock:
        for i, (name, handler) in enumerate(dispatcher.handlers):
            if name != "ray_print_logs":
                continue
            if isinstance(handler, functools.partial) and handler.func is _filtered:
                return True  # already installed
            dispatcher.handlers[i] = (name, functools.partial(_filtered, handler, tuple(own_prefixes)))
            return True
    return False

"""Stall watchdog: say (and finally fail) when no batch reaches a training worker, instead of waiting silently.

`StallWatchdog(batches, warn_s, fail_s, describe, on_warn)` iterates `batches` in a background thread and
hands items over through a one-slot queue. Only the time the consumer spends *waiting* for the next
item counts (a slow training step is not a stall). After `warn_s` seconds of waiting, `on_warn(message)`
is called once per stall with `describe()`'s account of why (what Ray Data reports); after `fail_s` the
consumer gets `StallError(message)`. 0 disables either limit.

`ray_data_report()` is that account on a Ray worker: the last "Execution Progress" dump Ray Data wrote to
this node's `ray-data*.log` (one entry per operator: active tasks, backpressure and its policy, queued
blocks, its CPU use and resource budget), plus the CPUs / GPUs the cluster has free right now.
"""
from __future__ import annotations

import glob
import os
import queue
import re
import threading
import time
from typing import Callable, Iterable, Iterator, Optional

_DONE = object()


class StallError(RuntimeError):
    """No batch arrived within the fail limit; the message says what Ray Data was waiting on."""


class _Raised:
    def __init__(self, err: BaseException) -> None:
        self.err = err


class StallWatchdog:
    """Iterable wrapper; see the module docstring. Single use, like a generator."""

    def __init__(self, batches: Iterable, warn_s: float, fail_s: float, describe: Callable[[], str] = lambda: "",
                 on_warn: Callable[[str], None] = lambda msg: None, what: str = "batch", poll_s: float = 1.0) -> None:
        self.batches, self.warn_s, self.fail_s = batches, float(warn_s or 0), float(fail_s or 0)
        self.describe, self.on_warn, self.what, self.poll_s = describe, on_warn, what, poll_s
        self.items = 0
        self.warnings: list[str] = []

    def message(self, waited: float) -> str:
        where = f"the first {self.what}" if self.items == 0 else f"{self.what} {self.items + 1}"
        try:
            why = self.describe()
        except Exception as e:  # noqa: BLE001 - a diagnosis must never break training
            why = f"(no pipeline report: {type(e).__name__}: {e})"
        return f"data pipeline stalled: no batch for {waited:.0f} s waiting for {where}" + (f"; {why}" if why else "")

    def __iter__(self) -> Iterator:
        if not self.warn_s and not self.fail_s:
            yield from self.batches
            return
        slot: queue.Queue = queue.Queue(maxsize=1)
        stop = threading.Event()

        def hand_over(item) -> bool:
            while not stop.is_set():
                try:
                    slot.put(item, timeout=0.5)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            it = iter(self.batches)
            try:
                for item in it:
                    if not hand_over(item):
                        break
                else:
                    hand_over(_DONE)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, re-raised there
                hand_over(_Raised(e))
            finally:
                close = getattr(it, "close", None)
                if stop.is_set() and close is not None:
                    try:
                        close()
                    except Exception:  # noqa: BLE001
                        pass

        thread = threading.Thread(target=produce, name="updetr-batch-producer", daemon=True)
        thread.start()
        try:
            while True:
                t0, warned = time.monotonic(), False
                while True:
                    try:
                        item = slot.get(timeout=self.poll_s)
                        break
                    except queue.Empty:
                        waited = time.monotonic() - t0
                        if self.fail_s and waited >= self.fail_s:
                            raise StallError(self.message(waited)) from None
                        if self.warn_s and not warned and waited >= self.warn_s:
                            warned = True
                            msg = self.message(waited)
                            self.warnings.append(msg)
                            self.on_warn(msg)
                if item is _DONE:
                    return
                if isinstance(item, _Raised):
                    raise item.err
                self.items += 1
                yield item
        finally:
            stop.set()


# ------------------------------------------------------------------------------ Ray Data report
_OP_LINE = re.compile(r"^\s*\d+: (?P<op>.+?) - (?P<state>Tasks: .*)$")


def _progress_blocks(text: str) -> list[list[str]]:
    """The "Execution Progress:" dumps in a ray-data log (lines after the header that name an operator)."""
    blocks: list[list[str]] = []
    current: Optional[list[str]] = None
    for line in text.splitlines():
        if line.rstrip().endswith("Execution Progress:"):
            current = []
            blocks.append(current)
            continue
        body = line.split(" -- ", 1)[-1]
        m = _OP_LINE.match(body)
        if current is not None and m:
            if not _finished(m["state"]):  # e.g. the Input operator, done at once
                current.append(f"{m['op']}: {_short_state(m['state'])}")
        elif current is not None and current:
            current = None
    return [b for b in blocks if b]


def _short_state(state: str) -> str:
    """Keep what says why an operator waits: tasks and backpressure, actors, queued blocks, its CPU / GPU
    usage and the budget Ray Data's resource manager gives it."""
    parts = [p.strip() for p in state.split(";")]
    out = []
    for p in parts:
        if p.startswith("Tasks"):
            out.append(p.replace("Tasks: ", "tasks ", 1))
        elif p.startswith("Actors") and not p.startswith("Actors: 0"):
            m = re.match(r"Actors: (\d+)(?: \(running=(\d+)[^)]*?pending=(\d+))?", p)
            out.append(f"actors {m[1]} (running {m[2]}, pending {m[3]})" if m and m[2] is not None
                       else p.replace("Actors: ", "actors ", 1))
        elif p.startswith("Queued blocks") and not p.startswith("Queued blocks: 0 "):
            out.append(p.split(" (")[0].lower())
        elif p.startswith("Resources"):
            used = re.match(r"Resources: ([\d.]+ CPU)", p)
            budget = re.search(r"budget=\(cpu=([\d.]+),mem=[^,]*,gpu=([\d.]+)", p)
            if used:
                out.append(f"using {used[1]}")
            if budget:
                out.append(f"budget cpu={budget[1]} gpu={budget[2]}")
    return ", ".join(out)[:400]


def _finished(line: str) -> bool:
    m = re.search(r"Blocks Outputted: (\d+)/(\d+)", line)
    return bool(m) and m[1] == m[2]


def last_progress_report(log_dir: str) -> Optional[list[str]]:
    """Operator lines of the newest "Execution Progress" dump in `log_dir/ray-data*.log`, or None."""
    files = glob.glob(os.path.join(log_dir, "ray-data*.log")) + glob.glob(os.path.join(log_dir, "ray-data", "*.log"))
    files.sort(key=os.path.getmtime, reverse=True)
    for path in files:
        try:
            with open(path, "rb") as f:
                f.seek(max(0, os.path.getsize(path) - 256 * 1024))
                text = f.read().decode("utf-8", errors="replace")
        except OSError:
            continue
        blocks = _progress_blocks(text)
        if blocks:
            return blocks[-1]
    return None


def ray_data_report() -> str:
    """What Ray Data last reported about its operators on this node, and the cluster's free resources."""
    import ray

    parts = []
    try:
        from ray._private.worker import global_worker

        log_dir = global_worker.node.get_logs_dir_path()
        ops = last_progress_report(log_dir)
        parts.append("Ray Data reports " + (" | ".join(ops) if ops else f"nothing yet (no progress in {log_dir}/ray-data)"))
    except Exception as e:  # noqa: BLE001
        parts.append(f"Ray Data: no report ({type(e).__name__})")
    try:
        free, total = ray.available_resources(), ray.cluster_resources()
        parts.append(f"free CPU {free.get('CPU', 0.0):g} of {total.get('CPU', 0.0):g}"
                     + (f", free GPU {free.get('GPU', 0.0):g} of {total['GPU']:g}" if total.get("GPU") else ""))
    except Exception:  # noqa: BLE001
        pass
    return "; ".join(parts)

"""Keep the terminal of `updetr run / sweep / demo / eval` to updetr's own lines; Ray's go to a log file.

Ray forwards every worker's stdout/stderr to the driver (`log_to_driver`), prefixed with
`(ActorName pid=N)`, deduplicated with `[repeated Nx across cluster]` notes, plus the raylet's own
warnings; its driver-side loggers (Tune, Train, Data) print `WARNING file.py:N -- ...` lines. `install()`
swaps Ray's printer for one that
- prints updetr's own lines (`[<experiment>] ...`, and the indented lines that continue them) and the
  per-epoch `data: ...` bad-item summaries without Ray's prefix, each once;
- keeps a worker-group restart visible (`[FailurePolicy] RETRY` + its error count), unprefixed;
- drops Ray's tracebacks of a failed training function (the driver ends with its one `training failed:
  <reason>` line);
- writes everything it received, Ray's lines as Ray formats them, to one log file per process, and sends
  Ray's driver-side log records there too. One terminal line says where that file is.

`UPDETR_RAY_LOGS=all` turns all of this off (Ray prints as it does by default).

This hooks Ray's driver-side log dispatcher (`ray._private.ray_logging.global_worker_stdstream_dispatcher`,
an internal API, checked by the quiet-terminal test of a real sweep); if the hook is absent nothing is
filtered.
"""
from __future__ import annotations

import functools
import logging
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Optional, Sequence, TextIO

from updetr.util.streams import STDOUT

# Lines that are routine on every run (matched anywhere in the line): not even worth the log file's reader's
# attention, but kept there for completeness.
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
# ends with one `updetr: error: training failed: <reason>` line; the tracebacks stay in the log file.
FAILURE_REPORT = tuple(re.compile(p) for p in (
    r"Traceback \(most recent call last\)",
    r"Error in training function",
    r"Training failed due to worker errors",
    r"\[Rank \d+ Error Snippet\]",
))

# The data layer's per-epoch summary (updetr/data/skips.py, local_loader.py), logged by each worker through
# Python logging, so it arrives with a logging header ("INFO local_loader.py:123 -- data: ...").
DATA_LINE = re.compile(r"(data: .*?(?:no bad items|bad-data events by reason: .*))\s*$")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
TQDM_MAGIC = "__ray_tqdm_magic_token__"      # ray.experimental.tqdm_ray.RAY_TQDM_MAGIC: progress bars


def is_noise(line: str) -> bool:
    return any(p.search(line) for p in NOISE)


def is_failure_report(lines: Sequence[str]) -> bool:
    return any(p.search(ln) for ln in lines for p in FAILURE_REPORT)


def everything_shown() -> bool:
    return os.environ.get("UPDETR_RAY_LOGS", "").lower() == "all"


class RayLog:
    """The file that receives Ray's lines (opened on first use, appended to, line-buffered)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file: Optional[TextIO] = None
        self._lock = threading.Lock()

    def write_lines(self, lines: Sequence[str]) -> None:
        if not lines:
            return
        with self._lock:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "a", buffering=1, encoding="utf-8")
            self._file.write("".join(f"{ANSI.sub('', ln)}\n" for ln in lines))

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def ray_prefix(data: dict) -> str:
    """Ray's `(ActorName pid=N, ip=X)` prefix of a forwarded batch (as ray._private.worker formats it)."""
    pid = data.get("pid")
    if pid in ("raylet", "autoscaler"):
        return f"({pid})"
    name = data.get("actor_name") or data.get("task_name")
    ip = data.get("ip")
    where = "" if ip is None or ip == data.get("localhost") else f", ip={ip}"
    return f"({name + ' ' if name else ''}pid={pid}{where})"


class _Seen:
    """The data lines already printed (every rank, and Ray's restarts, may send the same one)."""

    def __init__(self, keep: int = 512):
        self.keep, self.lines, self.order = keep, set(), []

    def first_time(self, line: str) -> bool:
        if line in self.lines:
            return False
        self.lines.add(line)
        self.order.append(line)
        if len(self.order) > self.keep:
            self.lines.discard(self.order.pop(0))
        return True


def _filtered(original, own_prefixes: Sequence[str], data: dict, log: Optional[RayLog] = None,
              seen: Optional[_Seen] = None) -> None:
    """Ray's printer, filtered (module docstring). `original` gets only what must reach the terminal as Ray
    prints it: progress bars (tqdm_ray) and, without a log file, the lines that are not ours."""
    lines = list(data.get("lines", []))
    if data.get("pid") == "autoscaler":
        # the monitor's whole status report every few seconds; Ray itself prints only its events
        from ray._private.worker import filter_autoscaler_events

        lines = list(filter_autoscaler_events(lines))
    if log is not None:
        prefix = ray_prefix(data)
        log.write_lines([f"{prefix} {ln}" for ln in lines if TQDM_MAGIC not in ln])
    bars = [ln for ln in lines if TQDM_MAGIC in ln]
    lines = [ln for ln in lines if TQDM_MAGIC not in ln and not is_noise(ln)]
    retry = []
    if data.get("is_err") and is_failure_report(lines):
        # keep a retry decision ("[FailurePolicy] RETRY" + its error count), drop the tracebacks; a final
        # failure (RAISE) is the driver's own one line
        if any("[FailurePolicy] RETRY" in ln for ln in lines):
            retry = [ln for ln in lines if "[FailurePolicy] RETRY" in ln or ln.startswith("  Error count:")]
        lines = []
    own, rest, after_own = [], [], False
    for ln in lines:
        # an indented line right after one of ours continues it (a stage summary, the rows of an AP table)
        after_own = ln.startswith(tuple(own_prefixes)) or (after_own and ln[:1].isspace() and bool(ln.strip()))
        if after_own:
            own.append(ln)
            continue
        m = DATA_LINE.search(ANSI.sub("", ln))
        if m:
            if seen is None or seen.first_time(m.group(1)):
                own.append(m.group(1))
        else:
            rest.append(ln)
    if log is None:
        rest += retry       # Ray prints it, as before (no log file: nothing of Ray's is hidden but the noise)
    else:
        own += retry
    if own:
        sink = sys.stderr if data.get("is_err") else sys.stdout
        sink.write("".join(f"{ln}\n" for ln in own))
        sink.flush()
    shown = bars + ([] if log is not None else rest)
    if shown:
        original(dict(data, lines=shown))


_state: dict = {}


def install(own_prefixes: Sequence[str], log_path: Optional[Path] = None, out: TextIO = STDOUT) -> Optional[Path]:
    """Filter Ray's forwarded output (module docstring) into `log_path`, and say so in one line.

    Returns the log file in use (the first one installed in this process wins), or None when nothing was
    hooked (`UPDETR_RAY_LOGS=all`, no Ray driver, or the internal API moved)."""
    if everything_shown():
        return None
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return None
    prefixes = tuple(own_prefixes)
    with dispatcher._lock:
        for i, (name, handler) in enumerate(dispatcher.handlers):
            if name != "ray_print_logs":
                continue
            if isinstance(handler, functools.partial) and handler.func is _filtered:
                # already installed (a chain's next stage, a sweep's trials): add this run's prefixes
                if not set(prefixes) <= set(handler.args[1]):
                    dispatcher.handlers[i] = (name, functools.partial(
                        _filtered, handler.args[0], handler.args[1] + prefixes, **handler.keywords))
                log = handler.keywords.get("log")
                return log.path if log is not None else None
            log = RayLog(log_path) if log_path is not None else None
            dispatcher.handlers[i] = (name, functools.partial(_filtered, handler, prefixes, log=log, seen=_Seen()))
            break
        else:
            return None
    _route_error_listener(prefixes, log)
    if log is not None:
        route_ray_loggers(log)
        print(f"Ray's own output (workers, raylet, Tune) -> {log.path}  (UPDETR_RAY_LOGS=all prints it here)",
              file=out, flush=True)
        return log.path
    return None


def _route_error_listener(prefixes: tuple[str, ...], log: Optional[RayLog]) -> None:
    """The raylet's warnings (`WARNING: 8 PYTHON worker processes have been started ...`) reach the driver
    through Ray's error listener, which calls `ray._private.worker.print_to_stdstream` itself rather than the
    dispatcher: route that function through the same filter (looked up by name at each call)."""
    import ray._private.worker as ray_worker

    original = ray_worker.print_to_stdstream
    if getattr(original, "_updetr_routed", False):
        return
    seen = _Seen()

    def routed(data, ignore_prefix: bool = False):
        _filtered(functools.partial(original, ignore_prefix=ignore_prefix), prefixes, data, log=log, seen=seen)

    routed._updetr_routed = True
    ray_worker.print_to_stdstream = routed


class _ToRayLog(logging.Handler):
    def __init__(self, log: RayLog):
        super().__init__(logging.DEBUG)
        self.log = log
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(filename)s:%(lineno)d -- %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.log.write_lines(self.format(record).splitlines())
        except Exception:  # noqa: BLE001 - logging must never break the run
            self.handleError(record)


def route_ray_loggers(log: RayLog) -> None:
    """Ray's driver-side log records (Tune's controller, Train, Data) go to the log file, not the terminal.

    Ray's `configure_logging` puts a stderr handler on the `ray` logger; it is replaced by one writing to
    the log file (the level stays what `ray.init(logging_level=...)` set)."""
    ray_logger = logging.getLogger("ray")
    for h in list(ray_logger.handlers):
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
            ray_logger.removeHandler(h)
    if not any(isinstance(h, _ToRayLog) for h in ray_logger.handlers):
        ray_logger.addHandler(_ToRayLog(log))
    ray_logger.propagate = False


def default_log_path(output_dir: str | Path, name: str) -> Path:
    """Where a run's or a sweep's Ray output goes: `<output_dir>/logs/<name>-<UTC time>-ray.log`."""
    return Path(output_dir).resolve() / "logs" / f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-ray.log"


class FetchWarnings(logging.Filter):
    """Tune's "Failed to fetch metrics for N trial(s)" after a restart, held back: the sweep says it in its
    own words (which trials were interrupted and restart from their checkpoints)."""

    def __init__(self):
        super().__init__()
        self.trials: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if not msg.startswith("Failed to fetch metrics for"):
            return True
        self.trials += [m.group(1) for m in re.finditer(r"^- (\S+?):", msg, re.M)]
        return False


@functools.lru_cache(maxsize=1)
def fetch_warnings() -> FetchWarnings:
    f = FetchWarnings()
    if not everything_shown():
        logging.getLogger("ray.tune.analysis.experiment_analysis").addFilter(f)
    return f


def quiet_tune() -> None:
    """Tune's new console output prints a boxed "Configuration for experiment" table, "View detailed results
    here" and a TensorBoard hint whatever `verbose` says; its legacy reporter at verbosity 0 prints nothing.
    Read by `tune.run` on every call (ray.tune.experimental.output.get_air_verbosity)."""
    if not everything_shown():
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"

"""Store and forward for MLflow writes: the on-disk spool, delivery of kept writes, `updetr tracking sync`.

A tracker (updetr/tracking.py) keeps every write it cannot deliver, in order. With a spool attached, each
kept write is also appended to `<run folder>/tracking-spool-<run id>-<role>.jsonl` as it is kept, so a
run that ends (or is killed) before the server is back loses nothing; the file shrinks as writes are
delivered and is removed when empty. Each spool is listed in a small index in the user's state folder
(`$UPDETR_STATE_DIR`, default `$XDG_STATE_HOME/updetr` or `~/.local/state/updetr`), so that
`updetr tracking sync --all` and the next command that opens the same store deliver it.

A kept write is one JSON operation:
  {"op": "batch", "metrics": [[key, value, timestamp_ms, step]], "params": [[k, v]], "tags": [[k, v]]}
  {"op": "commit", "state": <metric ledger state>}   (a ledger commit that could not read its marker)
  {"op": "text", "text": ..., "file": ...}   {"op": "artifact", "path": ..., "artifact_path": ...}
  {"op": "terminate", "status": "FINISHED" | "FAILED" | "KILLED"}
Delivering one twice is harmless (see updetr/tracking.py), which is what makes a retry after an
unknown outcome (a timeout after the server stored the rows) exactly-once.
"""
from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

FORMAT = "updetr-tracking-spool"
PREFIX = "tracking-spool-"
# MLflow's log_batch limits (per request)
MAX_METRICS, MAX_PARAMS, MAX_TAGS = 1000, 100, 100


def warn(msg: str) -> None:
    print(f"updetr: warning: {msg}", file=sys.stderr, flush=True)


def one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------- delivery
def next_chunk(pending: list[dict]) -> tuple[int, dict]:
    """How many of the first kept writes go in the next request, and that request.

    Consecutive batches merge up to MLflow's per-request limits; a tag or param key seen twice starts a
    new request, so a later value of a tag still lands after the earlier one."""
    first = pending[0]
    if first["op"] != "batch":
        return 1, first
    merged: dict[str, list] = {"metrics": [], "params": [], "tags": []}
    keys: dict[str, set] = {"params": set(), "tags": set()}
    n = 0
    for op in pending:
        if op["op"] != "batch":
            break
        parts = {k: op.get(k) or [] for k in merged}
        if n and (len(merged["metrics"]) + len(parts["metrics"]) > MAX_METRICS
                  or len(merged["params"]) + len(parts["params"]) > MAX_PARAMS
                  or len(merged["tags"]) + len(parts["tags"]) > MAX_TAGS
                  or any(kv[0] in keys[k] for k in keys for kv in parts[k])):
            break
        for k in merged:
            merged[k].extend(parts[k])
        for k in keys:
            keys[k].update(kv[0] for kv in parts[k])
        n += 1
    return n, {"op": "batch", **merged}


# Answers that mean the server got the request and refused it (a changed param, a deleted run): sending it
# again cannot help. Anything else (connection refused, timeout, 5xx) is an outage: keep and retry.
_REFUSALS = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST", "INVALID_STATE"}


def rejected(err: BaseException) -> bool:
    return getattr(err, "error_code", None) in _REFUSALS


def deliver(tracker: Any, op: dict) -> None:
    """Send one operation through `tracker.client` (raises on any failure; the caller keeps it)."""
    from mlflow.entities import Metric, Param, RunTag

    client, run_id = tracker.client, tracker.run_id
    kind = op["op"]
    if kind == "batch":
        client.log_batch(run_id, metrics=[Metric(k, float(v), int(ts), int(s)) for k, v, ts, s in op.get("metrics") or []],
                         params=[Param(k, v) for k, v in op.get("params") or []],
                         tags=[RunTag(k, v) for k, v in op.get("tags") or []])
    elif kind == "commit":
        _deliver_commit(client, run_id, op["state"])
    elif kind == "text":
        client.log_text(run_id, op["text"], op["file"])
    elif kind == "artifact":
        if Path(op["path"]).is_file():  # a file deleted meanwhile cannot be sent; nothing else to do
            client.log_artifact(run_id, op["path"], op.get("artifact_path"))
    elif kind == "terminate":
        client.set_terminated(run_id, op["status"])
    else:
        raise ValueError(f"unknown kept tracking operation {kind!r}")


def _deliver_commit(client: Any, run_id: str, state: dict) -> None:
    """A kept ledger commit, now that the marker can be read: only entries after the marker, then the
    marker (updetr/metric_ledger.py)."""
    from mlflow.entities import Metric, RunTag

    from updetr.metric_ledger import TAG_COMMITTED, format_marker, parse_marker, plan_commit

    marker = parse_marker(client.get_run(run_id).data.tags.get(TAG_COMMITTED))
    plan = plan_commit(state, marker)
    if plan is None:
        return
    upto, rows, _ = plan
    metrics = [Metric(k, v, int(time.time() * 1000) if ts is None else ts, step) for step, values, ts in rows for k, v in values.items()]
    for i in range(0, len(metrics), MAX_METRICS):
        client.log_batch(run_id, metrics=metrics[i:i + MAX_METRICS])
    client.log_batch(run_id, tags=[RunTag(TAG_COMMITTED, format_marker(upto))])


def pending_notice(tracker: Any) -> str:
    """The one line printed when a process ends with writes not delivered."""
    where = f"kept in {tracker.spool.path}" if tracker.spool is not None else "kept only in this process"
    target = tracker.spool.path.parent if tracker.spool is not None else None
    how = (f"deliver them with: updetr tracking sync {target}" if target is not None
           else "they are lost when it exits")
    return (f"{len(tracker.pending)} tracking entries of MLflow run {tracker.run_id} are not delivered yet "
            f"(server {tracker.uri} not answering); {where}; {how} (the next run on this store delivers them too)")


# ------------------------------------------------------------------------------ the tracker's queue
class StoreAndForward:
    """The write side of a tracker: deliver now, or keep (in order) and deliver when the server answers.

    Needs `client` (an MlflowClient), `uri` and `run_id`. Tries again once per `retry_interval_s`
    ($UPDETR_TRACKING_RETRY_S, default 30 s) while the server is away; warns once per outage."""

    def __init__(self, client: Any, uri: str, run_id: str, retry_interval_s: Optional[float] = None) -> None:
        self.client, self.uri, self.run_id = client, uri, run_id
        self.retry_interval_s = float(os.environ.get("UPDETR_TRACKING_RETRY_S", 30.0)) \
            if retry_interval_s is None else retry_interval_s
        self.errors = 0          # failed calls, all outages together
        self.dropped = 0         # reads that failed or were skipped while down (writes are kept instead)
        self.pending: list[dict] = []   # writes not delivered yet, oldest first (JSON-able operations)
        self.spool: Optional["Spool"] = None   # mirrors `pending` on disk, when attached
        self.quiet = False              # no outage / recovery warnings (`updetr tracking sync` says it itself)
        self._down_since: Optional[float] = None
        self._retry_at = 0.0

    def _may_try(self) -> bool:
        return self._down_since is None or time.monotonic() >= self._retry_at

    def _failed(self, what: str, err: BaseException) -> None:
        self.errors += 1
        if self._down_since is None:
            self._down_since = time.monotonic()
            if not self.quiet:
                warn(f"MLflow tracking at {self.uri} failed ({what}: {one_line(err, 200)}); training "
                      f"continues, metrics, params and tags are kept and delivered when it answers again "
                      f"(retry every {self.retry_interval_s:.0f} s)")
        self._retry_at = time.monotonic() + self.retry_interval_s

    def _answered(self) -> None:
        if self._down_since is not None:
            if not self.quiet:
                warn(f"MLflow tracking at {self.uri} is back after {time.monotonic() - self._down_since:.0f} s"
                      + (f"; delivering {len(self.pending)} kept entries" if self.pending else ""))
            self._down_since = None

    def _write(self, op: dict) -> bool:
        """Deliver one write now, or keep it behind the earlier undelivered ones. True: delivered."""
        if self.pending and self._may_try():
            self.flush()
        if self.pending or not self._may_try():
            self._keep(op)
            return False
        try:
            deliver(self, op)
        except Exception as e:  # noqa: BLE001 - tracking never stops training
            if rejected(e):  # the server answered "no": keeping it would block every later write
                self._answered()
                warn(f"MLflow run {self.run_id} refused a {op['op']} write: {one_line(e, 200)}")
                return False
            self._failed(op["op"], e)
            self._keep(op)
            return False
        self._answered()
        return True

    def _keep(self, op: dict) -> None:
        self.pending.append(op)
        if self.spool is not None:
            self.spool.append(op)

    def keep_commit(self, state: Mapping[str, Any]) -> None:
        """A metric-ledger commit that cannot read the marker now: kept, and run (marker check included)
        when the server answers, after every write kept before it."""
        self._keep({"op": "commit", "state": dict(state)})

    def flush(self, force: bool = False) -> int:
        """Deliver the kept writes in order (merged into few requests); stop at the first failure.
        `force` tries even within the retry interval. Returns how many kept writes were delivered."""
        if not self.pending or not (force or self._may_try()):
            return 0
        done, single = 0, False
        while self.pending:
            n, op = (1, self.pending[0]) if single else next_chunk(self.pending)
            try:
                deliver(self, op)
            except Exception as e:  # noqa: BLE001 - tracking never stops training
                if not rejected(e):
                    self._failed(f"delivering kept {op['op']}", e)
                    break
                if n > 1:  # one write of the merged request was refused: find it, send the others
                    single = True
                    continue
                warn(f"MLflow run {self.run_id} refused a kept {op['op']} write: {one_line(e, 200)}")
            del self.pending[:n]
            done += n
            self._answered()
        if done and self.spool is not None:
            self.spool.rewrite(self.pending)
        return done


# ------------------------------------------------------------------------------------ the spool file
def state_dir() -> Path:
    base = os.environ.get("UPDETR_STATE_DIR")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_STATE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "state") / "updetr"


def _index_path() -> Path:
    return state_dir() / "tracking-spools.txt"


@contextmanager
def _index_lock() -> Iterator[None]:
    path = _index_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def indexed_spools() -> list[Path]:
    path = _index_path()
    if not path.is_file():
        return []
    return [Path(line) for line in dict.fromkeys(path.read_text().splitlines()) if line.strip()]


def _index_update(add: Optional[Path] = None, remove: Optional[Path] = None) -> None:
    try:
        with _index_lock():
            paths = [p for p in indexed_spools() if p != remove and p.is_file()]
            if add is not None and add not in paths:
                paths.append(add)
            tmp = _index_path().with_suffix(f".tmp{os.getpid()}")
            tmp.write_text("".join(f"{p}\n" for p in paths))
            tmp.replace(_index_path())
    except OSError as e:  # the index only helps find spools; the spool itself is what matters
        print(f"updetr: warning: cannot update the tracking spool index {_index_path()}: {e.strerror or e}",
              file=sys.stderr)


class Spool:
    """One tracker's kept writes on disk: a header line (store, run), then one operation per line."""

    def __init__(self, path: Path, uri: str, run_id: str, experiment: Optional[str] = None) -> None:
        self.path, self.uri, self.run_id, self.experiment = Path(path).resolve(), uri, run_id, experiment

    @classmethod
    def for_run(cls, folder: str | Path, uri: str, run_id: str, experiment: Optional[str], role: str) -> "Spool":
        return cls(Path(folder) / f"{PREFIX}{run_id}-{role}.jsonl", uri, run_id, experiment)

    def header(self) -> dict:
        return {"format": FORMAT, "version": 1, "uri": self.uri, "run_id": self.run_id,
                "experiment": self.experiment}

    def append(self, op: dict) -> None:
        try:
            new = not self.path.exists()
            if new:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                if new:
                    f.write(json.dumps(self.header()) + "\n")
                f.write(json.dumps(op) + "\n")
            if new:
                _index_update(add=self.path)
        except OSError as e:
            print(f"updetr: warning: cannot write the tracking spool {self.path} ({e.strerror or e}); "
                  f"undelivered entries are kept in memory only", file=sys.stderr)

    def rewrite(self, ops: list[dict]) -> None:
        """Replace the file by the still undelivered `ops` (removed, and unlisted, when none are left)."""
        if not ops:
            self.path.unlink(missing_ok=True)
            _index_update(remove=self.path)
            return
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text("".join(json.dumps(x) + "\n" for x in [self.header(), *ops]))
        tmp.replace(self.path)


class SpoolError(ValueError):
    """A spool file that cannot be read; the message names it."""


def read_spool(path: str | Path) -> tuple[dict, list[dict]]:
    """(header, operations) of a spool file. A last line cut off by a kill mid-write is ignored."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise SpoolError(f"{path}: cannot read tracking spool ({e.strerror or e})") from None
    try:
        header = json.loads(lines[0]) if lines else {}
    except json.JSONDecodeError:
        header = {}
    if header.get("format") != FORMAT:
        raise SpoolError(f"{path}: not an updetr tracking spool (no '{FORMAT}' header line)")
    ops = []
    for i, line in enumerate(lines[1:], start=2):
        try:
            ops.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines):
                raise SpoolError(f"{path}: line {i} is not JSON; the file was changed by hand?") from None
    return header, ops


def attach_spool(tracker: Any, folder: str | Path, role: str) -> None:
    """Mirror `tracker`'s kept writes into its run folder; writes left there by an earlier process with
    the same role come first, so they are delivered before anything new."""
    spool = Spool.for_run(folder, tracker.uri, tracker.run_id, getattr(tracker, "experiment_name", None), role)
    earlier: list[dict] = []
    if spool.path.is_file():
        try:
            earlier = read_spool(spool.path)[1]
        except SpoolError as e:
            print(f"updetr: warning: {e}; left as it is", file=sys.stderr)
            spool = Spool.for_run(folder, tracker.uri, tracker.run_id, spool.experiment, role + "-next")
    tracker.pending[:0] = earlier
    tracker.spool = spool
    if tracker.pending:
        spool.rewrite(tracker.pending)
        tracker.flush(force=True)

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

import argparse
import fcntl
import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

FORMAT = "updetr-tracking-spool"
PREFIX = "tracking-spool-"
# MLflow's log_batch limits (per request)
MAX_METRICS, MAX_PARAMS, MAX_TAGS = 1000, 100, 100


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
    from updetr.command_line import cli_command

    how = (f"deliver them with: {cli_command()} tracking sync {target}" if target is not None
           else "they are lost when it exits")
    return (f"{len(tracker.pending)} tracking entries of MLflow run {tracker.run_id} are not delivered yet "
            f"(server {tracker.uri} not answering); {where}; {how} (the next run on this store delivers them too)")



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


def attach_local_spool(tracker: Any, folder: Optional[str], role: str) -> None:
    """Keep `tracker`'s undelivered writes in `folder` (a local run folder; nothing for `s3://...` etc.),
    after delivering what earlier runs on the same store left in their spools."""
    from updetr.tracking import MlflowTracker

    if not isinstance(tracker, MlflowTracker) or not folder or "://" in str(folder):
        return
    sync_store(tracker.uri)
    attach_spool(tracker, folder, role)


# ------------------------------------------------------------------------------------------- sync
def sync_spool(path: str | Path) -> tuple[int, int, str]:
    """Deliver one spool file. Returns (delivered, still pending, one-line description)."""
    from updetr.tracking import MlflowTracker

    header, ops = read_spool(path)
    tracker = MlflowTracker.attach(header["uri"], header["run_id"], experiment_name=header.get("experiment"),
                                   retry_interval_s=0.0)
    tracker.quiet = True
    tracker.spool = Spool(Path(path), header["uri"], header["run_id"], header.get("experiment"))
    tracker.pending = list(ops)
    done = tracker.flush(force=True)
    if not ops:
        tracker.spool.rewrite([])
    left = len(tracker.pending)
    if left:
        return done, left, (f"{path}: delivered {done}, {left} still pending (MLflow at {header['uri']} does "
                            f"not answer); run this again when it is back")
    return done, 0, f"{path}: delivered {done} tracking entries to MLflow run {header['run_id']} at {header['uri']}"


def spools_under(folder: str | Path) -> list[Path]:
    return sorted(Path(folder).rglob(f"{PREFIX}*.jsonl"))


def sync_store(uri: str) -> int:
    """Deliver every indexed spool of the store at `uri` (called when a run opens that store). Never raises;
    returns the number of entries delivered."""
    total = 0
    for path in indexed_spools():
        try:
            if not path.is_file() or read_spool(path)[0].get("uri") != uri:
                continue
            done, left, line = sync_spool(path)
        except Exception as e:  # noqa: BLE001 - an old spool must not stop a new run
            print(f"updetr: warning: tracking spool {path}: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        total += done
        print(f"updetr: {line}", file=sys.stderr if left else sys.stdout, flush=True)
    return total


def cmd_tracking_sync(args: argparse.Namespace) -> int:
    if args.all == bool(args.run_dir):
        print("updetr: error: tracking sync: give a run folder or --all", file=sys.stderr)
        return 2
    if args.all:
        paths = [p for p in indexed_spools() if p.is_file()]
    else:
        folder = Path(args.run_dir)
        if not folder.exists():
            print(f"updetr: error: tracking sync: {folder}: no such run folder", file=sys.stderr)
            return 2
        paths = [folder] if folder.is_file() else spools_under(folder)
    if not paths:
        print("nothing to deliver: no tracking spool " + ("listed" if args.all else f"under {args.run_dir}"))
        return 0
    status = 0
    for path in paths:
        try:
            _, left, line = sync_spool(path)
        except SpoolError as e:
            print(f"updetr: error: {e}", file=sys.stderr)
            status = 2
            continue
        print(line if not left else f"updetr: error: {line}", file=sys.stderr if left else sys.stdout)
        status = status or (1 if left else 0)
    return status


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("tracking", help="tracking tools: deliver what a tracking outage kept on disk")
    sub = p.add_subparsers(dest="tracking_command", metavar="ACTION", required=True)
    s = sub.add_parser("sync", help="deliver the metrics, params and tags a run kept while MLflow was away",
                       description="Send the writes kept in tracking-spool-*.jsonl files (a run folder, or "
                                   "every spool listed for this user) to their MLflow run, in order, once.")
    s.add_argument("run_dir", nargs="?", help="run folder (or one spool file)")
    s.add_argument("--all", action="store_true", help="every spool listed in the user's state folder")
    s.set_defaults(func=cmd_tracking_sync)

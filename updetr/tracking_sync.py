"""`updetr tracking sync` and the delivery of spools when a run opens a store (updetr/tracking_spool.py keeps
them). Below updetr/tracking.py: it delivers through a bare `StoreAndForward`, not a tracker."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional

from updetr.tracking_client import CredentialsError, prepare_client_env
from updetr.tracking_spool import (PREFIX, Spool, SpoolError, StoreAndForward, attach_spool, indexed_spools,
                                   read_spool)


def attach_local_spool(tracker: Any, folder: Optional[str], role: str) -> None:
    """Keep `tracker`'s undelivered writes in `folder` (a local run folder; nothing for `s3://...` etc.),
    after delivering what earlier runs on the same store left in their spools."""
    if not isinstance(tracker, StoreAndForward) or not folder or "://" in str(folder):
        return
    sync_store(tracker.uri)
    attach_spool(tracker, folder, role)


# ------------------------------------------------------------------------------------------- sync
def sync_spool(path: str | Path) -> tuple[int, int, str]:
    """Deliver one spool file. Returns (delivered, still pending, one-line description)."""
    from mlflow.tracking import MlflowClient

    header, ops = read_spool(path)
    prepare_client_env()
    tracker = StoreAndForward(MlflowClient(tracking_uri=header["uri"]), header["uri"], header["run_id"], 0.0)
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
        except (SpoolError, CredentialsError) as e:
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

"""One driver per run: a lock on the run's identity, taken before any work, and file locks for first use.

Two commands with the same run identity (`updetr debug` / `run` / a chain / `sweep` of the same name) would
otherwise both train the same run: both write its checkpoints and log every step twice into the one MLflow
run. The driver takes the lock first; a second driver is refused in one line naming the holder.

Local folders: `fcntl.flock` on `<run folder>/.updetr-run.lock`. The kernel drops the lock when the holder's
process ends, however it ends (kill -9 included), so a dead holder never blocks a new driver. The file's
text names the holder (host, pid, start time); a clean release empties it, so a holder found in the file
when the lock is free means the last driver died holding it: the new one says it takes the run over.
Ray Train workers never take the lock (the driver holds it), so a worker restart inside one driver is not a
second driver. The lock is held per process and re-entrant: a chain's stage inside the chain's driver
takes its own folder's lock, or the same one again, without refusing itself.

Object-store storage paths (`s3://...`) have no lock: there a lease object beside the run
(`<run_dir>/.updetr-run.lease.json`, the same holder fields plus an expiry) is written and renewed every
`ttl / 3` by a daemon thread; a lease past its expiry means the holder is gone. Object stores give no
compare-and-swap through pyarrow, so two drivers starting within the same second can both win; the lease
re-reads its own write after a short pause to narrow that window.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, TextIO

from updetr.util.streams import STDERR

LOCK_FILE = ".updetr-run.lock"
LEASE_FILE = ".updetr-run.lease.json"
LEASE_TTL_S = 60.0


class RunInUse(RuntimeError):
    """Another live driver holds this run; the message is one line naming it."""


@dataclass
class Holder:
    host: str
    pid: int
    since: float                    # time.time() when it took the run
    expires: Optional[float] = None  # leases only

    @classmethod
    def me(cls) -> "Holder":
        return cls(socket.gethostname(), os.getpid(), time.time())

    @classmethod
    def parse(cls, text: str) -> Optional["Holder"]:
        try:
            d = json.loads(text)
            return cls(str(d["host"]), int(d["pid"]), float(d["since"]), d.get("expires"))
        except (ValueError, KeyError, TypeError):
            return None

    def dump(self) -> str:
        d = {"host": self.host, "pid": self.pid, "since": self.since}
        if self.expires is not None:
            d["expires"] = self.expires
        return json.dumps(d)

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host} since {_clock(self.since)}"


def _clock(t: float) -> str:
    """`12:03` today, `2026-12-05 12:03` on another day (local time, as the user's clock shows)."""
    lt = time.localtime(t)
    return time.strftime("%H:%M" if lt[:3] == time.localtime()[:3] else "%Y-%m-%d %H:%M", lt)


def in_use_message(label: str, holder: Optional[Holder], advice: str) -> str:
    who = holder.describe() if holder is not None else "another process"
    return f"{label} is in use by {who}; wait for it, or {advice}"


# ------------------------------------------------------------------------------------ local folders
_held: dict[str, list] = {}      # lock file path -> [fd, depth]: re-entrant within this process
_held_guard = threading.Lock()


def _acquire_local(path: Path, label: str, advice: str, out: TextIO) -> bool:
    """Take the flock of `path`; False when this process holds it already (re-entrant)."""
    key = str(path)
    with _held_guard:
        if key in _held:
            _held[key][1] += 1
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(key, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by subprocesses (PEP 446)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            previous = Holder.parse(os.pread(fd, 4096, 0).decode(errors="replace"))
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunInUse(in_use_message(label, previous, advice)) from None
            raise
        previous = Holder.parse(os.pread(fd, 4096, 0).decode(errors="replace"))
        if previous is not None:
            print(f"updetr: note: {label}: the lock of {previous.describe()} was left behind by a driver that is "
                  f"no longer running; taking it over", file=out, flush=True)
        me = Holder.me().dump().encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, me, 0)
        _held[key] = [fd, 1]
        return True


def _release_local(path: Path) -> None:
    key = str(path)
    with _held_guard:
        entry = _held.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        fd = entry[0]
        del _held[key]
        try:
            os.ftruncate(fd, 0)   # an empty file: released cleanly (a dead holder leaves its text)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


# ------------------------------------------------------------------------------- object-store leases
class Lease:
    """A renewed lease object at `path` on a pyarrow filesystem (see the module docstring)."""

    def __init__(self, fs, path: str, label: str, advice: str, ttl_s: float = LEASE_TTL_S) -> None:
        self.fs, self.path, self.label, self.advice, self.ttl_s = fs, path, label, advice, ttl_s
        self.holder = Holder.me()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _read(self) -> Optional[Holder]:
        try:
            with self.fs.open_input_stream(self.path) as f:
                return Holder.parse(f.read().decode(errors="replace"))
        except (FileNotFoundError, OSError):
            return None

    def _write(self) -> None:
        self.holder.expires = time.time() + self.ttl_s
        with self.fs.open_output_stream(self.path) as f:
            f.write(self.holder.dump().encode())

    def _mine(self, h: Optional[Holder]) -> bool:
        return h is not None and (h.host, h.pid, h.since) == (self.holder.host, self.holder.pid, self.holder.since)

    def acquire(self, out: TextIO, settle_s: float = 1.0) -> None:
        current = self._read()
        if current is not None and not self._mine(current):
            if current.expires is not None and current.expires > time.time():
                raise RunInUse(in_use_message(self.label, current, self.advice))
            print(f"updetr: note: {self.label}: the lease of {current.describe()} expired at "
                  f"{_clock(current.expires or current.since)}; taking it over", file=out, flush=True)
        self._write()
        time.sleep(settle_s)   # a driver that wrote after us wins; we step back
        current = self._read()
        if not self._mine(current):
            raise RunInUse(in_use_message(self.label, current, self.advice))
        self._thread = threading.Thread(target=self._renew, name="updetr-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self._write()
            except Exception:  # noqa: BLE001 - a failed renewal is retried at the next tick
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(Exception):
            if self._mine(self._read()):
                self.fs.delete_file(self.path)


# -------------------------------------------------------------------------------------------- API
@contextlib.contextmanager
def hold_run(folder: str | os.PathLike, label: str, advice: str = "use name=... for a separate run",
             out: TextIO = STDERR) -> Iterator[None]:
    """Hold the run whose files live in `folder` (a local path or an object-store URI) for the block.

    Raises RunInUse (one line: `<label> is in use by pid P on host H since HH:MM; wait for it, or <advice>`)
    before anything is written when another live driver holds it.
    """
    folder = str(folder)
    if "://" in folder and not folder.startswith("file://"):
        import pyarrow.fs as pafs

        fs, root = pafs.FileSystem.from_uri(folder)
        fs.create_dir(root, recursive=True)
        lease = Lease(fs, f"{root.rstrip('/')}/{LEASE_FILE}", label, advice)
        lease.acquire(out)
        try:
            yield
        finally:
            lease.release()
        return
    path = Path(folder.removeprefix("file://")).resolve() / LOCK_FILE
    created = _first_missing(path.parent)
    _acquire_local(path, label, advice, out)
    try:
        yield
    except BaseException:
        _release_local(path)
        # A command refused before any work (tracking unreachable, bad input) leaves nothing behind: the
        # folders this lock created hold nothing but the lock file.
        if created is not None and all(p == path or p.is_dir() for p in created.rglob("*")):
            import shutil

            shutil.rmtree(created, ignore_errors=True)
        raise
    else:
        _release_local(path)


def _first_missing(folder: Path) -> Optional[Path]:
    """The outermost folder on the way to `folder` that does not exist yet (None: it exists)."""
    missing = None
    while not folder.exists():
        missing, folder = folder, folder.parent
    return missing


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """A blocking exclusive flock on `path` (created if missing) for a short critical section between
    processes, e.g. the first use of a shared SQLite store."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(str(path), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

"""A run folder's last k checkpoints: atomic writes with a recorded checksum, resume from the newest intact
one, and a clean stop when the disk fills up while writing.

Layout of `<run>/checkpoints/` (`updetr debug`):

    step_00000030.pt          one file per kept checkpoint: the newest `schedule.keep_checkpoints` by step
    step_00000030.pt.sha256   its SHA-256 and size, written before the checkpoint appears under its name
    last.pt                   the newest one (a hard link, so no extra space; a copy where links are refused)

A checkpoint is trusted only when its bytes match the recorded checksum and it loads in full
(`weights_only=True`). A damaged newest one (a truncated copy, a disk that filled up outside updetr) is moved
aside as `*.damaged` and the run resumes from the newest intact one. A write that runs out of space removes
its temporary file, so the previous checkpoint stays as it was, and stops the run with `DiskFullError`.
"""
from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from updetr.checkpoint import CheckpointError, UnsafeCheckpointError, load_checkpoint

LAST = "last.pt"
SUFFIX_SUM = ".sha256"
SUFFIX_DAMAGED = ".damaged"
_STEP_FILE = re.compile(r"^step_(\d{8,})\.pt$")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(CheckpointError):
    """The disk filled up while a checkpoint was written; the message names the path and the free space."""


def step_file(folder: Path, step: int) -> Path:
    return Path(folder) / f"step_{int(step):08d}.pt"


def kept(folder: Path) -> list[tuple[int, Path]]:
    """`[(step, path), ...]` of the step files in `folder`, newest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_FILE.match(p.name))]
    return sorted(found, reverse=True)


def _human(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _sha256(path: Path) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


class _Recording:
    """A file object that remembers the first OSError of a write: torch's zip writer turns it into a
    RuntimeError without the errno, which is what tells a full disk from other failures."""

    def __init__(self, f) -> None:
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.f.flush()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(str(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _is_disk_full(err: BaseException, recorded: Optional[OSError]) -> bool:
    for e in (recorded, err):
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            return True
    return False


def _disk_full(target: Path, folder: Path) -> DiskFullError:
    free = shutil.disk_usage(folder).free
    previous = kept(folder)
    before = (f"the previous checkpoint {previous[0][1].name} (step {previous[0][0]}) is intact" if previous
              else "no earlier checkpoint was written")
    return DiskFullError(f"disk full while writing checkpoint {target} ({_human(free)} free on "
                         f"{folder}); {before}: free some space, then run the same command to continue")


def _write_bytes_atomically(folder: Path, name: str, write) -> Path:
    """`write(file)` into a temp file in `folder`, fsync, rename to `name`; ENOSPC -> DiskFullError."""
    target = folder / name
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    rec = None
    try:
        with os.fdopen(fd, "wb") as f:
            rec = _Recording(f)
            write(rec)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if _is_disk_full(e, rec.error if rec is not None else None):
            raise _disk_full(target, folder) from None
        raise
    return target


def save(ckpt: dict, folder: str | os.PathLike, keep: int = 2) -> Path:
    """Write `ckpt` as `step_<step>.pt` with its checksum, point `last.pt` at it, keep the newest `keep`.

    Raises DiskFullError when the disk fills up (the files written before stay as they were)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = step_file(folder, ckpt["step"])
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    rec = None
    try:
        with os.fdopen(fd, "wb") as f:
            rec = _Recording(f)
            torch.save(ckpt, rec)
            f.flush()
            os.fsync(f.fileno())
        digest, size = _sha256(Path(tmp))  # what reached the disk, read back
        # The checksum exists before the checkpoint appears under its name: a file without one is a
        # checkpoint of an older updetr or one cut off at this instant, and is then checked by a full load.
        _write_bytes_atomically(folder, target.name + SUFFIX_SUM,
                                lambda g: g.write(f"{digest}  {size}\n".encode()))
        os.replace(tmp, target)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, DiskFullError):
            raise
        if _is_disk_full(e, rec.error if rec is not None else None):
            raise _disk_full(target, folder) from None
        raise
    point_last(folder, target)
    for _, old in kept(folder)[max(int(keep), 1):]:
        old.unlink(missing_ok=True)
        Path(str(old) + SUFFIX_SUM).unlink(missing_ok=True)
    _fsync_dir(folder)
    return target


def point_last(folder: Path, target: Path) -> None:
    """`last.pt` -> `target`, replaced atomically (a hard link; a copy where the filesystem refuses links)."""
    tmp = folder / f".{LAST}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    try:
        os.link(target, tmp)
    except OSError:
        def copy(g) -> None:
            with open(target, "rb") as f:
                shutil.copyfileobj(f, g, 1 << 20)

        _write_bytes_atomically(folder, tmp.name, copy)
    os.replace(tmp, folder / LAST)


def verify(path: Path) -> tuple[Optional[str], Optional[dict]]:
    """`(None, checkpoint)` when `path` matches its recorded checksum (if any) and loads in full, else
    `(why not, None)` (short)."""
    recorded = Path(str(path) + SUFFIX_SUM)
    if recorded.is_file():
        try:
            want_sum, want_size = recorded.read_text().split()
        except ValueError:
            want_sum, want_size = "", "0"
        got_sum, got_size = _sha256(path)
        if got_sum != want_sum:
            if str(got_size) != want_size:
                how = "cut short" if got_size < int(want_size or 0) else "grown"
                return f"{how}: {got_size} bytes of the {want_size} recorded when it was written", None
            return "its checksum differs from the one recorded when it was written", None
    try:
        return None, load_checkpoint(path)
    except UnsafeCheckpointError:
        # Not damage: someone put a file here that runs code. Stop rather than move it aside and resume
        # from an older checkpoint as if nothing happened.
        raise
    except CheckpointError as e:
        text = " ".join(str(e).split())
        return text.removeprefix(f"{path}: ")[:200], None


@dataclass
class Resume:
    path: Optional[Path]                      # the newest intact checkpoint (None: nothing to resume)
    ckpt: Optional[dict]
    damaged: list[tuple[Path, str]] = field(default_factory=list)
    last_damaged: bool = False                # `last.pt` was one of the damaged files (a link to it)


def newest_intact(folder: str | os.PathLike) -> Resume:
    """The newest checkpoint of `folder` that is intact; damaged newer ones are moved aside (`*.damaged`)
    and listed. A folder of an older updetr (only `last.pt`) is read as one checkpoint."""
    folder = Path(folder)
    candidates = [p for _, p in kept(folder)]
    if not candidates and (folder / LAST).is_file():
        candidates = [folder / LAST]
    out = Resume(None, None)
    for path in candidates:
        reason, ckpt = verify(path)
        if reason is None:
            out.path, out.ckpt = path, ckpt
            break
        out.damaged.append((path, reason))
        last = folder / LAST
        out.last_damaged = out.last_damaged or (last.exists() and os.path.samefile(path, last))
    if out.path is not None:
        for path, _ in out.damaged:
            os.replace(path, str(path) + SUFFIX_DAMAGED)
            Path(str(path) + SUFFIX_SUM).unlink(missing_ok=True)
        if out.damaged and out.path.name != LAST:
            point_last(folder, out.path)
    return out


def clear(folder: str | os.PathLike) -> None:
    """Remove the kept checkpoints and `last.pt` (`--overwrite`: the run starts again from step 0)."""
    folder = Path(folder)
    for _, path in kept(folder):
        path.unlink(missing_ok=True)
        Path(str(path) + SUFFIX_SUM).unlink(missing_ok=True)
    (folder / LAST).unlink(missing_ok=True)

"""Finding and stopping processes by what they are (a Ray temp dir on their command line, a process group),
never by name: other people's Ray instances may run on the same host."""
from __future__ import annotations

import os
import signal


def own_processes(folder: str) -> list:
    """Processes whose command line names a path under `folder` (a Ray temp dir), plus their descendants."""
    import psutil

    marker = folder.rstrip("/") + "/"
    roots = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if proc.pid != os.getpid() and any(marker in part for part in (proc.info["cmdline"] or [])):
                roots.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    seen = {p.pid: p for p in roots}
    for proc in roots:
        try:
            for child in proc.children(recursive=True):
                seen.setdefault(child.pid, child)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return list(seen.values())


def kill_processes(procs: list, grace_s: float = 5.0, hard: bool = False) -> int:
    """SIGTERM, then SIGKILL after `grace_s` whatever is left (`hard`: SIGKILL at once); returns how many
    were signalled. Returns once all are gone (or after another `grace_s`: a zombie of someone else's)."""
    import psutil

    alive = list(procs)
    if not hard:
        for proc in procs:
            try:
                proc.send_signal(signal.SIGTERM)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    psutil.wait_procs(alive, timeout=max(grace_s, 2.0))
    return len(procs)


def process_group(pgid: int) -> list:
    """The live processes of process group `pgid`."""
    import psutil

    out = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.pid != os.getpid() and os.getpgid(proc.pid) == pgid:
                out.append(proc)
        except (psutil.NoSuchProcess, ProcessLookupError):
            continue
    return out

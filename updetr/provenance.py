"""Where the running code comes from: the one git SHA lookup shared by checkpoints and tracking.

`git_info()` asks git once per process (cached): the engine writes a checkpoint every K steps and must not
shell out each time. A copy without `.git` (a Ray Job's uploaded working dir, a wheel) falls back to
`$UPDETR_GIT_SHA` / `$UPDETR_GIT_DIRTY`, which `updetr submit` sets from the submitting checkout.
"""
from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path
from typing import Optional

PACKAGE_DIR = Path(__file__).resolve().parent
UNKNOWN = "unknown"


@functools.lru_cache(maxsize=8)
def _ask_git(where: str) -> Optional[tuple[str, str]]:
    try:
        sha = subprocess.run(["git", "-C", where, "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5).stdout.strip()
        if sha:
            dirty = subprocess.run(["git", "-C", where, "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            return sha, "true" if dirty else "false"
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def git_info(path: str | Path | None = None) -> dict[str, str]:
    """`{"sha": ..., "dirty": "true"|"false"}` of the repo holding `path` (default: this package).

    Asked once per process and folder. Without a git checkout: `$UPDETR_GIT_SHA` / `$UPDETR_GIT_DIRTY`,
    else "unknown".
    """
    found = _ask_git(str(Path(path) if path is not None else PACKAGE_DIR))
    if found is not None:
        return {"sha": found[0], "dirty": found[1]}
    return {"sha": os.environ.get("UPDETR_GIT_SHA", UNKNOWN), "dirty": os.environ.get("UPDETR_GIT_DIRTY", UNKNOWN)}


def git_sha() -> Optional[str]:
    """The SHA recorded in checkpoints: `git_info()["sha"]`, None when unknown."""
    sha = git_info()["sha"]
    return None if sha == UNKNOWN else sha

"""Where the running code comes from: the one git SHA lookup shared by checkpoints and tracking, and the
software environment (`environment_info`) logged with every run.

`git_info()` asks git once per process (cached): the engine writes a checkpoint every K steps and must not
shell out each time. A copy without `.git` (a Ray Job's uploaded working dir, a wheel) falls back to
`$UPDETR_GIT_SHA` / `$UPDETR_GIT_DIRTY`, which `updetr submit` sets from the submitting checkout.
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

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


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


def environment_info(device: Any = None) -> dict[str, str]:
    """Software versions and accelerator of this process (torch, ray, mlflow, CUDA, device)."""
    info = {"python": sys.version.split()[0], "torch": _version("torch"), "ray": _version("ray"),
            "mlflow": _version("mlflow"), "torchvision": _version("torchvision")}
    try:
        import torch

        info["torch"] = torch.__version__  # with the build tag (+cu132, +cpu)
        info["cuda"] = str(torch.version.cuda)
        info["cuda_available"] = str(torch.cuda.is_available())
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_count"] = str(torch.cuda.device_count())
            info["cudnn"] = str(torch.backends.cudnn.version())
    except Exception:  # noqa: BLE001 - informational only
        pass
    if device is not None:
        info["device"] = str(device)
    return info

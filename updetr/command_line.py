"""What every subcommand module shares: how to name the updetr command in a printed hint, the one-line
error (no traceback), and which exceptions count as bad input. `updetr/cli.py` and the areas' `commands`
modules import these from here, so nothing has to import the CLI itself."""
from __future__ import annotations

import os
import shutil
import sys


def cli_command() -> str:
    """How to call updetr in a printed hint: `updetr` when that is on PATH and is this installation, else
    this interpreter's `python -m updetr` (e.g. an unactivated venv)."""
    found = shutil.which("updetr")
    mine = os.path.join(os.path.dirname(sys.executable), "updetr")
    if found and (os.path.realpath(found) == os.path.realpath(mine) or not os.path.exists(mine)):
        return "updetr"
    if os.path.exists(mine):
        return mine
    return f"{sys.executable} -m updetr"


def fail(message: str, code: int = 2) -> int:
    """Print a one-line-per-cause error (no traceback) and return the exit code."""
    print(f"updetr: error: {message}", file=sys.stderr)
    return code


def user_errors() -> tuple[type, ...]:
    """Exceptions that mean bad input or an unusable environment: one line, exit 2, no traceback."""
    from updetr.checkpoint import CheckpointError
    from updetr.config import ConfigError
    from updetr.data.preflight import DataSourceError
    from updetr.eval import EvalError
    from updetr.local import RunDirError
    from updetr.tasks.detect import DatasetError
    from updetr.tracking import TrackingError

    return ConfigError, CheckpointError, RunDirError, DatasetError, EvalError, TrackingError, DataSourceError

"""The one way updetr reads a torch file: `torch.load(weights_only=True)` with a fixed, minimal allowlist.

A `.pth` is a pickle, and a pickle can name any importable callable to run while it loads (`__reduce__`):
a downloaded "checkpoint" could run a shell command on every worker that loads it. `weights_only=True`
makes torch's restricted unpickler refuse every global outside its tensor / container set, so nothing
but data is built. The only global added here is `argparse.Namespace`: official DETR / UP-DETR
checkpoints store their command line under `args` as one (torchvision and SwAV weights are plain
state_dicts and need nothing extra). A Namespace's `__setstate__` only fills attributes, it runs nothing.

A file that needs anything else is refused in one line naming the file and the global it asked for.
"""
from __future__ import annotations

import argparse
import pickle
import re
from pathlib import Path
from typing import Any

import torch

# Exactly what official files need; adding to it widens what a weights file may construct.
ALLOWED_GLOBALS: tuple[type, ...] = (argparse.Namespace,)

# torch's restricted unpickler names the refused global as "GLOBAL module.name" in its messages.
_GLOBAL = re.compile(r"GLOBAL\s+([\w.]+)")


class UnsafeWeightsError(ValueError):
    """A torch file that asks to build something outside the allowlist; the message is one line."""


def refused_global(err: BaseException) -> str | None:
    """The global torch's weights-only unpickler refused in `err` (None: another kind of failure)."""
    match = _GLOBAL.search(str(err))
    return match.group(1) if match else None


def safe_torch_load(path: str | Path, map_location: Any = "cpu", what: str = "") -> Any:
    """`torch.load(path, weights_only=True)` with `ALLOWED_GLOBALS`; refusals raise UnsafeWeightsError.

    `what` prefixes the message (e.g. the config field the path came from). Other read errors (truncated
    file, not a torch file) propagate unchanged for the caller to word.
    """
    with torch.serialization.safe_globals(list(ALLOWED_GLOBALS)):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            name = refused_global(e)
            if name is None:
                raise
            prefix = f"{what}: " if what else ""
            raise UnsafeWeightsError(
                f"{prefix}{path}: refused to load, the file asks to run or build '{name}', which is not a "
                f"tensor, a container or argparse.Namespace (a pickle can run code while it loads); re-save "
                f"only its state_dict with torch.save in an environment you trust, or use another file"
            ) from None

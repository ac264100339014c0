"""Import a module of the official code in ../shared/reference/<repo> for a test, without leaving its
top-level packages (`models`, `util`, `datasets`) in sys.modules for other tests (both official repos use
the same names)."""
from __future__ import annotations

import importlib
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"


@contextmanager
def official(repo: str):
    """`with official("up-detr") as load: mod = load("models.segmentation")`; skips when the code is absent."""
    root = REFERENCE / repo
    if not root.is_dir():
        pytest.skip(f"official code not found at {root}")
    before = set(sys.modules)
    sys.path.insert(0, str(root))
    try:
        yield importlib.import_module
    finally:
        sys.path.remove(str(root))
        for name in set(sys.modules) - before:
            if name.split(".")[0] in ("models", "util", "datasets", "engine", "main", "detr_main"):
                del sys.modules[name]

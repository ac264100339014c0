"""Suite-wide: the index of tracking spools (updetr/tracking_spool.py) lives in a folder of this test session,
not in the user's state folder; subprocesses inherit it through the environment."""
from __future__ import annotations

import os
import tempfile

import pytest


@pytest.fixture(scope="session", autouse=True)
def _own_state_dir():
    with tempfile.TemporaryDirectory(prefix="updetr-state-") as folder:
        old = os.environ.get("UPDETR_STATE_DIR")
        os.environ["UPDETR_STATE_DIR"] = folder
        yield folder
        if old is None:
            os.environ.pop("UPDETR_STATE_DIR", None)
        else:
            os.environ["UPDETR_STATE_DIR"] = old

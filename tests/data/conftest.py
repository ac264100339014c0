"""Shared fixtures for the data tests: small configs and on-disk image folders."""
from __future__ import annotations

import pytest

from updetr.config import load_config


def make_cfg(*overrides: str):
    """ExperimentConfig with small, fast data settings plus dotted overrides."""
    base = ["data.batch_size=4", "data.num_workers=0", "data.synthetic_images=12",
            "data.synthetic_size=[40,64]", "pretext.scales=[64,80]", "pretext.max_size=100",
            "pretext.patch_size=32",
            # Most data tests compare every sample across paths; the short last batch is kept for that
            # (drop_last has its own tests).
            "data.drop_last=false"]
    return load_config(None, base + list(overrides))


@pytest.fixture
def cfg_factory():
    """`cfg_factory(*overrides)` -> small ExperimentConfig (see `make_cfg`)."""
    return make_cfg

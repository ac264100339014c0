"""A run that loses a node says so and stops after `ray.resource_wait_s`, checkpoints intact: a real
two-node local Ray, the worker node killed by process id (`local-cluster stop-node --hard`) after the
first registered checkpoint. STRICT_SPREAD needs both nodes, so the retried worker group cannot be placed."""
from __future__ import annotations

import re

import pytest

from updetr.checkpoint import load_checkpoint

from .node_drill import lose_a_node_mid_run
from .test_run import run_dir_of

pytestmark = [pytest.mark.slow, pytest.mark.ray]


@pytest.mark.timeout(900)
def test_node_lost_mid_run_is_reported_and_the_run_stops_with_its_checkpoints(tmp_path):
    proc = lose_a_node_mid_run(tmp_path, "data.preprocess_cpus=0.5", "schedule.max_steps=400",
                               "ray.resource_wait_s=50")
    out = (tmp_path / "run.log").read_text()
    assert proc.returncode != 0, out[-3000:]
    waits = [ln for ln in out.splitlines() if ln.startswith("[smoke] waiting ")]
    assert waits, out[-3000:]
    assert "for resources: 2 worker(s) x 0.5 CPU (STRICT_SPREAD); the cluster has now 1 node(s)" in waits[0]
    last = out.strip().splitlines()[-1]
    assert last.startswith("updetr: error: training stopped: waited ") and "(ray.resource_wait_s=50)" in last
    assert "checkpoints kept in" in last and "re-run the same command once the cluster has room" in last
    assert "Traceback" not in out
    step = int(re.search(r"last at step (\d+)", last).group(1))
    kept = sorted(d for d in run_dir_of(tmp_path).glob("checkpoint_*") if d.is_dir())
    assert load_checkpoint(kept[-1] / "checkpoint.pt")["step"] == step >= 4

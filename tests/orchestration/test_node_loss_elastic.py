"""An elastic run (`ray.min_workers`) that loses a node goes on with the workers that are left: the drill of
`node_drill.py` (a real two-node local Ray, the worker node killed by process id after the first registered
checkpoint); a worker fills most of a node, so only one worker can be placed after."""
from __future__ import annotations

import re

import pytest

from updetr.checkpoint import load_checkpoint

from .node_drill import lose_a_node_mid_run
from .test_run import run_dir_of

pytestmark = [pytest.mark.slow, pytest.mark.ray]


@pytest.mark.timeout(900)
def test_an_elastic_run_goes_on_with_fewer_workers_after_a_node_loss(tmp_path):
    # Ray Train 2.60 sizes an elastic group by what each node can hold, not by the placement strategy: a
    # worker takes 0.75 of a node's CPU, so a 1-CPU node holds one, and 0.25 is left for preprocessing.
    # The run goes to the end of the smoke recipe (5 epochs). A node loss can count as two or three failures
    # (the worker's death, then Ray's verdict on the node's other actors once its heartbeats stop), so the
    # drill allows five, as the docs advise for elastic runs.
    proc = lose_a_node_mid_run(tmp_path, "ray.min_workers=1", "ray.cpus_per_worker=0.75",
                               "data.preprocess_cpus=0.25", "ray.resource_wait_s=300", "ray.max_failures=5")
    out = (tmp_path / "run.log").read_text()
    assert proc.returncode == 0, out[-3000:]
    assert "[smoke] rank 0/2 on cpu: training from step 0" in out
    resumed = re.search(r"\[smoke\] rank 0/1 on cpu: training resumed from step (\d+)", out)
    assert resumed and int(resumed.group(1)) >= 4, out[-3000:]
    assert "resuming with 1 worker(s) instead of 2: the global batch size changes from 4 to 2" in out
    assert "resources found after" in out  # the wait in between was reported
    assert "Traceback" not in out
    kept = sorted(d for d in run_dir_of(tmp_path).glob("checkpoint_*") if d.is_dir())
    last = load_checkpoint(kept[-1] / "checkpoint.pt")
    finished = re.search(r"finished at step (\d+) \(epoch 5\)", out)
    assert finished and last["step"] == int(finished.group(1)) and last["epoch"] == 5, out[-2000:]
    assert len(last["rng"]["per_rank"]) == 1  # written by the one worker left

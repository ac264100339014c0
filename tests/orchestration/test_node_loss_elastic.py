"""An elastic run (`ray.min_workers`) that loses a node goes on with the workers that are left: a real
two-node local Ray, the worker node killed by process id (`local-cluster stop-node --hard`) after the first
registered checkpoint; a worker fills most of a node, so only one worker can be placed after."""
from __future__ import annotations

import re
import shutil

import pytest

from updetr.checkpoint import load_checkpoint
from updetr.orchestration.local_cluster import cluster_processes, load

from .conftest import SMOKE, cli_env, short_tmpdir, stop_session, updetr, updetr_bg
from .test_run import registered_checkpoints, run_dir_of, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.ray]


@pytest.mark.timeout(900)
def test_an_elastic_run_goes_on_with_fewer_workers_after_a_node_loss(tmp_path):
    state = short_tmpdir("uel")
    r = updetr("local-cluster", "up", "--nodes", "2", "--dir", state, cwd=tmp_path, timeout=400)
    cluster = load(state)
    proc = None
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        # Ray Train 2.60 sizes an elastic group by what each node can hold, not by the placement strategy: a
        # worker takes 0.75 of a node's CPU, so a 1-CPU node holds one, and 0.25 is left for preprocessing.
        # The run goes to the end of the smoke recipe (5 epochs).
        args = ["run", SMOKE, "--address", cluster.address, "ray.placement_strategy=STRICT_SPREAD",
                "ray.min_workers=1", "ray.cpus_per_worker=0.75", "data.preprocess_cpus=0.25",
                "schedule.checkpoint_every=4", "schedule.log_every=2", "ray.resource_wait_s=300",
                f"ray.storage_path={tmp_path}/ckpt", "tracking.enabled=false"]
        proc = updetr_bg(*args, cwd=tmp_path, env=cli_env(RAY_AUTH_MODE="token"), log=tmp_path / "run.log")

        def registered():
            assert proc.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
            return registered_checkpoints(run_dir_of(tmp_path))
        wait_for(registered, 400, what="a registered checkpoint")
        r = updetr("local-cluster", "stop-node", "--node", "1", "--hard", "--dir", state, cwd=tmp_path)
        assert r.returncode == 0 and "node 1 killed" in r.stdout, r.stdout + r.stderr
        proc.wait(timeout=600)
        out = (tmp_path / "run.log").read_text()
        assert proc.returncode == 0, out[-3000:]
        assert "[smoke] rank 0/2 on cpu: training from step 0" in out
        resumed = re.search(r"\[smoke\] rank 0/1 on cpu: training resumed from step (\d+)", out)
        assert resumed and int(resumed.group(1)) >= 4, out[-3000:]
        assert "resuming with 1 worker(s) instead of 2: the global batch size changes from 4 to 2" in out
        assert "Traceback" not in out
        assert "resources found after" in out  # the wait in between was reported
        kept = sorted(d for d in run_dir_of(tmp_path).glob("checkpoint_*") if d.is_dir())
        last = load_checkpoint(kept[-1] / "checkpoint.pt")
        finished = re.search(r"finished at step (\d+) \(epoch 5\)", out)
        assert finished and last["step"] == int(finished.group(1)) and last["epoch"] == 5, out[-2000:]
        assert len(last["rng"]["per_rank"]) == 1  # written by the one worker left
    finally:
        if proc is not None:
            stop_session(proc)
        updetr("local-cluster", "down", "--dir", state, cwd=tmp_path, timeout=120)
        assert not cluster_processes(state)
        shutil.rmtree(state, ignore_errors=True)

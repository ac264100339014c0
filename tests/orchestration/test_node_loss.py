"""A run that loses a node says so and stops after `ray.resource_wait_s`, checkpoints intact: a real
two-node local Ray, the worker node killed by process id (`local-cluster stop-node --hard`) after the
first registered checkpoint. STRICT_SPREAD needs both nodes, so the retried worker group cannot be placed."""
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
def test_node_lost_mid_run_is_reported_and_the_run_stops_with_its_checkpoints(tmp_path):
    state = short_tmpdir("unl")
    r = updetr("local-cluster", "up", "--nodes", "2", "--dir", state, cwd=tmp_path, timeout=400)
    cluster = load(state)
    proc = None
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        args = ["run", SMOKE, "--address", cluster.address, "ray.placement_strategy=STRICT_SPREAD",
                "data.preprocess_cpus=0.5", "schedule.max_steps=400", "schedule.checkpoint_every=4",
                "schedule.log_every=2", "ray.resource_wait_s=50", f"ray.storage_path={tmp_path}/ckpt",
                "tracking.enabled=false"]
        proc = updetr_bg(*args, cwd=tmp_path, env=cli_env(RAY_AUTH_MODE="token"), log=tmp_path / "run.log")

        def registered():
            assert proc.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
            return registered_checkpoints(run_dir_of(tmp_path))
        wait_for(registered, 400, what="a registered checkpoint")
        r = updetr("local-cluster", "stop-node", "--node", "1", "--hard", "--dir", state, cwd=tmp_path)
        assert r.returncode == 0 and "node 1 killed" in r.stdout, r.stdout + r.stderr
        proc.wait(timeout=400)
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
    finally:
        if proc is not None:
            stop_session(proc)
        updetr("local-cluster", "down", "--dir", state, cwd=tmp_path, timeout=120)
        assert not cluster_processes(state)
        shutil.rmtree(state, ignore_errors=True)

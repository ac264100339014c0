"""The node-loss drill both node-loss tests run: a real two-node local Ray (`local-cluster up --nodes 2`), the
smoke run on it with STRICT_SPREAD, its worker node killed by process id (`stop-node --hard`) once the run
has registered a checkpoint, then the run left to end; the cluster is always taken down."""
from __future__ import annotations

import shutil
import subprocess
from contextlib import contextmanager

from updetr.orchestration.local_cluster import cluster_processes, load

from .conftest import SMOKE, cli_env, short_tmpdir, stop_session, updetr, updetr_bg
from .test_run import registered_checkpoints, run_dir_of, wait_for


@contextmanager
def two_node_cluster(tmp_path, prefix: str, up_timeout: float = 400):
    """A real two-node local Ray (`local-cluster up --nodes 2`) in a short folder named `prefix*`; yields
    (its state folder, its `load`ed description); always taken down, with no process left behind."""
    state = short_tmpdir(prefix)
    r = updetr("local-cluster", "up", "--nodes", "2", "--dir", state, cwd=tmp_path, timeout=up_timeout)
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        yield state, load(state)
    finally:
        updetr("local-cluster", "down", "--dir", state, cwd=tmp_path, timeout=120)
        assert not cluster_processes(state)
        shutil.rmtree(state, ignore_errors=True)


def lose_a_node_mid_run(tmp_path, *overrides: str) -> subprocess.Popen:
    """Run the drill with the run's extra `overrides`; returns the finished run's process (its output is in
    `tmp_path / "run.log"`, its checkpoints under `tmp_path / "ckpt"`)."""
    with two_node_cluster(tmp_path, "unl") as (state, cluster):
        proc = None
        try:
            args = ["run", SMOKE, "--address", cluster.address, "ray.placement_strategy=STRICT_SPREAD",
                    "schedule.checkpoint_every=4", "schedule.log_every=2", f"ray.storage_path={tmp_path}/ckpt",
                    "tracking.enabled=false", *overrides]
            proc = updetr_bg(*args, cwd=tmp_path, env=cli_env(RAY_AUTH_MODE="token"), log=tmp_path / "run.log")

            def registered():
                assert proc.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
                return registered_checkpoints(run_dir_of(tmp_path))
            wait_for(registered, 400, what="a registered checkpoint")
            r = updetr("local-cluster", "stop-node", "--node", "1", "--hard", "--dir", state, cwd=tmp_path)
            assert r.returncode == 0 and "node 1 killed" in r.stdout, r.stdout + r.stderr
            proc.wait(timeout=600)
            return proc
        finally:
            if proc is not None:
                stop_session(proc)

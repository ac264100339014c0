"""`updetr submit` to a local two-node Ray cluster (head + worker node, 1 CPU each), Jobs API wrappers."""
from __future__ import annotations

import re
import shutil
import time

import pytest

import ray

from updetr.orchestration.job_tags import TAG_ADDRESS, TAG_JOB_ID, TAG_NODES, TAG_VERSION
from updetr.orchestration.local_cluster import cluster_processes, load
from updetr.tracking import TAG_STORAGE

from .conftest import SMOKE, cli_env, short_tmpdir, updetr
from .test_bad_input import one_error_line

pytestmark = [pytest.mark.slow, pytest.mark.ray]


@pytest.mark.timeout(600)
def test_submit_to_local_two_node_cluster(mlflow_server, tmp_path):
    state = short_tmpdir("urc")
    r = updetr("local-cluster", "up", "--dir", state, cwd=tmp_path, timeout=180)
    cluster = load(state)
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        url = cluster.dashboard_url
        assert url in r.stdout and cluster.address in r.stdout
        assert "local-cluster down --dir" in r.stdout

        # a rejected token is one clear line, not a traceback
        bad = cli_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="f" * 32)
        one_error_line(updetr("jobs", "status", "nope", "--address", url, cwd=tmp_path, env=bad), "rejected")

        job_id = f"updetr-test-{int(time.time())}"
        # one training worker per node; 0.5 CPU each leaves room for the preprocessing actor and reads
        r = updetr("submit", SMOKE, "--address", url, "--follow", "--job-id", job_id,
                   "ray.placement_strategy=STRICT_SPREAD", "data.preprocess_cpus=0.5",
                   "schedule.max_steps=8", "schedule.checkpoint_every=4", "schedule.log_every=2",
                   f"ray.storage_path={tmp_path}/ckpt", f"tracking.uri={mlflow_server.uri}",
                   cwd=tmp_path, timeout=480)
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
        assert f"submitted job {job_id}" in r.stdout
        assert "finished at step 8" in r.stdout  # the job's own logs, streamed back
        assert f"job {job_id}: SUCCEEDED" in r.stdout
        r_follow = r.stdout + r.stderr

        r = updetr("jobs", "status", job_id, "--address", url, cwd=tmp_path)
        assert r.returncode == 0 and f"{job_id}: SUCCEEDED" in r.stdout
        r = updetr("jobs", "list", "--address", url, cwd=tmp_path)
        assert r.returncode == 0 and re.search(rf"^{job_id}\s+SUCCEEDED\s+started ", r.stdout, re.M), r.stdout
        r = updetr("jobs", "logs", job_id, "--address", url, cwd=tmp_path)
        assert r.returncode == 0 and "finished at step 8" in r.stdout
        r = updetr("jobs", "stop", job_id, "--address", url, cwd=tmp_path)
        assert r.returncode == 0 and "not running" in r.stdout

        # checkpoints in the shared storage, and the run tracked in the shared server
        assert len(list((tmp_path / "ckpt").glob("smoke-*/checkpoint_00000008"))) == 1
        runs = [x for x in mlflow_server.runs("smoke") if x.data.tags.get(TAG_STORAGE, "").startswith(str(tmp_path))]
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        assert runs[0].data.params["ray.placement_strategy"] == "STRICT_SPREAD"
        # the run names the job and the cluster it came from; status and compare find it by the job
        tags = runs[0].data.tags
        assert tags[TAG_JOB_ID] == job_id and tags[TAG_NODES] == "2" and tags[TAG_VERSION] == ray.__version__
        assert tags[TAG_ADDRESS].endswith(f":{cluster.gcs_port}") and "@" not in tags[TAG_ADDRESS]
        r = updetr("jobs", "status", job_id, "--address", url, cwd=tmp_path)
        assert r.returncode == 0 and f"mlflow: run {runs[0].info.run_id} (" in r.stdout, r.stdout + r.stderr
        r = updetr("compare", "--tag", f"{TAG_JOB_ID}={job_id}", "--metric", "loss", "--no-plots",
                   "--tracking-uri", mlflow_server.uri,
                   cwd=tmp_path)
        assert r.returncode == 0 and runs[0].info.run_name in r.stdout, r.stdout + r.stderr
        # following the job showed the run's lines, not Ray's packaging / runtime-env set-up or MLflow's links
        assert "Uploading package" not in r_follow and "Runtime env is setting up" not in r_follow
        assert "View run" not in r_follow and "worker processes have been started" not in r_follow

        # a sweep: validated here, shipped with the experiment file it names (a relative path), run as
        # `updetr sweep` on the cluster, tracked as the sweep's parent run with a child per trial
        (tmp_path / "sweeps").mkdir()
        shutil.copyfile(SMOKE, tmp_path / "smoke.yaml")
        name = f"subsw{tmp_path.name[-6:]}".replace("_", "")
        (tmp_path / "sweeps" / "sw.yaml").write_text(f"name: {name}\nexperiment: ../smoke.yaml\ngrid: {{seed: [3]}}\n"
                                                     "options: {workers_per_trial: 1}\n")
        r = updetr("submit", str(tmp_path / "sweeps" / "sw.yaml"), "--address", url, "--follow",
                   "data.preprocess_cpus=0.5", "schedule.max_steps=4", "schedule.log_every=2",
                   f"runtime.output_dir={tmp_path}/sw", f"ray.storage_path={tmp_path}/sw-ckpt",
                   f"tracking.uri={mlflow_server.uri}", cwd=tmp_path, timeout=300)
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
        assert f"(sweep {name}, 1 trials)" in r.stdout and "SUCCEEDED" in r.stdout
        assert f"sweep {name}: 1 trials in" in r.stdout and "finished at step 4" in r.stdout
        runs = mlflow_server.runs(name)
        parent = [x for x in runs if x.data.tags.get("updetr.sweep") == name]
        assert len(parent) == 1
        assert [x.info.run_name for x in runs if x.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id] \
            == [f"{name}-seed-3"]
    finally:
        r = updetr("local-cluster", "down", "--dir", state, cwd=tmp_path, timeout=120)
        assert r.returncode == 0, r.stderr
        assert not cluster_processes(state)  # ray.util.client.server included (was left behind)
        shutil.rmtree(state, ignore_errors=True)

"""What ties a run to its Ray Job: the submission id the driver reads from Ray's job config, addresses
without credentials, the run found by `jobs status` in a real MLflow server, and the follow filter."""
from __future__ import annotations

import io
import json

from updetr.orchestration.job_tags import (TAG_JOB_ID, job_runs_line, job_submission_id, tracking_uri_for_job,
                                           without_credentials)
from updetr.orchestration.jobs import FollowFilter


def test_submission_id_comes_from_the_job_config_ray_hands_the_driver(monkeypatch):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert job_submission_id() is None                                # not under a Ray Job
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(
        {"runtime_env": {}, "metadata": {"job_submission_id": "raysubmit_ab12", "job_name": "x"}}))
    assert job_submission_id() == "raysubmit_ab12"
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "not json")
    assert job_submission_id() is None


def test_addresses_and_tracking_uris_lose_their_credentials():
    assert without_credentials("10.0.0.5:6379") == "10.0.0.5:6379"
    assert without_credentials("ray://user:s3cret@head:10001") == "ray://head:10001"
    assert without_credentials("https://me:tok@mlflow.example:5000/x") == "https://mlflow.example:5000/x"
    assert tracking_uri_for_job("http://u:p@mlflow:5000") == "http://mlflow:5000"
    assert tracking_uri_for_job("sqlite:////srv/mlflow.db") == "sqlite:////srv/mlflow.db"
    assert tracking_uri_for_job("sqlite:///mlflow.db") is None         # relative: only on the head node
    assert tracking_uri_for_job(None) is None


def test_jobs_status_line_names_the_run_tagged_with_the_job(mlflow_server):
    client = mlflow_server.client()
    exp = client.get_experiment_by_name("jobtags") or client.get_experiment(client.create_experiment("jobtags"))
    exp_id = exp.experiment_id if hasattr(exp, "experiment_id") else exp
    run = client.create_run(exp_id, run_name="smoke-abc", tags={TAG_JOB_ID: "raysubmit_jt1"})
    line = job_runs_line("raysubmit_jt1", mlflow_server.uri)
    assert line == (f"  mlflow: run {run.info.run_id} (smoke-abc, RUNNING) in experiment 'jobtags' at "
                    f"{mlflow_server.uri}")
    assert "no run tagged updetr.ray.job_id=raysubmit_other" in job_runs_line("raysubmit_other", mlflow_server.uri)
    assert job_runs_line("x", "http://127.0.0.1:9").startswith("  mlflow: cannot read http://127.0.0.1:9")


def test_follow_filter_drops_routine_lines_across_chunk_boundaries(monkeypatch):
    monkeypatch.delenv("UPDETR_RAY_LOGS", raising=False)
    out = io.StringIO()
    f = FollowFilter(out)
    f.write("2026-01-01 INFO job_manager.py -- Runtime env is setting up.\n[smoke] step 2/8 | loss 1.0\n"
            "\U0001f3c3 View run smoke-1 at: http://127.0.0.1:5000/#/experiments/1/runs/ab\n(raylet) WARNING: 4 "
            "PYTHON worker processes have been started on node: n1 with address: 127.0.0.1. This could be a "
            "result of using a large number of actors\n[FailurePolicy] RETRY  Source: worker group\n[smo")
    f.write("ke] finished at step 8\n")
    f.close()
    assert out.getvalue() == ("[smoke] step 2/8 | loss 1.0\n[FailurePolicy] RETRY  Source: worker group\n"
                              "[smoke] finished at step 8\n")
    monkeypatch.setenv("UPDETR_RAY_LOGS", "all")
    out = io.StringIO()
    f = FollowFilter(out)
    f.write("Runtime env is setting up.\n")
    assert out.getvalue() == "Runtime env is setting up.\n"

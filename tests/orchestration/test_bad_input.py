"""Bad input to run / submit / jobs: one clear `updetr: error:` line, exit 2, before any work is done."""
from __future__ import annotations

import time

import pytest

from updetr.orchestration.local_cluster import free_port

from .conftest import SMOKE, updetr


def one_error_line(r, *needles: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("updetr: error: "), r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_unknown_experiment_field(tmp_path):
    r = updetr("run", SMOKE, "model.bogus=1", cwd=tmp_path)
    one_error_line(r, "model.bogus", "Extra inputs are not permitted")
    r = updetr("submit", SMOKE, "ray.bogus=1", "--address", "http://127.0.0.1:1", cwd=tmp_path)
    one_error_line(r, "ray.bogus")


def test_unreachable_address(tmp_path):
    port = free_port()
    t0 = time.monotonic()
    r = updetr("run", SMOKE, "--address", f"127.0.0.1:{port}", cwd=tmp_path)
    one_error_line(r, "cannot reach the Ray cluster", str(port))
    r = updetr("submit", SMOKE, "--address", f"http://127.0.0.1:{port}", cwd=tmp_path)
    one_error_line(r, "cannot reach the Ray cluster", str(port))
    r = updetr("jobs", "status", "some-job", "--address", f"127.0.0.1:{port}", cwd=tmp_path)
    one_error_line(r, "cannot reach the Ray cluster")
    r = updetr("run", SMOKE, "--address", "not-an-address", cwd=tmp_path)
    one_error_line(r, "HOST:PORT")
    assert time.monotonic() - t0 < 60


def test_storage_path_not_writable(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    r = updetr("run", SMOKE, f"ray.storage_path={blocker}/ray", cwd=tmp_path)
    one_error_line(r, "ray.storage_path", "not writable")


def test_tracking_server_down_at_start(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    r = updetr("run", SMOKE, f"tracking.uri={uri}", f"ray.storage_path={tmp_path}/ray", cwd=tmp_path)
    one_error_line(r, uri, "not reachable")
    assert time.monotonic() - t0 < 30
    assert "Ray" not in r.stdout  # nothing started: no local Ray, no workers
    assert not (tmp_path / "ray").exists() or not any((tmp_path / "ray").iterdir())


def test_tracking_store_not_writable(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    r = updetr("run", SMOKE, f"tracking.uri=sqlite:///{blocker}/mlflow.db", cwd=tmp_path)
    one_error_line(r, "not writable")


@pytest.mark.parametrize("args", [["jobs", "logs", "x"], ["submit", SMOKE]])
def test_no_address_for_jobs(tmp_path, args, monkeypatch):
    r = updetr(*args, cwd=tmp_path)
    one_error_line(r, "--address")


# ------------------------------------------------------------------ data sources and resources
def no_mlflow_run(folder) -> None:
    """No MLflow run was opened in the sqlite store under `folder` (a refusal must not leave FAILED runs)."""
    db = folder / "mlflow.db"
    if not db.exists():
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    assert not [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


@pytest.fixture
def bad_sources(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    (tmp_path / "no-manifest").mkdir()
    (tmp_path / "no-manifest" / "shard-000000.tar").write_bytes(b"")
    return [("folder", tmp_path / "missing", "not found"),
            ("folder", tmp_path / "empty", "no image files"),
            ("shards", tmp_path / "no-manifest", "no manifest.json")]


def test_bad_data_source_refused_before_ray_and_mlflow(tmp_path, bad_sources):
    for source, path, reason in bad_sources:
        t0 = time.monotonic()
        r = updetr("run", SMOKE, f"data.source={source}", f"data.path={path}", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                   f"ray.storage_path={tmp_path}/ray", cwd=tmp_path)
        line = one_error_line(r, str(path), reason)
        assert "re-run" not in line and "resume" not in line
        assert "local Ray" not in r.stdout and time.monotonic() - t0 < 30  # Ray never started
        no_mlflow_run(tmp_path)

        r = updetr("debug", SMOKE, f"data.source={source}", f"data.path={path}", f"runtime.output_dir={tmp_path}/runs",
                   cwd=tmp_path)
        one_error_line(r, str(path), reason)
        assert "parameters trainable" not in r.stdout  # refused before the model was built


def test_impossible_resource_request_refused_before_ray_starts(tmp_path):
    r = updetr("run", SMOKE, "ray.num_workers=64", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", cwd=tmp_path)
    one_error_line(r, "64 training worker(s)", "ray.num_workers")
    assert "local Ray" not in r.stdout
    no_mlflow_run(tmp_path)


def test_data_shard_of_an_empty_folder_writes_nothing(tmp_path):
    (tmp_path / "src").mkdir()
    r = updetr("data", "shard", str(tmp_path / "src"), str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode == 1 and "no image files" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()  # a manifest means a complete shard set


def test_sweep_tracking_server_down_at_start(tmp_path):
    import yaml

    uri = f"http://127.0.0.1:{free_port()}"
    sweep = tmp_path / "sw.yaml"
    sweep.write_text(yaml.safe_dump({"experiment": SMOKE, "grid": {"loss.bbox": [5.0, 2.0]}}))
    t0 = time.monotonic()
    r = updetr("sweep", str(sweep), f"tracking.uri={uri}", f"runtime.output_dir={tmp_path}/runs", cwd=tmp_path)
    one_error_line(r, uri, "not reachable")
    assert time.monotonic() - t0 < 60
    assert "at a time" not in r.stdout          # no Ray started, no trial planned on it
    assert not (tmp_path / "runs").exists()     # no run folder, no Tune state

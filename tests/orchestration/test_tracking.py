"""updetr.tracking against a real MLflow server: open / re-attach, params, artifacts, outages, URIs."""
from __future__ import annotations

import time
import pytest

from updetr import tracking as T
from updetr.orchestration.local_cluster import free_port



def test_uri_resolution_is_absolute(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert T.resolve_tracking_uri(None, tmp_path) == f"sqlite:///{tmp_path}/mlflow.db"
    assert T.resolve_tracking_uri("sqlite:///sub/x.db", tmp_path) == f"sqlite:///{tmp_path}/sub/x.db"
    assert T.resolve_tracking_uri("store.db", tmp_path) == f"sqlite:///{tmp_path}/store.db"
    assert T.resolve_tracking_uri("mlruns", tmp_path) == f"file://{tmp_path}/mlruns"
    assert T.resolve_tracking_uri("http://h:5000", tmp_path) == "http://h:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert T.resolve_tracking_uri(None, tmp_path) == "http://env:5000"
    assert T.flatten_params({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {"a.b": "1", "a.c": "[1, 2]", "d": "None"}


def test_null_tracker_is_silent():
    t = T.NullTracker()
    t.log_params({"a": 1})
    t.log_metrics({"loss": 1.0}, step=1)
    t.set_tags({"x": "y"})
    t.log_text("x", "a.txt")
    t.end()
    assert t.run_id is None and t.describe() == "tracking disabled"


def test_server_down_at_start_is_one_clear_error():
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(T.TrackingError) as e:
        T.start_tracking(True, uri, "exp", "run", "/tmp/store/run", {}, "")
    assert "not reachable" in str(e.value) and "\n" not in str(e.value)


def test_open_reattach_params_artifacts(mlflow_server):
    uri = mlflow_server.uri
    cfg = {"model": {"hidden_dim": 32}, "ray": {"num_workers": 2}}
    t1 = T.start_tracking(True, uri, "t-open", "r1", "/store/r1", cfg, "model: {hidden_dim: 32}\n")
    assert not t1.resumed
    t1.log_metrics({"loss": 2.0, "lr": 1e-4, "not_a_number": "x"}, step=1)
    # the same run name + storage re-attaches (a resumed run), a changed param is kept as a tag
    t2 = T.start_tracking(True, uri, "t-open", "r1", "/store/r1", {**cfg, "ray": {"num_workers": 1}}, "x\n")
    assert t2.run_id == t1.run_id and t2.resumed
    t2.log_metrics({"loss": 1.0}, step=2)
    t2.end()
    # another storage path is another run
    t3 = T.start_tracking(True, uri, "t-open", "r1", "/store2/r1", cfg, "x\n")
    assert t3.run_id != t1.run_id

    client = mlflow_server.client()
    run = client.get_run(t1.run_id)
    assert run.data.params["model.hidden_dim"] == "32" and run.data.params["ray.num_workers"] == "2"
    assert run.data.tags["updetr.param_override.ray.num_workers"] == "1"
    assert run.data.tags[T.TAG_RUN_NAME] == "r1" and run.data.tags[T.TAG_ATTEMPT] == "2"
    assert run.data.tags["updetr.env.torch"] and run.data.tags["mlflow.source.git.commit"]
    assert run.info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(t1.run_id, "loss")] == [2.0, 1.0]
    arts = {a.path for a in client.list_artifacts(t1.run_id, "config")}
    assert arts == {"config/resolved.yaml", "config/environment.txt"}
    assert len(mlflow_server.runs("t-open")) == 2


def test_outage_warns_once_keeps_and_delivers_in_order(mlflow_server, capsys):
    """Guard logic: a tracker whose server is gone never raises, warns once, keeps every write, and
    delivers them in order (each metric row once) when the server answers again."""
    from mlflow.tracking import MlflowClient

    live = T.start_tracking(True, mlflow_server.uri, "t-outage", "r", "/s/r", {"a": 1}, "a: 1\n")
    dead_uri = f"http://127.0.0.1:{free_port()}"
    t = T.MlflowTracker.attach(dead_uri, live.run_id, retry_interval_s=0.5)
    t0 = time.monotonic()
    for step in range(20):
        t.log_metrics({"loss": float(step)}, step=step)  # never raises
    t.set_tags({"x": "y"})
    t.set_tags({"x": "z"})
    assert time.monotonic() - t0 < 30
    assert t.errors >= 1 and len(t.pending) == 22 and not t.healthy
    assert capsys.readouterr().err.count("training continues") == 1
    # the server answers again (same run id): the kept writes go first, then the new one
    t.client, t.uri = MlflowClient(tracking_uri=mlflow_server.uri), mlflow_server.uri
    time.sleep(0.6)
    t.log_metrics({"loss": 99.0}, step=99)
    assert t.healthy and not t.pending and "is back" in capsys.readouterr().err
    t.flush(force=True)
    hist = mlflow_server.client().get_metric_history(t.run_id, "loss")
    assert sorted(m.step for m in hist) == [*range(20), 99]
    assert mlflow_server.client().get_run(t.run_id).data.tags["x"] == "z"  # the later value wins

"""Store and forward: a tracking server killed (SIGKILL, by pid) during a run loses nothing. Every step's
`loss` row, every epoch summary and every tag reaches MLflow exactly once: delivered when the server is
back mid-run, or kept in the run folder and delivered by `updetr tracking sync` / the next run on the store."""
from __future__ import annotations

import re
import signal

import pytest

from updetr import tracking as T
from updetr.tracking_spool import indexed_spools
from updetr.tracking_sync import spools_under

from .conftest import SMOKE, MlflowServer, cli_env, stop_session, updetr, updetr_bg, wait_for

STEPS, EPOCHS = 24, 3   # smoke: 8 steps per epoch
ARGS = [SMOKE, f"schedule.epochs={EPOCHS}", "schedule.log_every=1", "schedule.checkpoint_every=4", "--overwrite"]


def kill(server: MlflowServer) -> None:
    server.stop(signal.SIGKILL)


def last_step(log) -> int:
    steps = re.findall(r"step (\d+)/", log.read_text()) if log.exists() else []
    return int(steps[-1]) if steps else 0


def assert_complete(server: MlflowServer, experiment: str = "smoke"):
    """Every row exactly once (MLflow returns one row per stored (step, timestamp, value))."""
    client = server.client()
    (run,) = server.runs(experiment)
    loss = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in loss) == list(range(1, STEPS + 1)), sorted(m.step for m in loss)
    epochs = client.get_metric_history(run.info.run_id, "epoch/loss")
    assert sorted(m.step for m in epochs) == list(range(EPOCHS))
    lr = client.get_metric_history(run.info.run_id, "lr")
    assert len(lr) == STEPS
    assert run.data.tags["updetr.last_checkpoint_step"] == str(STEPS)
    assert run.info.status == "FINISHED"
    return run


@pytest.mark.timeout(900)
def test_server_killed_mid_run_every_row_arrives_once(tmp_path):
    server = MlflowServer(tmp_path).start()
    env = cli_env(UPDETR_TRACKING_RETRY_S="2")
    log = tmp_path / "debug.log"
    proc = updetr_bg("debug", *ARGS, f"tracking.uri={server.uri}", f"runtime.output_dir={tmp_path}/runs",
                     cwd=tmp_path, env=env, log=log)
    try:
        wait_for(lambda: last_step(log) >= 4 or proc.poll() is not None, 600, what="step 4")
        kill(server)
        killed_at = last_step(log)
        wait_for(lambda: last_step(log) >= killed_at + 4 or proc.poll() is not None, 600, what="4 steps more")
        server.start()  # the same port and SQLite store
        assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
        out = log.read_text()
        assert killed_at < STEPS - 4, "the run ended before the outage was over; nothing was tested"
        assert out.count("training continues, metrics, params and tags are kept") == 1
        assert "is back" in out and "not delivered yet" not in out
        assert_complete(server)
        assert spools_under(tmp_path / "runs") == []
    finally:
        stop_session(proc)
        server.stop()


@pytest.mark.timeout(900)
def test_server_away_at_the_end_then_tracking_sync(tmp_path):
    server = MlflowServer(tmp_path).start()
    env = cli_env(UPDETR_TRACKING_RETRY_S="2")
    log = tmp_path / "debug.log"
    run_dir = tmp_path / "runs" / "smoke"
    proc = updetr_bg("debug", *ARGS, f"tracking.uri={server.uri}", f"runtime.output_dir={tmp_path}/runs",
                     cwd=tmp_path, env=env, log=log)
    try:
        wait_for(lambda: last_step(log) >= 4 or proc.poll() is not None, 600, what="step 4")
        kill(server)
        assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
        notice = [line for line in log.read_text().splitlines() if "not delivered yet" in line]
        assert len(notice) == 1, log.read_text()[-3000:]
        (spool,) = spools_under(run_dir)
        assert str(spool) in notice[0] and f"tracking sync {run_dir}" in notice[0]
        assert spool in indexed_spools()

        server.start()
        r = updetr("tracking", "sync", str(run_dir), cwd=tmp_path, env=env)
        assert r.returncode == 0 and "delivered" in r.stdout, r.stdout + r.stderr
        assert_complete(server)
        assert spools_under(run_dir) == [] and spool not in indexed_spools()
        r = updetr("tracking", "sync", str(run_dir), cwd=tmp_path, env=env)   # nothing left: a no-op
        assert r.returncode == 0 and "nothing to deliver" in r.stdout
        assert_complete(server)
    finally:
        stop_session(proc)
        server.stop()


def test_next_run_on_the_store_delivers_a_spool_and_sync_reports_an_absent_server(tmp_path, capsys):
    server = MlflowServer(tmp_path).start()
    try:
        first = T.start_tracking(True, server.uri, "t-spool", "first", str(tmp_path / "first"), {"a": 1}, "a: 1\n")
        first.retry_interval_s = 0.2
        kill(server)
        for step in range(1, 6):
            first.log_metrics({"loss": float(step)}, step=step)
        first.set_tags({"updetr.note": "kept"})
        first.end()
        assert "not delivered yet" in capsys.readouterr().err
        (spool,) = spools_under(tmp_path / "first")
        # sync while the server is still away: exit 1, the spool stays
        r = updetr("tracking", "sync", "--all", cwd=tmp_path, env=cli_env())
        assert r.returncode == 1 and "still pending" in r.stderr and spool.exists()

        server.start()
        T.start_tracking(True, server.uri, "t-spool", "second", str(tmp_path / "second"), {"a": 1}, "a: 1\n")
        client = server.client()
        assert [m.step for m in client.get_metric_history(first.run_id, "loss")] == [1, 2, 3, 4, 5]
        run = client.get_run(first.run_id)
        assert run.data.tags["updetr.note"] == "kept" and run.info.status == "FINISHED"
        assert not spool.exists()
    finally:
        server.stop()

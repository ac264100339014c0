"""Reliability of `updetr debug` through the real CLI: one driver per run, a fresh SQLite store opened by
several processes at once, checkpoints that survive damage and a disk that fills up (docs/reliability.md)."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from updetr.checkpoint import CheckpointError, load_checkpoint, make_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[2]
SMOKE = str(REPO / "experiments" / "smoke.yaml")
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
IN_USE = re.compile(r"^updetr: error: run 'conc' is in use by pid (\d+) on host \S+ since \d\d:\d\d; wait for it, "
                    r"or use name=\.\.\. for a separate run$")


def debug_cmd(tmp_path, *extra):
    return [sys.executable, "-m", "updetr", "debug", SMOKE, "name=conc", "schedule.max_steps=6",
            "schedule.checkpoint_every=2", "schedule.log_every=1", f"runtime.output_dir={tmp_path / 'runs'}",
            f"tracking.uri={tmp_path / 'mlflow.db'}", *extra]


def run(cmd, tmp_path):
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900, env=ENV)


def loss_steps(tmp_path, experiment="conc"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "loss"))


def test_second_identical_debug_is_refused_naming_the_holder_and_steps_log_once(tmp_path):
    procs = [subprocess.Popen(debug_cmd(tmp_path), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=ENV) for _ in range(2)]
    results = [(p.pid, *p.communicate(timeout=900), p.returncode) for p in procs]
    codes = sorted(r[3] for r in results)
    assert codes == [0, 2], results
    (winner_pid, out, _, _), = [r for r in results if r[3] == 0]
    (_, refused_out, refused_err, _), = [r for r in results if r[3] == 2]
    lines = refused_err.strip().splitlines()
    assert len(lines) == 1 and IN_USE.match(lines[0]), refused_err
    assert int(IN_USE.match(lines[0]).group(1)) == winner_pid
    assert refused_out == ""                        # it wrote nothing, trained nothing
    assert "step 6/6" in out
    assert loss_steps(tmp_path) == [1, 2, 3, 4, 5, 6]


def test_lock_left_by_a_killed_driver_is_taken_over_in_one_line(tmp_path):
    folder = tmp_path / "runs" / "conc"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from updetr.run_lock import hold_run\n"
                               f"with hold_run({str(folder)!r}, \"run 'conc'\"):\n"
                               "    print('held', flush=True); time.sleep(600)"],
        cwd=tmp_path, stdout=subprocess.PIPE, text=True, env=ENV)
    assert holder.stdout.readline().strip() == "held"
    r = run(debug_cmd(tmp_path, "schedule.max_steps=1", "tracking.enabled=false"), tmp_path)
    assert r.returncode == 2 and IN_USE.match(r.stderr.strip()), r.stderr
    assert int(IN_USE.match(r.stderr.strip()).group(1)) == holder.pid
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    r = run(debug_cmd(tmp_path, "schedule.max_steps=1", "tracking.enabled=false"), tmp_path)
    assert r.returncode == 0, r.stderr
    notes = [ln for ln in r.stderr.splitlines() if "taking it over" in ln]
    assert len(notes) == 1 and f"pid {holder.pid} on host" in notes[0] and "no longer running" in notes[0], r.stderr


def test_fresh_sqlite_store_opened_by_several_processes_at_once(tmp_path):
    """MLflow creates and migrates the schema on first use; several processes doing it together raced in
    alembic (one died with `Online migration expected to match one row`)."""
    db = tmp_path / "mlflow.db"
    n = 4
    # A barrier: each process imports MLflow, says it is ready, and opens the store once all are ready.
    code = ("import sys, time\nfrom pathlib import Path\nfrom updetr.tracking import MlflowTracker\n"
            "import mlflow.tracking\n"
            f"Path({str(tmp_path)!r}, 'ready-' + sys.argv[1]).touch()\n"
            f"while len(list(Path({str(tmp_path)!r}).glob('ready-*'))) < {n}: time.sleep(0.01)\n"
            f"t = MlflowTracker.open('sqlite:///{db}', 'shared', sys.argv[1], identity={{'updetr.run_name': sys.argv[1]}})\n"
            "t.end('FINISHED')\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, f"r{i}"], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=ENV) for i in range(n)]
    results = [p.communicate(timeout=600) + (p.returncode,) for p in procs]
    assert [r[2] for r in results] == [0, 0, 0, 0], [r[1][-2000:] for r in results]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("shared").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["r0", "r1", "r2", "r3"]


def test_mlflow_error_at_start_is_one_line(tmp_path):
    bad = tmp_path / "not-a-db.db"
    bad.write_text("this is not a SQLite database\n" * 100)
    r = run(debug_cmd(tmp_path, "schedule.max_steps=1", f"tracking.uri={bad}"), tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("updetr: error: MLflow tracking at sqlite:///") \
        and "Traceback" not in r.stderr, r.stderr


def test_damaged_newest_checkpoint_resumes_from_the_previous_one(tmp_path):
    r = run(debug_cmd(tmp_path), tmp_path)
    assert r.returncode == 0, r.stderr
    ckpts = tmp_path / "runs" / "conc" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("*.pt")) == ["last.pt", "step_00000004.pt", "step_00000006.pt"]
    last = ckpts / "last.pt"
    os.truncate(last, last.stat().st_size // 2)        # as after a full disk or a bad copy

    r = run(debug_cmd(tmp_path), tmp_path)
    assert r.returncode == 0, r.stderr
    damaged = [ln for ln in r.stdout.splitlines() if "is damaged" in ln]
    assert len(damaged) == 1 and re.fullmatch(
        rf"\[conc\] checkpoint {re.escape(str(ckpts))}/step_00000006\.pt \(= last\.pt\) is damaged \(cut short: "
        r"\d+ bytes of the \d+ recorded when it was written\); moved aside as step_00000006\.pt\.damaged, resuming "
        r"from step_00000004\.pt \(step 4\), the newest intact one", damaged[0]), r.stdout
    assert "resumed from" in r.stdout and "at step 4" in r.stdout and "step 5/6" in r.stdout
    assert "step 3/6" not in r.stdout
    assert load_checkpoint(last)["step"] == 6 and (ckpts / "step_00000006.pt.damaged").exists()
    assert loss_steps(tmp_path) == [1, 2, 3, 4, 5, 6]   # steps 5 and 6 ran twice, are recorded once

    for p in ckpts.glob("step_*.pt"):                    # now no intact checkpoint is left
        os.truncate(p, 1000)
    r = run(debug_cmd(tmp_path), tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"no intact checkpoint in {ckpts}" in lines[0] and "--overwrite" in lines[0], r.stderr
    assert "checkpoint convert" not in r.stderr


def test_convert_advice_only_for_files_that_are_not_updetr_checkpoints(tmp_path):
    ours = save_checkpoint(make_checkpoint({"w": torch.zeros(50_000)}, step=3), tmp_path / "ours.pt")
    os.truncate(ours, ours.stat().st_size // 2)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(ours)
    assert "updetr checkpoint is damaged" in str(e.value) and "checkpoint convert" not in str(e.value)

    import argparse

    foreign = tmp_path / "official.pth"
    torch.save({"model": {"w": torch.zeros(3)}, "args": argparse.Namespace(lr=1e-4)}, foreign)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(foreign)
    assert "updetr checkpoint convert" in str(e.value) and "damaged" not in str(e.value)


@pytest.fixture
def small_disk(tmp_path):
    """A 120 MB tmpfs: room for two smoke checkpoints (48 MB each) and not for a third one being written."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=120m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_while_writing_a_checkpoint_stops_cleanly_and_the_same_command_resumes(tmp_path, small_disk):
    cmd = debug_cmd(tmp_path, f"runtime.output_dir={small_disk}")
    r = run(cmd, tmp_path)
    ckpts = small_disk / "conc" / "checkpoints"
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert re.fullmatch(rf"updetr: error: disk full while writing checkpoint {re.escape(str(ckpts))}/step_00000006\.pt "
                        rf"\([0-9.]+ (bytes|KB|MB) free on {re.escape(str(ckpts))}\); the previous checkpoint "
                        r"step_00000004\.pt \(step 4\) is intact: free some space, then run the same command to "
                        r"continue", lines[0]), lines[0]
    assert load_checkpoint(ckpts / "last.pt")["step"] == 4 and not list(ckpts.glob(".*.tmp"))

    subprocess.run(["mount", "-o", "remount,size=400m", str(small_disk)], check=True)   # space is back
    r = run(cmd, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "at step 4" in r.stdout and load_checkpoint(ckpts / "last.pt")["step"] == 6
    assert loss_steps(tmp_path) == [1, 2, 3, 4, 5, 6]

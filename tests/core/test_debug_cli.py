"""`updetr debug` end to end through the real CLI: smoke pre-training, falling loss, resume, refusals."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from updetr.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[2]
SMOKE = str(REPO / "experiments" / "smoke.yaml")


def updetr(*args, cwd):
    return subprocess.run([sys.executable, "-m", "updetr", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def epoch_means(stdout):
    return [float(m) for m in re.findall(r"epoch \d+ done: \d+ steps, mean loss ([0-9.]+)", stdout)]


@pytest.mark.slow
def test_smoke_debug_runs_to_completion_and_loss_falls(tmp_path):
    r = updetr("debug", SMOKE, f"runtime.output_dir={tmp_path}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "step 40/40" in r.stdout and "ETA" in r.stdout and "step/s" in r.stdout
    means = epoch_means(r.stdout)
    assert len(means) == 5
    assert means[-1] < means[0], means
    ckpt = load_checkpoint(tmp_path / "smoke" / "checkpoints" / "last.pt")
    assert (ckpt["step"], ckpt["epoch"]) == (40, 5)
    assert ckpt["config"]["name"] == "smoke" and ckpt["config"]["model"]["backbone"] == "resnet18"
    assert (tmp_path / "smoke" / "config.yaml").exists()


def test_debug_same_command_continues_overwrite_restarts(tmp_path):
    """Like `updetr run`: the same command continues the run; --overwrite starts again (README)."""
    out = f"runtime.output_dir={tmp_path}"
    r = updetr("debug", SMOKE, out, "schedule.max_steps=3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    first = load_checkpoint(tmp_path / "smoke" / "checkpoints" / "last.pt")
    assert first["step"] == 3

    r = updetr("debug", SMOKE, out, "schedule.max_steps=5", cwd=tmp_path)  # no flag: continues, nothing lost
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout and "at step 3" in r.stdout
    assert "step 1/" not in r.stdout  # the count went on from 3, not from 0
    second = load_checkpoint(tmp_path / "smoke" / "checkpoints" / "last.pt")
    assert (second["step"], second["epoch"], second["step_in_epoch"]) == (5, 0, 5)
    assert not all(torch.equal(second["model"][k], first["model"][k]) for k in first["model"])

    r = updetr("debug", SMOKE, out, "model.hidden_dim=32", "model.nheads=2", cwd=tmp_path)
    assert r.returncode == 2 and "architecture differs" in r.stderr and "model.hidden_dim" in r.stderr
    assert "--overwrite" in r.stderr and "Traceback" not in r.stderr

    r = updetr("debug", SMOKE, "--overwrite", out, "schedule.max_steps=2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "resumed from" not in r.stdout and load_checkpoint(tmp_path / "smoke" / "checkpoints" / "last.pt")["step"] == 2


@pytest.mark.slow
def test_ctrl_c_during_debug_keeps_a_checkpoint_at_the_last_finished_step(tmp_path):
    import os
    import signal
    import time

    log = tmp_path / "debug.log"
    proc = subprocess.Popen([sys.executable, "-m", "updetr", "debug", SMOKE, f"runtime.output_dir={tmp_path}",
                             "schedule.log_every=1", "schedule.checkpoint_every=1000"],
                            cwd=tmp_path, stdout=open(log, "w"), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while "step 3/" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text() + proc.stderr.read()
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    steps = [int(s) for s in re.findall(r"step (\d+)/40", log.read_text())]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "interrupted: checkpoint at step" in lines[0] and "Traceback" not in err, err
    ckpt = load_checkpoint(tmp_path / "smoke" / "checkpoints" / "last.pt")
    assert ckpt["step"] == steps[-1] >= 3  # no periodic checkpoint was due: this one was written on Ctrl-C
    assert f"checkpoint at step {ckpt['step']} " in lines[0]


def test_debug_ending_on_max_steps_logs_its_last_epoch_summary_once(tmp_path):
    """`schedule.max_steps=16` is exactly 2 epochs of 8 steps: both epochs' lines and `epoch/*` metrics
    (MLflow steps 0 and 1), each once."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    r = updetr("debug", SMOKE, f"runtime.output_dir={tmp_path}", "schedule.max_steps=16", f"tracking.uri={uri}",
               cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert [r.stdout.count(f"epoch {e} done: 8 steps") for e in (0, 1)] == [1, 1], r.stdout
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "epoch/loss")) == [0, 1]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "epoch/steps")] == [8.0, 8.0]

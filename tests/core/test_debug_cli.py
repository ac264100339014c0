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

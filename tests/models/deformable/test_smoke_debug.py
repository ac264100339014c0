"""`updetr debug experiments/smoke_deformable.yaml` end to end through the real CLI: Deformable DETR with box
refinement trains on the synthetic shapes set, its loss falls, the COCO table comes out, and the checkpoint
holds the Deformable DETR weights under the official names."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from updetr.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[3]
SMOKE = str(REPO / "experiments" / "smoke_deformable.yaml")


@pytest.mark.slow
def test_smoke_deformable_debug_trains_and_evaluates(tmp_path):
    r = subprocess.run([sys.executable, "-m", "updetr", "debug", SMOKE, f"runtime.output_dir={tmp_path}"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 80/80" in r.stdout
    means = [float(m) for m in re.findall(r"epoch \d+ done: \d+ steps, mean loss ([0-9.]+)", r.stdout)]
    assert len(means) == 5 and means[-1] < means[0], means
    assert re.search(r"\bAP50\b", r.stdout), r.stdout[-2000:]
    ckpt = load_checkpoint(tmp_path / "smoke_deformable" / "checkpoints" / "last.pt")
    assert (ckpt["step"], ckpt["epoch"]) == (80, 5)
    model = ckpt["config"]["model"]
    assert (model["detector"], model["with_box_refine"], model["pre_norm"]) == ("deformable_detr", True, False)
    assert "transformer.encoder.layers.0.self_attn.sampling_offsets.weight" in ckpt["model"]
    assert "transformer.decoder.bbox_embed.1.layers.2.bias" in ckpt["model"]
    groups = ckpt["optimizer"]["param_groups"]                  # lr, lr x lr_linear_proj_mult (CNN frozen)
    assert len(groups) == 2 and groups[1]["lr"] == pytest.approx(groups[0]["lr"] * 0.1)

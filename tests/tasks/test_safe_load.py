"""No weights file runs code: every path that reads a torch file refuses a pickle payload in one line that
names the file and the global it asked for, and the payload never runs. Official files (their `args` is an
`argparse.Namespace`) still load."""
from __future__ import annotations

import argparse
import os

import pytest
import torch
from PIL import Image

from updetr.checkpoint import convert_official, load_checkpoint
from updetr.cli import main
from updetr.models.backbone import Backbone
from updetr.util.safe_load import UnsafeWeightsError, safe_torch_load

from .conftest import TINY


class Payload:
    """Unpickling this calls os.system: a marker file appears if any loader runs pickle code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def evil(tmp_path):
    """A checkpoint-shaped file (model tensors + our schema keys) that carries the payload."""
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pth"
    torch.save({"format": "updetr-checkpoint", "version": 1, "model": {"conv1.weight": torch.zeros(1)},
                "step": 3, "epoch": 0, "extra": Payload(marker)}, path)
    return path, marker


def check_refused(rc, err, path, marker):
    assert not marker.exists(), "the pickle payload ran"
    assert rc == 2 and "Traceback" not in err
    line = err.strip()
    assert line.count("\n") == 0, line
    assert str(path) in line and "posix.system" in line and "refused" in line


def test_safe_load_refuses_payload_and_allows_official_namespace(tmp_path, evil):
    path, marker = evil
    with pytest.raises(UnsafeWeightsError, match=r"evil\.pth.*'posix\.system'"):
        safe_torch_load(path, what="model.backbone_weights")
    assert not marker.exists()
    # anything outside the allowlist is refused by name, even a harmless class
    torch.save({"when": __import__("datetime").date(2020, 1, 1)}, tmp_path / "date.pth")
    with pytest.raises(UnsafeWeightsError, match="'datetime.date'"):
        safe_torch_load(tmp_path / "date.pth")
    official = tmp_path / "official.pth"
    torch.save({"model": {"w": torch.ones(2)}, "epoch": 9, "args": argparse.Namespace(lr=1e-4, num_patches=10)},
               official)
    assert safe_torch_load(official)["args"].num_patches == 10


def test_backbone_weights(evil):
    path, marker = evil
    with pytest.raises(UnsafeWeightsError, match="model.backbone_weights"):
        Backbone("resnet18", False, weights=path)
    assert not marker.exists()


def test_backbone_weights_in_debug_is_one_line(capsys, tmp_path, evil):
    path, marker = evil
    rc = main(["debug", "--overwrite", str(_exp(tmp_path, "pretrain")), *TINY, f"model.backbone_weights={path}",
               f"runtime.output_dir={tmp_path}/out"])
    check_refused(rc, capsys.readouterr().err, path, marker)


def test_checkpoint_convert(capsys, tmp_path, evil):
    path, marker = evil
    rc = main(["checkpoint", "convert", str(path), str(tmp_path / "out.pt")])
    check_refused(rc, capsys.readouterr().err, path, marker)
    assert not (tmp_path / "out.pt").exists()


def test_checkpoint_convert_still_reads_official_files(tmp_path):
    src = tmp_path / "official.pth"
    torch.save({"model": {"module.patch2query.weight": torch.randn(4, 4)}, "epoch": 59,
                "args": argparse.Namespace(lr=1e-4, lr_drop=40, device="cpu")}, src)
    report = convert_official(src, tmp_path / "ours.pt")
    assert report["keys"] == 1 and report["official_args"]["lr_drop"] == 40
    assert load_checkpoint(tmp_path / "ours.pt")["source"] == "official"


def test_resume(capsys, tmp_path, evil):
    path, marker = evil
    last = tmp_path / "out" / "resume_me" / "checkpoints" / "last.pt"
    last.parent.mkdir(parents=True)
    last.write_bytes(path.read_bytes())
    rc = main(["debug", str(_exp(tmp_path, "pretrain", name="resume_me")), *TINY, f"runtime.output_dir={tmp_path}/out"])
    check_refused(rc, capsys.readouterr().err, last, marker)


def test_eval_checkpoint(capsys, tmp_path, evil, coco_root):
    path, marker = evil
    rc = main(["eval", str(_exp(tmp_path, "detect")), "--checkpoint", str(path), *TINY, "data.source=coco",
               f"data.path={coco_root}"])
    check_refused(rc, capsys.readouterr().err, path, marker)


def test_finetune_init(capsys, tmp_path, evil, coco_root):
    path, marker = evil
    rc = main(["debug", "--overwrite", str(_exp(tmp_path, "detect")), *TINY, "data.source=coco",
               f"data.path={coco_root}", f"init.checkpoint={path}", f"runtime.output_dir={tmp_path}/out"])
    check_refused(rc, capsys.readouterr().err, path, marker)


def test_visualize(capsys, tmp_path, evil):
    path, marker = evil
    Image.new("RGB", (64, 48), (120, 30, 200)).save(tmp_path / "img.png")
    rc = main(["visualize", str(path), str(tmp_path / "img.png"), "--out", str(tmp_path / "v.png")])
    check_refused(rc, capsys.readouterr().err, path, marker)


def _exp(tmp_path, task, name=None):
    exp = tmp_path / f"{task}.yaml"
    exp.write_text(f"name: {name or 'safe_' + task}\ntask: {task}\n")
    return exp

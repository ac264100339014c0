"""An official Deformable DETR checkpoint, built at test time by the official code and saved as its `main.py`
saves it (`model, optimizer, lr_scheduler, epoch, args`, the optimizer with the official three parameter
groups), goes through `updetr checkpoint convert`, loads strictly into updetr's model and gives the same
outputs: bit for bit on the reference path, within 1e-5 of each output's scale on the default path."""
from __future__ import annotations

import torch

from tests.models.deformable.official import official_deformable, official_param_groups, randomise
from tests.models.deformable.test_parity import ARCH, OURS, inputs
from tests.models.test_fast_path import REFERENCE
from tests.official_files import save_like_official as official_save
from updetr.checkpoint import load_checkpoint
from updetr.cli import main
from updetr.config import load_config
from updetr.tasks import build_model

TOL = 1e-5  # default path (folded FrozenBN, oneDNN linears): rounding only


def save_like_official(model, args, path, epoch: int) -> None:
    """dd:main.py L284-290's save, with its optimizer groups."""
    official_save(model, official_param_groups(model, args), args, path, epoch)


def test_official_checkpoint_converts_loads_strictly_and_gives_the_same_outputs(tmp_path, capsys):
    with official_deformable() as dd:
        torch.manual_seed(0)
        # a frozen CNN (lr_backbone 0) keeps the file small: the official backbone group is then empty
        args = dd.args(*ARCH, "--lr_backbone", "0", "--with_box_refine")
        theirs = dd.models.build_model(args)[0]
        randomise(theirs)
        src = tmp_path / "checkpoint0049.pth"
        save_like_official(theirs, args, src, epoch=49)
    theirs.eval()
    dst = tmp_path / "converted.pt"
    assert main(["checkpoint", "convert", str(src), str(dst)]) == 0
    assert "Deformable DETR (box refinement)" in capsys.readouterr().out
    ckpt = load_checkpoint(dst)
    assert ckpt["source"] == "official" and ckpt["epoch"] == 50
    assert ckpt["official_args"]["with_box_refine"] is True

    images, _ = inputs(torch.float32)
    with torch.no_grad():
        expected = theirs(images)
    for switches, tol in ((REFERENCE, 0.0), ([], TOL)):
        ours = build_model(load_config(None, OURS + ["model.with_box_refine=true", "optim.lr_backbone=0",
                                                    *switches]))[0].eval()
        ours.load_state_dict(ckpt["model"], strict=True)
        with torch.no_grad():
            got = ours(images)
        pairs = [(got, expected)] + list(zip(got["aux_outputs"], expected["aux_outputs"]))
        for a, b in pairs:
            for key in ("pred_logits", "pred_boxes"):
                scale = max(1.0, float(b[key].abs().max()))
                assert float((a[key] - b[key]).abs().max()) <= tol * scale, (switches, key)


def test_convert_names_a_two_stage_file(tmp_path, capsys):
    with official_deformable() as dd:
        args = dd.args(*ARCH, "--with_box_refine", "--two_stage")
        model = dd.models.build_model(args)[0]
        torch.save({"model": model.state_dict(), "epoch": 0, "args": args}, tmp_path / "two.pth")
    assert main(["checkpoint", "convert", str(tmp_path / "two.pth"), str(tmp_path / "two.pt")]) == 0
    assert "Deformable DETR (box refinement, two-stage)" in capsys.readouterr().out
    ours = build_model(load_config(None, OURS + ["model.with_box_refine=true", "model.two_stage=true"]))[0]
    ours.load_state_dict(load_checkpoint(tmp_path / "two.pt")["model"], strict=True)

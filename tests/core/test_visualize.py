"""`updetr visualize` (Fig. 5): PNG size and box placement, a model whose output is fixed by construction,
bad input, converted official checkpoints, and the CLI on a checkpoint of a real smoke pre-training."""
import argparse
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from updetr.checkpoint import convert_official, make_checkpoint, save_checkpoint
from updetr.cli import main
from updetr.config import config_to_dict, load_config
from updetr.models import build_detr, build_updetr
from updetr.visualize import (PatchResult, best_per_group, make_layout, patch_colors, render,
                              resolve_checkpoint)

REPO = Path(__file__).resolve().parents[2]
TINY = ["model.backbone=resnet18", "model.hidden_dim=32", "model.nheads=2", "model.enc_layers=1",
        "model.dec_layers=1", "model.dim_feedforward=64", "model.num_queries=6", "pretext.num_patches=2",
        "pretext.patch_size=32", "pretext.scales=[64]", "pretext.max_size=96", "tracking.enabled=false"]
GRAY = 128
# Fixed prediction of every query (normalised cxcywh) and its pixels on the 160x120 test image.
FIXED_BOX = (0.25, 0.5, 0.3, 0.4)
FIXED_XYXY = (16.0, 36.0, 64.0, 84.0)
FIXED_SCORE = float(np.exp(5.0) / (np.exp(5.0) + 2.0))  # softmax of logits (0, 5, 0): 'patch' vs the rest


def rgb255(c):
    return np.array([round(v * 255) for v in c])


def near(png: np.ndarray, x: float, y: float, color, radius: int = 2, tol: int = 12) -> bool:
    """Some pixel within `radius` of PNG pixel (x, y) has `color` (0..1 RGB)."""
    xi, yi = int(round(x)), int(round(y))
    win = png[max(yi - radius, 0):yi + radius + 1, max(xi - radius, 0):xi + radius + 1, :3].astype(int)
    return bool((np.abs(win - rgb255(color)).max(-1) <= tol).any())


def gray_image(w=200, h=100):
    return np.full((h, w, 3), GRAY, dtype=np.uint8)


def result(i, patch, pred, score=0.9):
    return PatchResult(i, patch, pred, score, 0.5, i)


def two_results():
    return [result(0, (10, 10, 40, 40), (20.0, 10.0, 80.0, 60.0)),
            result(1, (100, 20, 150, 70), (120.0, 40.0, 190.0, 90.0))]


def test_layout_gives_the_png_size_and_png_opens(tmp_path):
    res = two_results()
    lay = render(gray_image(), np.zeros((2, 32, 32, 3), np.uint8), res, tmp_path / "a.png", width=400)
    # 200x100 image at width 400: scale 2, image panel 200 px; tiles min(128, (400 - 3*8) // 2) = 128;
    # height = 200 + 8 gap + 18 label + 128 tile + 8 gap.
    assert (lay.width, lay.height, lay.scale, lay.image_h, lay.tile) == (400, 362, 2.0, 200, 128)
    assert (lay.image_x, lay.image_w) == (0, 400)
    with Image.open(tmp_path / "a.png") as im:
        assert im.format == "PNG" and im.size == (400, 362)
    assert make_layout(1000, 500, 10, 800).tile == (800 - 11 * 8) // 10
    # A portrait image: the longer side fits the width, the panel is centred.
    tall = make_layout(100, 200, 1, 400)
    assert (tall.scale, tall.image_w, tall.image_h, tall.image_x, tall.to_png(10, 10)) == (2.0, 200, 400, 100,
                                                                                         (120.0, 20.0))


@pytest.mark.parametrize("w, h", [(200, 100), (100, 200)])
def test_boxes_are_drawn_where_the_predictions_are(tmp_path, w, h):
    res = [result(0, (10, 10, 40, 40), (20.0, 10.0, 80.0, 60.0)), result(1, (50, 20, 90, 70), (55.0, 40.0, 95.0, 90.0))]
    lay = render(gray_image(w, h), np.zeros((2, 32, 32, 3), np.uint8), res, tmp_path / "b.png", compare=True, width=400)
    png = np.asarray(Image.open(tmp_path / "b.png").convert("RGB"))
    colors = patch_colors(2)
    for r, c in zip(res, colors):
        x0, y0 = lay.to_png(*r.pred[:2])
        x1, y1 = lay.to_png(*r.pred[2:])
        assert near(png, x0, (y0 + y1) / 2, c), "left edge"
        assert near(png, x1, (y0 + y1) / 2, c), "right edge"
        assert near(png, (x0 + x1) / 2, y1, c), "bottom edge"
        assert not near(png, (x0 + x1) / 2, (y0 + y1) / 2, c, radius=3), "box is not filled"
        # --compare: the patch box is dashed: part, not all, of its bottom edge has the colour.
        px0, _ = lay.to_png(*r.patch[:2])
        px1, py1 = lay.to_png(*r.patch[2:])
        row = png[int(round(py1)), int(px0) + 4:int(px1) - 4].astype(int)
        hit = (np.abs(row - rgb255(c)).max(-1) <= 12).mean()
        assert 0.3 < hit < 0.95, hit
        # Its tile in the strip is framed in the same colour.
        left = lay.tile_left(r.index, 2)
        assert near(png, left, lay.height - lay.gap - lay.tile / 2, c)
    # The two patches' colours differ, and far from any box the image is untouched.
    assert np.abs(rgb255(colors[0]) - rgb255(colors[1])).max() > 50
    fx, fy = lay.to_png(5, 95)
    assert (png[int(fy), int(fx)] == GRAY).all()


def test_best_per_group_picks_each_groups_top_query_and_scales_to_pixels():
    logits = torch.full((1, 6, 3), -5.0)
    logits[0, 1, 1] = 4.0   # group 0 (queries 0-2): query 1
    logits[0, 5, 1] = 2.0   # group 1 (queries 3-5): query 5
    logits[0, 3, 1] = 1.0
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2]] * 6])
    boxes[0, 1] = torch.tensor([0.25, 0.5, 0.5, 0.2])
    boxes[0, 5] = torch.tensor([0.75, 0.25, 0.1, 0.5])
    scores, xyxy, queries = best_per_group({"pred_logits": logits, "pred_boxes": boxes}, 2, (100, 200))
    assert queries.tolist() == [1, 5]
    assert torch.allclose(xyxy, torch.tensor([[0.0, 40.0, 100.0, 60.0], [140.0, 0.0, 160.0, 50.0]]))
    assert scores[0] > scores[1] > 0.5


def tiny_cfg(*overrides):
    return load_config(None, TINY + list(overrides))


def fixed_output_model(cfg):
    """A real UPDETR whose every query predicts FIXED_BOX with 'patch' logits (0, 5, 0)."""
    torch.manual_seed(0)
    model = build_updetr(cfg)[0]
    with torch.no_grad():
        model.class_embed.weight.zero_()
        model.class_embed.bias.copy_(torch.tensor([0.0, 5.0, 0.0]))
        last = model.bbox_embed.layers[-1]
        last.weight.zero_()
        last.bias.copy_(torch.logit(torch.tensor(FIXED_BOX)))
    return model


@pytest.fixture(scope="module")
def fixed_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("viz")
    cfg = tiny_cfg()
    save_checkpoint(make_checkpoint(fixed_output_model(cfg).state_dict(), config=config_to_dict(cfg)),
                    root / "run" / "checkpoints" / "last.pt")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(root / "img.png")
    return root


def run_cli(*args):
    return main(["visualize", *map(str, args)])


def parse_lines(out):
    return re.findall(r"patch (\d+): box (\S+) -> predicted (\S+)  score ([0-9.]+)  IoU ([0-9.]+)", out)


def test_fixed_output_model_box_lands_on_its_pixels(fixed_ckpt, tmp_path, capsys):
    out = tmp_path / "fixed.png"
    # A run folder resolves to its checkpoints/last.pt.
    assert run_cli(fixed_ckpt / "run", fixed_ckpt / "img.png", "--patches", "10,20,40,30", "100,50,30,30",
                   "--out", out, "--compare", "--width", "320") == 0
    stdout = capsys.readouterr().out
    assert f"wrote {out}" in stdout
    lines = parse_lines(stdout)
    assert [(i, b) for i, b, *_ in lines] == [("0", "10,20,40,30"), ("1", "100,50,30,30")]
    x0, y0, x1, y1 = FIXED_XYXY
    for _, _, pred, score, iou in lines:
        assert [float(v) for v in pred.split(",")] == pytest.approx([x0, y0, x1 - x0, y1 - y0], abs=0.1)
        assert float(score) == pytest.approx(FIXED_SCORE, abs=1e-3)
    # IoU of (16,36)-(64,84) with patch 0 (10,20)-(50,50): 34*14 / (48*48 + 40*30 - 34*14).
    assert float(lines[0][4]) == pytest.approx(476 / (2304 + 1200 - 476), abs=1e-3)
    png = np.asarray(Image.open(out).convert("RGB"))
    assert png.shape[:2] == (make_layout(160, 120, 2, 320).height, 320)
    scale = 2.0  # 320 / 160
    last_color = patch_colors(2)[1]  # both boxes coincide; patch 1 is drawn last
    assert near(png, x0 * scale, (y0 + y1) / 2 * scale, last_color)
    assert near(png, (x0 + x1) / 2 * scale, y1 * scale, last_color)
    assert near(png, x1 * scale, (y0 + y1) / 2 * scale, last_color)


def test_random_patches_are_seeded_and_follow_the_sampler(fixed_ckpt, tmp_path, capsys):
    img = fixed_ckpt / "img.png"
    run_cli(fixed_ckpt / "run", img, "--random", "2", "--seed", "3", "--out", tmp_path / "r1.png")
    first = [b for _, b, *_ in parse_lines(capsys.readouterr().out)]
    run_cli(fixed_ckpt / "run", img, "--random", "2", "--seed", "3", "--out", tmp_path / "r2.png")
    again = [b for _, b, *_ in parse_lines(capsys.readouterr().out)]
    run_cli(fixed_ckpt / "run", img, "--random", "2", "--seed", "4", "--out", tmp_path / "r3.png")
    other = [b for _, b, *_ in parse_lines(capsys.readouterr().out)]
    assert len(first) == 2 and first == again and first != other
    for b in first + other:
        x, y, w, h = map(int, b.split(","))
        # The pre-training sampler: sides >= min_patch_px (8), never touching the right / bottom edge.
        assert w >= 8 and h >= 8 and x >= 0 and y >= 0 and x + w < 160 and y + h < 120


@pytest.mark.parametrize("args, message", [
    (["--patches", "150,10,20,20"], r"patch 0 \(150,10,20,20\): outside the 160x120 image"),
    (["--patches", "10,10,20,20", "5,5,6,30"], r"patch 1 \(5,5,6,30\): smaller than the minimum patch size 8 px"),
    (["--patches", "10,10,20"], r"patch 0 \(10,10,20\): expected x,y,w,h"),
    (["--patches", "0,0,9,9", "0,0,9,9", "0,0,9,9"], r"3 query patches given; this model has 2 query groups"),
    (["--random", "5"], r"--random 5: this model has 2 query groups"),
])
def test_bad_patches_are_one_line_errors(fixed_ckpt, tmp_path, capsys, args, message):
    assert run_cli(fixed_ckpt / "run", fixed_ckpt / "img.png", *args, "--out", tmp_path / "x.png") == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and err.count("\n") == 1, err
    assert not (tmp_path / "x.png").exists()


def test_unreadable_image_and_wrong_checkpoint_kind_are_one_line_errors(fixed_ckpt, tmp_path, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image at all")
    assert run_cli(fixed_ckpt / "run", bad) == 2
    err = capsys.readouterr().err
    assert f"{bad}: cannot read the image" in err and err.count("\n") == 1
    assert run_cli(fixed_ckpt / "run", tmp_path / "missing.png") == 2
    assert "missing.png: no such image file" in capsys.readouterr().err

    cfg = load_config(None, TINY + ["task=detect", "data.source=synthetic_coco", "model.num_classes=3"])
    detect = tmp_path / "detect.pt"
    save_checkpoint(make_checkpoint(build_detr(cfg, 3)[0].state_dict(), config=config_to_dict(cfg)), detect)
    assert run_cli(detect, fixed_ckpt / "img.png") == 2
    err = capsys.readouterr().err
    assert f"{detect}: a detect checkpoint without patch2query weights" in err and err.count("\n") == 1
    assert run_cli(tmp_path / "nowhere", fixed_ckpt / "img.png") == 2
    assert "no such checkpoint file or run folder" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no checkpoints/last.pt"):
        resolve_checkpoint(tmp_path)
    (tmp_path / "ray_ckpt").mkdir()
    (tmp_path / "ray_ckpt" / "checkpoint.pt").write_bytes(b"")
    assert resolve_checkpoint(tmp_path / "ray_ckpt") == tmp_path / "ray_ckpt" / "checkpoint.pt"


def test_converted_official_checkpoint_and_config_fallback(fixed_ckpt, tmp_path, capsys):
    """An official file (pickled args, bare model dict) converts and visualises without --config; a bare
    state_dict needs --config."""
    cfg = tiny_cfg()
    sd = fixed_output_model(cfg).state_dict()
    args = argparse.Namespace(backbone="resnet18", hidden_dim=32, nheads=2, enc_layers=1, dec_layers=1,
                              dim_feedforward=64, pre_norm=True, num_queries=6, num_patches=2, dilation=False,
                              position_embedding="sine", lr=1e-4)
    torch.save({"model": sd, "args": args, "epoch": 59}, tmp_path / "official.pth")
    convert_official(tmp_path / "official.pth", tmp_path / "converted.pt")
    assert run_cli(tmp_path / "converted.pt", fixed_ckpt / "img.png", "--patches", "10,20,40,30",
                   "--out", tmp_path / "o.png") == 0
    (line,) = parse_lines(capsys.readouterr().out)
    assert float(line[3]) == pytest.approx(FIXED_SCORE, abs=1e-3)

    torch.save(sd, tmp_path / "bare.pth")
    convert_official(tmp_path / "bare.pth", tmp_path / "bare.pt")
    assert run_cli(tmp_path / "bare.pt", fixed_ckpt / "img.png") == 2
    assert "stores no config; pass the pre-training experiment with --config" in capsys.readouterr().err
    exp = tmp_path / "tiny.yaml"
    over = "\n".join(["model:", "  backbone: resnet18", "  hidden_dim: 32", "  nheads: 2", "  enc_layers: 1",
                      "  dec_layers: 1", "  dim_feedforward: 64", "  num_queries: 6", "pretext:", "  num_patches: 2"])
    exp.write_text(f"name: tiny\n{over}\n")
    assert run_cli(tmp_path / "bare.pt", fixed_ckpt / "img.png", "--config", exp, "--random", "1",
                   "--out", tmp_path / "c.png") == 0
    assert len(parse_lines(capsys.readouterr().out)) == 1


@pytest.mark.slow
def test_cli_on_a_smoke_pretraining_checkpoint(tmp_path):
    """Through the real CLI: a 2-step smoke pre-training, then visualize its run folder."""
    def updetr(*args):
        return subprocess.run([sys.executable, "-m", "updetr", *map(str, args)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)

    r = updetr("debug", REPO / "experiments" / "smoke.yaml", f"runtime.output_dir={tmp_path}", "schedule.epochs=1",
               "data.synthetic_images=4", "tracking.enabled=false")
    assert r.returncode == 0, r.stderr
    from updetr.data.synthetic import synthetic_image

    synthetic_image(0, 7, (96, 160)).save(tmp_path / "img.jpg")
    r = updetr("visualize", tmp_path / "smoke", tmp_path / "img.jpg", "--random", "2", "--compare",
               "--out", tmp_path / "fig5.png")
    assert r.returncode == 0, r.stderr
    lines = parse_lines(r.stdout)
    assert len(lines) == 2 and all(0.0 <= float(s) <= 1.0 and 0.0 <= float(i) <= 1.0 for *_, s, i in lines)
    with Image.open(tmp_path / "fig5.png") as im:
        w, h = Image.open(tmp_path / "img.jpg").size
        assert im.size == (800, make_layout(w, h, 2, 800).height)

"""The panoptic task: synthetic panoptic data (PNG + JSON) read back exactly, a mismatched PNG skipped and
counted, the mask-head stage leaves the detector bit-identical, and the two-stage smoke experiment
(detect -> panoptic) in `updetr debug` ends with finite PQ numbers, tracked in MLflow."""
from __future__ import annotations

import io
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from updetr.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from updetr.config import load_config, load_experiment
from updetr.data.panoptic import PANOPTIC_MISMATCH, id2rgb, open_panoptic, rgb2id
from updetr.data.synthetic_panoptic import write_panoptic_dataset
from updetr.tasks import get_task

from .conftest import TINY

REPO = Path(__file__).resolve().parents[2]
TINY_PAN = TINY + ["data.source=synthetic_panoptic", "data.synthetic_size=[48,64]", "data.batch_size=2",
                   "detection.scales=[48,64]", "detection.max_size=80", "detection.crop_resize=[48]",
                   "detection.crop_min=32", "detection.crop_max=48", "detection.eval_size=64",
                   "model.freeze_backbone=false", "optim.lr_backbone=1e-4"]


@pytest.fixture(scope="module")
def pan_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tinypan")
    write_panoptic_dataset(root, 4, seed=5, size_range=(48, 64), split="train")
    write_panoptic_dataset(root, 3, seed=6, size_range=(48, 64), split="val")
    return root


def test_synthetic_panoptic_png_and_json_agree(pan_root):
    img_dir, pan = open_panoptic(pan_root, "train")
    assert pan.things == [1, 2, 3] and pan.stuffs == [8, 9]
    for image_id, info in pan.images.items():
        ids, segs = pan.read_segments(image_id)  # raises when the PNG and the JSON disagree
        assert ids.shape == (info["height"], info["width"]) and (ids > 0).all()  # every pixel in a segment
        for s in segs:
            m = ids == s["id"]
            assert m.sum() == s["area"]
            ys, xs = np.nonzero(m)
            assert s["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    assert (rgb2id(id2rgb(np.array([[0, 1, 256, 65536 * 3 + 7]]))) == [[0, 1, 256, 65536 * 3 + 7]]).all()


def test_mismatched_png_is_skipped_and_counted_naming_the_file(tmp_path, caplog):
    write_panoptic_dataset(tmp_path, 2, seed=1, size_range=(48, 64), split="train")
    ann = tmp_path / "annotations" / "panoptic_train.json"
    data = json.loads(ann.read_text())
    png = tmp_path / "annotations" / "panoptic_train" / data["annotations"][0]["file_name"]
    ids = rgb2id(np.asarray(Image.open(png).convert("RGB")))
    ids[0, 0] = 4242  # an id the JSON does not list
    Image.fromarray(id2rgb(ids), "RGB").save(png)
    cfg = load_config(None, TINY_PAN + ["task=panoptic", f"data.path={tmp_path}"])
    ds = get_task(cfg).dataset("train")
    with caplog.at_level(logging.WARNING, logger="updetr.data"):
        bad, good = ds.load(0), ds.load(1)
    assert bad["image"] is None and bad["events"] == {PANOPTIC_MISMATCH: 1}
    assert good["image"] is not None and good["target"]["masks"].shape[0] == len(good["target"]["labels"])
    assert str(png) in caplog.text and "4242" in caplog.text and "not in segments_info" in caplog.text


def test_mask_stage_leaves_the_detector_bit_identical(pan_root, tmp_path):
    from updetr.local import run_debug

    # a "detect stage" checkpoint: a freshly built detector (its exact weights are what matters here)
    det_cfg = load_config(None, TINY_PAN + ["task=detect", f"data.path={pan_root}"])
    model, _, _ = get_task(det_cfg).build()
    det_sd = {k: v.clone() for k, v in model.state_dict().items()}
    det_ckpt = save_checkpoint(make_checkpoint(det_sd), tmp_path / "detect.pt")

    cfg = load_config(None, TINY_PAN + ["task=panoptic", f"data.path={pan_root}", f"init.checkpoint={det_ckpt}",
                                        "schedule.max_steps=2", "schedule.epochs=1", "optim.lr=1e-2",
                                        f"runtime.output_dir={tmp_path / 'runs'}", "name=pan"])
    out = io.StringIO()
    o = run_debug(cfg, out=out)
    init_line = next(line for line in out.getvalue().splitlines() if "init from" in line)
    assert "dropped 0" in init_line and "bbox_attention" in init_line and "mask_head" in init_line
    after = load_checkpoint(o.checkpoint)["model"]
    for k, v in det_sd.items():
        assert torch.equal(after[f"detr.{k}"], v), k  # every detector tensor, buffers included
    head = {k: v for k, v in after.items() if k.startswith(("bbox_attention.", "mask_head."))}
    assert head, "the mask head is in the checkpoint"
    # it trained: the optimizer moved the head (and only the head) away from its initialisation
    fresh_cfg = cfg.model_copy(update={"init": cfg.init.model_copy(update={"checkpoint": None})})
    from updetr.engine_setup import seed_process

    seed_process(cfg.seed)
    fresh = get_task(fresh_cfg).build()[0].state_dict()
    assert any(not torch.equal(fresh[k], v) for k, v in head.items())
    trainable = {n for n, p in get_task(fresh_cfg).build()[0].named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("bbox_attention.", "mask_head.")) for n in trainable)
    assert math.isfinite(o.eval_metrics["PQ"]) and "segm_AP" in o.eval_metrics


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_smoke_two_stage_debug_ends_with_finite_pq_tracked(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from updetr.pipeline import DebugDriver, chain_summary, run_chain

    monkeypatch.chdir(tmp_path)
    small = ["data.synthetic_images=8", "data.synthetic_val_images=3", "stages.detect.schedule.epochs=2",
             "stages.panoptic.schedule.epochs=1", "runtime.threads=2", f"tracking.uri=sqlite:///{tmp_path}/m.db"]
    exp = load_experiment(REPO / "experiments" / "smoke_panoptic.yaml", small)
    out = io.StringIO()
    outcome = run_chain(exp, DebugDriver(out=out), out=out)
    text = out.getvalue() + chain_summary(outcome)
    assert "stage 2/2 panoptic: train panoptic from" in text and "re-initialised" in text
    final = outcome.final_metrics
    for k in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st", "segm_AP"):
        assert math.isfinite(final[k]), (k, final)
    assert "PQ_th" in text and "segm_AP" in text

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/m.db")
    runs = client.search_runs([client.get_experiment_by_name("smoke_panoptic").experiment_id])
    pan = next(r for r in runs if r.info.run_name == "smoke_panoptic-panoptic").data.metrics
    for k in ("eval/PQ", "eval/SQ", "eval/RQ", "eval/PQ_th", "eval/PQ_st", "eval/segm_AP", "loss_mask"):
        assert k in pan, k
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags).data.metrics
    assert parent["eval/PQ"] == pytest.approx(final["PQ"])


def _pan_eval(root, rank=0, world=1):
    from updetr.runner import evaluate_weights

    task = get_task(load_config(None, TINY_PAN + ["task=panoptic", f"data.path={root}", "panoptic.threshold=0.1"]))
    torch.manual_seed(0)
    model, _, post = task.build()
    return evaluate_weights(task, model, post, torch.device("cpu"), rank=rank, world_size=world)


def _ddp_worker(rank, world, init_file, root, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        torch.save(_pan_eval(root, rank, world), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_panoptic_evaluation_equals_single_process(pan_root, tmp_path):
    import torch.multiprocessing as mp

    single = _pan_eval(pan_root)
    assert single["images"] == 3
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(pan_root), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for k in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st", "segm_AP", "images"):
        # the per-class IoU sums add in another order: equal up to float rounding
        assert r0[k] == r1[k] and r0[k] == pytest.approx(single[k], rel=1e-9, abs=1e-12, nan_ok=True), k

"""COCO and VOC loaders on generated files, DETR detection transforms, detection batches, bad annotations."""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.cocoeval import COCOeval

from updetr.data import skips
from updetr.data.coco import coco_from_dict, coco_target, load_coco, num_classes_of
from updetr.data.detection import build_detection_dataset, detection_batches
from updetr.data.detection_transforms import crop, hflip, make_detection_transforms, resize
from updetr.data.synthetic import write_coco_dataset, write_voc_dataset
from updetr.data.voc import parse_voc_xml, voc_to_coco


def _ft_cfg(cfg_factory, *extra):
    return cfg_factory("stage=finetune", "model.num_classes=8", *extra)


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    write_coco_dataset(root, 6, seed=1, split="train")
    write_coco_dataset(root, 3, seed=2, split="val")
    return root


def _xyxy(t):
    h, w = t["size"].tolist()
    cx, cy, bw, bh = t["boxes"].unbind(-1)
    return torch.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h], -1)


def test_coco_val_sample_boxes_and_sizes(coco_root, cfg_factory):
    cfg = _ft_cfg(cfg_factory, "data.source=coco", f"data.path={coco_root}")
    ds = build_detection_dataset(cfg, "val")
    assert len(ds) == 3 and ds.num_classes == 8  # category ids 1, 2, 3, 7
    item = ds[0]
    img, t = item["image"], item["target"]
    info = ds.coco.imgs[ds.ids[0]]
    assert t["orig_size"].tolist() == [info["height"], info["width"]]
    assert list(img.shape[1:]) == t["size"].tolist() and min(t["size"].tolist()) == 800  # val: 800 / 1333
    anns = ds.coco.imgToAnns[ds.ids[0]]
    ratio = torch.tensor([t["size"][1] / info["width"], t["size"][0] / info["height"]] * 2)
    ref = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                        for a in anns]) * ratio
    assert torch.allclose(_xyxy(t), ref, atol=1e-2)
    assert t["labels"].tolist() == [a["category_id"] for a in anns]
    # the shape's pixels are inside its box: the box interior differs from the just-outside ring
    assert ((t["boxes"] > 0) & (t["boxes"] <= 1)).all()


def test_coco_train_augmentation_is_seeded(coco_root, cfg_factory):
    cfg = _ft_cfg(cfg_factory, "data.source=coco", f"data.path={coco_root}")
    ds = build_detection_dataset(cfg, "train")
    a, b = ds.load(1, epoch=3), ds.load(1, epoch=3)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["target"]["boxes"], b["target"]["boxes"])
    sizes = {tuple(ds.load(1, epoch=e)["target"]["size"].tolist()) for e in range(8)}
    assert len(sizes) > 1  # multi-scale / crop vary by epoch
    for e in range(8):
        t = ds.load(2, epoch=e)["target"]
        assert (t["boxes"][:, 2:] > 0).all() and ((t["boxes"] >= 0) & (t["boxes"] <= 1)).all()
        assert len(t["labels"]) == len(t["boxes"]) == len(t["area"])


def test_transform_primitives():
    img = Image.new("RGB", (100, 50))
    t = {"boxes": torch.tensor([[10.0, 5.0, 30.0, 25.0], [90.0, 40.0, 100.0, 50.0]]),
         "labels": torch.tensor([1, 2]), "area": torch.tensor([400.0, 100.0]),
         "iscrowd": torch.zeros(2, dtype=torch.int64), "size": torch.tensor([50, 100])}
    f_img, f_t = hflip(*hflip(img, t))
    assert torch.equal(f_t["boxes"], t["boxes"])
    assert hflip(img, t)[1]["boxes"][0].tolist() == [70.0, 5.0, 90.0, 25.0]
    c_img, c_t = crop(img, t, top=0, left=0, h=30, w=60)  # second box falls outside: removed
    assert c_img.size == (60, 30) and c_t["labels"].tolist() == [1] and c_t["boxes"][0].tolist() == [10, 5, 30, 25]
    c_img, c_t = crop(img, t, top=10, left=20, h=30, w=60)  # first box clipped
    assert c_t["boxes"][0].tolist() == [0.0, 0.0, 10.0, 15.0] and c_t["area"][0] == 150
    r_img, r_t = resize(img, t, 100, 1333)
    assert r_img.size == (200, 100) and r_t["boxes"][0].tolist() == [20.0, 10.0, 60.0, 50.0]
    tr = make_detection_transforms(train=True)
    for s in range(20):  # crops never produce empty or out-of-image boxes
        im, tt = tr(Image.new("RGB", (640, 480)), {k: v.clone() * (6.4 if k == "boxes" else 1) for k, v in t.items()},
                    np.random.default_rng(s))
        h, w = tt["size"].tolist()
        assert (im.height, im.width) == (h, w)
        assert ((tt["boxes"][:, 2:] > tt["boxes"][:, :2]).all() and (tt["boxes"][:, 2] <= w + 1e-3).all())


def test_bad_annotations_and_missing_files(tmp_path, cfg_factory):
    img_dir, ann = write_coco_dataset(tmp_path, 4, seed=3, split="train")
    d = json.loads(ann.read_text())
    w0 = d["images"][0]["width"]
    d["annotations"] += [
        {"id": 900, "image_id": 1, "category_id": 1, "bbox": [5, 5, 0, 10], "area": 0, "iscrowd": 0},       # degenerate
        {"id": 901, "image_id": 1, "category_id": 2, "bbox": [w0 - 5, 2, 20, 10], "area": 200, "iscrowd": 0},  # clipped
        {"id": 902, "image_id": 1, "category_id": 2, "bbox": [w0 + 5, 2, 20, 10], "area": 200, "iscrowd": 0},  # outside
    ]
    d["images"].append({"id": 99, "file_name": "gone.jpg", "width": 50, "height": 50})                      # missing
    ann.write_text(json.dumps(d))
    (img_dir / d["images"][1]["file_name"]).write_bytes(b"")  # empty file
    cfg = _ft_cfg(cfg_factory, "data.source=coco", f"data.path={tmp_path}", "data.batch_size=2")
    ds = build_detection_dataset(cfg, "train")
    seen, n = {}, 0
    for b in detection_batches(cfg, ds, epoch=0):
        assert "patches" not in b and b["images"].shape[0] == len(b["targets"]) == b["mask"].shape[0]
        n += len(b["targets"])
        for k, v in b["skipped"].items():
            seen[k] = seen.get(k, 0) + v
    assert n == 3
    assert seen == {skips.BOX_DEGENERATE: 2, skips.BOX_CLIPPED: 1, skips.MISSING_FILE: 1, skips.EMPTY_FILE: 1}


def test_detection_batches_workers_and_val_keeps_all(coco_root, cfg_factory):
    c0 = _ft_cfg(cfg_factory, "data.source=coco", f"data.path={coco_root}", "data.num_workers=0", "data.batch_size=2")
    c2 = _ft_cfg(cfg_factory, "data.source=coco", f"data.path={coco_root}", "data.num_workers=2", "data.batch_size=2")
    ds = build_detection_dataset(c0, "train")
    a, b = list(detection_batches(c0, ds, 1)), list(detection_batches(c2, ds, 1))
    assert len(a) == 3 and all(torch.equal(x["images"], y["images"]) and torch.equal(x["mask"], y["mask"])
                               for x, y in zip(a, b))
    for x in a:
        for i, t in enumerate(x["targets"]):
            h, w = t["size"].tolist()
            assert not x["mask"][i, :h, :w].any() and x["mask"][i, h:].all() and x["mask"][i, :, w:].all()
    val = build_detection_dataset(c0, "val")
    ids = [int(t["image_id"]) for r in range(2) for bt in detection_batches(c0, val, 0, rank=r, world_size=2)
           for t in bt["targets"]]
    assert sorted(ids) == sorted(val.ids)  # 3 images over 2 ranks: none dropped for evaluation


def test_voc_to_coco_loads_in_pycocotools(tmp_path, cfg_factory):
    base07 = write_voc_dataset(tmp_path, "2007", n_trainval=5, n_test=3, seed=4, difficult_prob=0.3)
    write_voc_dataset(tmp_path, "2012", n_trainval=3, n_test=0, seed=5)
    info = parse_voc_xml(next((base07 / "Annotations").glob("*.xml")))
    assert info["width"] > 0 and info["objects"]
    d = voc_to_coco(tmp_path, [("2007", "trainval"), ("2012", "trainval")])
    coco = coco_from_dict(d)
    assert len(coco.getImgIds()) == 8 and num_classes_of(coco) == 21
    assert {a["iscrowd"] for a in d["annotations"]} <= {0, 1} and any(a["iscrowd"] for a in d["annotations"])
    assert all(a["bbox"][2] > 0 and a["bbox"][3] > 0 for a in d["annotations"])
    # round-trip through a json file and COCO(), then COCOeval of the ground truth against itself = AP 1
    p = tmp_path / "voc_test.json"
    test = voc_to_coco(tmp_path, [("2007", "test")])
    p.write_text(json.dumps(test))
    gt = load_coco(p)
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in test["annotations"] if not a["iscrowd"]]
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate(); ev.accumulate(); ev.summarize()
    assert ev.stats[0] > 0.99
    cfg = cfg_factory("stage=finetune", "model.num_classes=21", "data.source=voc", f"data.path={tmp_path}")
    train, val = build_detection_dataset(cfg, "train"), build_detection_dataset(cfg, "val")
    assert len(train) == 8 and len(val) == 3
    item = train[0]
    assert item["image"].shape[0] == 3 and item["target"]["labels"].min() >= 1
    assert not any(a["iscrowd"] for a in train.coco.imgToAnns[train.ids[0]]) or \
        len(item["target"]["labels"]) <= len(train.coco.imgToAnns[train.ids[0]])


def test_voc_box_conversion_exact(tmp_path):
    write_voc_dataset(tmp_path, "2007", n_trainval=2, n_test=0, seed=6)
    xml = tmp_path / "VOC2007" / "Annotations" / "2007_000000.xml"
    o = parse_voc_xml(xml)["objects"][0]
    d = voc_to_coco(tmp_path, [("2007", "trainval")])
    a = d["annotations"][0]
    assert a["bbox"] == [o[1] - 1, o[2] - 1, o[3] - o[1] + 1, o[4] - o[2] + 1]


def test_coco_target_rules():
    c = skips.SkipCounter()
    t = coco_target([{"bbox": [0, 0, 10, 10], "category_id": 3, "iscrowd": 1},
                     {"bbox": [-5, 2, 10, 4], "category_id": 1},
                     {"bbox": [1, 1, -3, 4], "category_id": 1}], 7, 20, 20, c)
    assert t["labels"].tolist() == [1] and t["boxes"].tolist() == [[0.0, 2.0, 5.0, 6.0]]
    assert c.total == {skips.BOX_CLIPPED: 1, skips.BOX_DEGENERATE: 1}

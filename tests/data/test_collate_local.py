"""Padding collate and the local (no Ray) batch iterator: determinism, ranks, skip, step cap."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from updetr.data import local_pretrain_batches
from updetr.data.collate import collate_records, pad_images
from updetr.data.local_loader import rank_batches
from updetr.data.synthetic import write_image_folder


def _same(a: dict, b: dict) -> bool:
    return (torch.equal(a["images"], b["images"]) and torch.equal(a["mask"], b["mask"])
            and torch.equal(a["patches"], b["patches"]) and len(a["targets"]) == len(b["targets"])
            and all(torch.equal(x[k], y[k]) for x, y in zip(a["targets"], b["targets"]) for k in x))


def _ids(batches):
    return [int(t["image_id"]) for b in batches for t in b["targets"]]


def test_pad_images_mask():
    ims = [torch.rand(3, 5, 7), torch.rand(3, 8, 4)]
    out, mask = pad_images(ims)
    assert out.shape == (2, 3, 8, 7) and mask.shape == (2, 8, 7) and mask.dtype == torch.bool
    assert not mask[0, :5, :7].any() and mask[0, 5:].all() and torch.equal(out[0, :, :5, :7], ims[0])
    assert not mask[1, :8, :4].any() and mask[1, :, 4:].all() and (out[1, :, :, 4:] == 0).all()


def test_collate_records_shapes_and_padding():
    recs = [{"image": np.full((h, w, 3), 200, np.uint8), "patches": np.zeros((3, 8, 8, 3), np.uint8),
             "boxes": np.full((3, 4), 0.5, np.float32), "image_id": np.int64(i),
             "orig_size": np.array([h, w]), "size": np.array([h, w])} for i, (h, w) in enumerate([(6, 9), (10, 4)])]
    b = collate_records(recs, {"too_small": 1})
    assert b["images"].shape == (2, 3, 10, 9) and b["patches"].shape == (2, 3, 3, 8, 8)
    assert b["mask"][0, 6:].all() and not b["mask"][0, :6, :9].any() and b["mask"][1, :, 4:].all()
    assert (b["images"][0, :, 6:] == 0).all() and (b["images"][1, :, :, 4:] == 0).all()
    assert torch.allclose(b["images"][0, 0, 0, 0], torch.tensor((200 / 255 - 0.485) / 0.229), atol=2e-6)
    assert b["skipped"] == {"too_small": 1} and b["targets"][1]["labels"].tolist() == [1, 1, 1]
    empty = collate_records([], {}, num_patches=3, patch_size=8)
    assert empty["images"].shape[0] == 0 and empty["patches"].shape == (0, 3, 3, 8, 8) and empty["targets"] == []


def test_workers_do_not_change_batches(cfg_factory):
    make_cfg = cfg_factory
    b0 = list(local_pretrain_batches(make_cfg("data.num_workers=0"), epoch=1))
    b2 = list(local_pretrain_batches(make_cfg("data.num_workers=2"), epoch=1))
    assert len(b0) == len(b2) == 3 and all(_same(x, y) for x, y in zip(b0, b2))


def test_folder_source_workers_and_epochs(tmp_path, cfg_factory):
    make_cfg = cfg_factory
    write_image_folder(tmp_path / "imgs", 10, seed=1, size_range=(40, 60))
    cfg0 = make_cfg("data.source=folder", f"data.path={tmp_path / 'imgs'}", "data.num_workers=0")
    cfg2 = make_cfg("data.source=folder", f"data.path={tmp_path / 'imgs'}", "data.num_workers=2")
    e0 = list(local_pretrain_batches(cfg0, 0))
    assert all(_same(x, y) for x, y in zip(e0, local_pretrain_batches(cfg2, 0)))
    e1 = list(local_pretrain_batches(cfg0, 1))
    assert sorted(_ids(e0)) == sorted(_ids(e1)) and _ids(e0) != _ids(e1)  # same samples, new order
    assert len(set(_ids(e0))) == 10


def test_ranks_partition_the_epoch(cfg_factory):
    make_cfg = cfg_factory
    cfg = make_cfg("data.synthetic_images=11", "data.batch_size=2")
    per_rank = [_ids(local_pretrain_batches(cfg, 0, rank=r, world_size=3)) for r in range(3)]
    assert [len(p) for p in per_rank] == [3, 3, 3]  # 11 // 3 each, remainder dropped
    flat = [i for p in per_rank for i in p]
    assert len(set(flat)) == 9 and set(flat) <= set(range(11))
    single = _ids(local_pretrain_batches(cfg, 0))
    assert set(flat) <= set(single)


def test_skip_and_steps_cap(cfg_factory):
    make_cfg = cfg_factory
    cfg = make_cfg("data.synthetic_images=12", "data.batch_size=2")
    full = list(local_pretrain_batches(cfg, 2))
    assert len(full) == 6
    resumed = list(local_pretrain_batches(cfg, 2, skip=4))
    assert len(resumed) == 2 and _same(resumed[0], full[4]) and _same(resumed[1], full[5])
    capped = make_cfg("data.synthetic_images=12", "data.batch_size=2", "schedule.steps_per_epoch=3")
    assert len(list(local_pretrain_batches(capped, 2))) == 3
    assert len(list(local_pretrain_batches(capped, 2, skip=2))) == 1


def test_no_shuffle_order(cfg_factory):
    make_cfg = cfg_factory
    cfg = make_cfg("data.shuffle=false", "data.synthetic_images=6", "data.batch_size=4")
    assert _ids(local_pretrain_batches(cfg, 5)) == list(range(6))
    assert [len(b) for b in rank_batches(6, 4, 0, 0, False, 0, 1)] == [4, 2]


def test_rank_out_of_range():
    with pytest.raises(ValueError):
        rank_batches(10, 2, 0, 0, True, 2, 2)


def test_last_short_batch_dropped_by_default_as_in_the_reference():
    from updetr.config import load_config

    cfg = load_config(None, ["data.synthetic_images=11", "data.batch_size=2", "data.num_workers=0",
                             "data.synthetic_size=[40,64]", "pretext.scales=[64]", "pretext.max_size=80",
                             "pretext.patch_size=32"])
    assert cfg.data.drop_last  # the official batch sampler drops the last short batch
    sizes = [b["images"].shape[0] for b in local_pretrain_batches(cfg, 0)]
    assert sizes == [2] * 5  # 11 images: the 11th is not a batch of 1
    two_ranks = [[b["images"].shape[0] for b in local_pretrain_batches(cfg, 0, rank=r, world_size=2)]
                 for r in range(2)]
    assert two_ranks == [[2, 2], [2, 2]]  # 5 per rank: the short 5th dropped on both
    assert [len(b) for b in rank_batches(6, 4, 0, 0, False, 0, 1, drop_last=True)] == [4]

"""CoAE's one-shot protocol by default: training images that show an unseen class kept (its objects are
background), the episode class drawn by inverse class frequency, the query patch flipped with p = 0.5, AP50 as
VOC07's 11-point; the earlier protocol as options."""
import numpy as np
import pytest
import torch

from updetr.config import load_config
from updetr.data.coco import coco_from_dict
from updetr.data.oneshot import OneShotDataset
from updetr.data.oneshot_pairs import TrainEpisodes, all_classes, split_classes
from updetr.data.synthetic import write_voc_dataset
from updetr.data.voc import TRAIN_SETS, voc_to_coco


def test_config_defaults_are_coaes():
    cfg = load_config(None, ["task=oneshot", "data.source=synthetic_voc", "tracking.enabled=false"])
    o = cfg.oneshot
    assert (o.train_images_with_unseen, o.class_sampling, o.query_flip) == (True, "inverse_frequency", 0.5)
    assert cfg.eval.metric == "voc07"


def _coco(images: list[list[int]]) -> object:
    """One 100x100 image per entry, one 40x40 box per listed category id."""
    anns = [{"id": k + 1, "image_id": i + 1, "category_id": c, "bbox": [10.0, 10.0, 40.0, 40.0], "area": 1600.0,
             "iscrowd": 0} for k, (i, c) in enumerate((i, c) for i, cs in enumerate(images) for c in cs)]
    return coco_from_dict({"images": [{"id": i + 1, "file_name": f"{i}.jpg", "width": 100, "height": 100}
                                      for i in range(len(images))],
                           "annotations": anns, "categories": [{"id": c, "name": str(c)} for c in range(1, 21)]})


def test_images_with_an_unseen_class_are_kept_by_default():
    seen, unseen = split_classes(["aeroplane"])          # aeroplane = 1
    coco = _coco([[2, 1], [2], [3], [3, 1], [2, 3]])
    kept = TrainEpisodes(coco, seen, unseen, 8, seed=0)
    dropped = TrainEpisodes(coco, seen, unseen, 8, seed=0, allow_unseen=False)
    assert {i for i, _ in kept.choices} == {1, 2, 3, 4, 5}
    assert {i for i, _ in dropped.choices} == {2, 3, 5}
    # an unseen class is never asked for: its objects are background
    assert all(1 not in classes for _, classes in kept.choices)
    assert any(all_classes(coco, i) & set(unseen) for i, _ in kept.choices)


def test_episode_class_is_drawn_by_inverse_frequency():
    # class 2 in 9 images, class 3 in 1 other image and in the shared image 10 -> frequencies 10 and 2
    coco = _coco([[2]] * 9 + [[2, 3], [3]])
    seen, unseen = split_classes(["aeroplane"])
    inv = TrainEpisodes(coco, seen, unseen, 8, seed=0)
    uni = TrainEpisodes(coco, seen, unseen, 8, seed=0, class_sampling="uniform")
    assert inv.frequency[2] == 10 and inv.frequency[3] == 2
    shared = next(k for k, (i, _) in enumerate(inv.choices) if i == 10)
    draws = 4000
    p_inv = np.mean([inv.episode(shared, e).category_id == 3 for e in range(draws)])
    p_uni = np.mean([uni.episode(shared, e).category_id == 3 for e in range(draws)])
    expected = (1 / 2) / (1 / 2 + 1 / 10)                 # 5/6
    assert abs(p_inv - expected) < 0.03 and abs(p_uni - 0.5) < 0.03


def test_training_query_patch_is_flipped_with_probability_half(tmp_path):
    write_voc_dataset(tmp_path, "2007", n_trainval=12, n_test=1, seed=5, size_range=(64, 96))
    coco = coco_from_dict(voc_to_coco(tmp_path, TRAIN_SETS[:1]))
    seen, unseen = split_classes(["aeroplane"])
    eps = TrainEpisodes(coco, seen, unseen, 8, seed=0)
    plain = OneShotDataset(tmp_path, coco, True, 0, 32, query_flip=0.0)
    half = OneShotDataset(tmp_path, coco, True, 0, 32, query_flip=0.5)
    always = OneShotDataset(tmp_path, coco, True, 0, 32, query_flip=1.0)
    flipped = []
    for epoch in range(4):
        for i in range(len(eps)):
            ep = eps.episode(i, epoch)
            p0 = plain.load(i, ep, epoch)["patch"]
            assert torch.equal(always.load(i, ep, epoch)["patch"], p0.flip(-1))
            p = half.load(i, ep, epoch)["patch"]
            assert torch.equal(p, p0) or torch.equal(p, p0.flip(-1))
            flipped.append(not torch.equal(p, p0))
    assert 0.3 < np.mean(flipped) < 0.7 and len(flipped) >= 30
    # evaluation queries are never flipped
    ev = OneShotDataset(tmp_path, coco, False, 0, 32, query_flip=1.0)
    ep = eps.episode(0, 0)
    assert torch.equal(ev.load(0, ep)["patch"], OneShotDataset(tmp_path, coco, False, 0, 32).load(0, ep)["patch"])

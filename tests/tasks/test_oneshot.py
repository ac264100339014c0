"""One-shot detection (paper §4.3, Table 3): the seen / unseen split, episode sampling, per-class AP50, the
evaluation's repeatability, initialisation from pre-training, and a smoke run on synthetic VOC-style data."""
from __future__ import annotations

import math

import pytest
import torch

from updetr.config import ConfigError, load_config
from updetr.data.coco import coco_from_dict
from updetr.data.oneshot_pairs import (NO_SUPPORT, QUERY_TOO_SMALL, NoSupportError, SupportPool, TrainEpisodes,
                                       all_classes, eval_episodes, present_classes, split_classes)
from updetr.data.synthetic import write_voc_dataset
from updetr.data.voc import TEST_SETS, TRAIN_SETS, VOC_CLASSES, voc_to_coco
from updetr.eval.oneshot_eval import PAPER_SEEN_ORDER, PAPER_UNSEEN_ORDER, OneShotEvaluator

from .conftest import TINY

NAMES = {i + 1: n for i, n in enumerate(VOC_CLASSES)}


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("oneshot_voc")
    write_voc_dataset(root, "2007", n_trainval=40, n_test=10, seed=7, size_range=(64, 96))
    return root


def voc_coco(root, sets):
    return coco_from_dict(voc_to_coco(root, sets))


def oneshot_cfg(root, *extra):
    # pre-norm stated: these models take tiny pre-training weights by hand (from scratch the default is post-norm)
    return load_config(None, TINY + ["task=oneshot", "data.source=voc", f"data.path={root}", "pretext.patch_size=32",
                                     "data.batch_size=4", "model.pre_norm=true"] + list(extra))


def test_default_split_is_the_papers_table3_split():
    cfg = oneshot_cfg("unused")
    seen, unseen = split_classes(cfg.oneshot.unseen_classes)
    assert sorted(NAMES[c] for c in unseen) == ["aeroplane", "cat", "cow", "sheep"]
    assert sorted(NAMES[c] for c in seen) == sorted(set(VOC_CLASSES) - {"aeroplane", "cat", "cow", "sheep"})
    assert len(seen) == 16
    # Table 3's column order covers exactly the two groups
    assert set(PAPER_SEEN_ORDER) == {NAMES[c] for c in seen} and set(PAPER_UNSEEN_ORDER) == {NAMES[c] for c in unseen}


def test_table_prints_the_papers_column_order():
    metrics = {f"seen_AP50_{n}": 0.5 for n in PAPER_SEEN_ORDER}
    metrics.update({f"unseen_AP50_{n}": 0.25 for n in PAPER_UNSEEN_ORDER})
    metrics.update(seen_AP50=0.5, unseen_AP50=0.25, seen_episodes=3, unseen_episodes=1)
    lines = OneShotEvaluator.format_table(metrics, "t").splitlines()
    header = lines[2].replace("|", " ").split()
    assert header == ["plant", "sofa", "tv", "car", "bottle", "boat", "chair", "person", "bus", "train", "horse",
                      "bike", "dog", "bird", "mbike", "table", "AP50", "cow", "sheep", "cat", "aero", "AP50"]
    assert lines[3].replace("|", " ").split() == ["50.0"] * 17 + ["25.0"] * 5


def test_training_pairs_never_query_the_target_and_never_use_an_unseen_class(voc_root):
    coco = voc_coco(voc_root, TRAIN_SETS[:1])
    seen, unseen = split_classes(["aeroplane"])  # the synthetic set's shapes: aeroplane, bicycle, bird, boat
    for allow in (False, True):
        eps = TrainEpisodes(coco, seen, unseen, min_px=8, seed=1, allow_unseen=allow)
        assert len(eps) > 5
        for epoch in range(3):
            for i in range(len(eps)):
                ep = eps.episode(i, epoch)
                assert ep.query.image_id != ep.target_image
                assert ep.category_id in seen and ep.query.category_id == ep.category_id
                assert ep.category_id in present_classes(coco, ep.target_image)
                if not allow:  # default: images showing an unseen object are neither targets nor queries
                    assert not all_classes(coco, ep.target_image) & set(unseen)
                    assert not all_classes(coco, ep.query.image_id) & set(unseen)
    # seeded: the same (seed, epoch) gives the same episodes; another epoch draws other queries
    e1, e2 = TrainEpisodes(coco, seen, unseen, 8, seed=1), TrainEpisodes(coco, seen, unseen, 8, seed=1)
    a, b, c = ([e.episode(i, epoch) for i in range(len(e1))] for e, epoch in ((e1, 0), (e2, 0), (e2, 1)))
    assert a == b and a != c


def test_eval_episodes_cover_every_present_class_with_a_query_from_another_image(voc_root):
    coco = voc_coco(voc_root, TEST_SETS)
    episodes, counts = eval_episodes(coco, list(range(1, 21)), min_px=8, seed=3)
    pairs = {(e.target_image, e.category_id) for e in episodes}
    assert len(pairs) == len(episodes)
    expected = {(i, c) for i in coco.imgs for c in present_classes(coco, i)}
    assert pairs <= expected and len(pairs) == len(expected) - counts.get(NO_SUPPORT, 0)
    assert all(e.query.image_id != e.target_image for e in episodes)
    assert eval_episodes(coco, list(range(1, 21)), 8, seed=3)[0] == episodes  # seeded per (image, class)


def test_small_queries_are_skipped_and_counted_and_no_support_names_the_class(voc_root):
    coco = voc_coco(voc_root, TEST_SETS)
    pool = SupportPool(coco, [2], min_px=1000)  # every instance is below 1000 px
    assert pool.counts[QUERY_TOO_SMALL] == sum(1 for a in coco.dataset["annotations"]
                                               if a["category_id"] == 2 and not a["iscrowd"])
    assert pool.counts[QUERY_TOO_SMALL] > 0
    with pytest.raises(NoSupportError, match="class 'bicycle': no instance in the support pool"):
        pool.draw(2, exclude_image=next(iter(coco.imgs)), rng=__import__("numpy").random.default_rng(0))


def test_perfect_predictions_score_ap50_one_and_wrong_boxes_zero(voc_root):
    coco = voc_coco(voc_root, TEST_SETS)
    seen, unseen = split_classes(["aeroplane"])
    episodes, counts = eval_episodes(coco, seen + unseen, 8, seed=0)

    def predictions(shift: float):
        out = {}
        for i, ep in enumerate(episodes):
            anns = [a for a in coco.imgToAnns[ep.target_image] if a["category_id"] == ep.category_id]
            boxes = torch.tensor([[a["bbox"][0] + shift, a["bbox"][1], a["bbox"][0] + shift + a["bbox"][2],
                                   a["bbox"][1] + a["bbox"][3]] for a in anns])
            out[i] = {"scores": torch.ones(len(anns)), "labels": torch.ones(len(anns), dtype=torch.int64),
                      "boxes": boxes}
        return out

    ev = OneShotEvaluator(coco, episodes, NAMES, seen, unseen, counts)
    ev.update(predictions(0.0))
    m = ev.summarize()
    evaluated = {NAMES[e.category_id] for e in episodes}
    assert {"aeroplane", "bicycle", "bird", "boat"} <= evaluated
    for c in seen:
        assert m[f"seen_AP50_{NAMES[c]}"] == (1.0 if NAMES[c] in evaluated else -1.0)
    assert m["unseen_AP50_aeroplane"] == 1.0 and m["seen_AP50"] == 1.0 and m["unseen_AP50"] == 1.0
    assert m["seen_episodes"] + m["unseen_episodes"] == len(episodes)

    ev = OneShotEvaluator(coco, episodes, NAMES, seen, unseen, counts)
    ev.update(predictions(500.0))  # every box far off its object: no true positive
    m = ev.summarize()
    assert m["seen_AP50"] == 0.0 and m["unseen_AP50"] == 0.0


def test_config_refuses_a_non_voc_source_and_unknown_classes():
    with pytest.raises(ConfigError, match="one-shot detection reads voc | synthetic_voc"):
        load_config(None, ["task=oneshot", "data.source=coco", "data.path=x"])
    with pytest.raises(ConfigError, match=r"oneshot.unseen_classes: .*\['horse2'\] are not VOC classes"):
        load_config(None, ["task=oneshot", "data.source=synthetic_voc", "oneshot.unseen_classes=[cow,horse2]"])
    with pytest.raises(ConfigError, match="loss.feature .* must be 0 for oneshot"):
        load_config(None, ["task=oneshot", "data.source=synthetic_voc", "loss.feature=1"])


def test_init_from_pretraining_keeps_patch2query_feature_align_and_the_match_head(voc_root):
    from updetr.tasks import get_task

    pre_model, _, _ = get_task(load_config(None, TINY)).build()
    one = get_task(oneshot_cfg(voc_root))
    model, _, _ = one.build()
    report = one.init_weights(model, {"model": pre_model.state_dict(), "config": {"task": "pretrain"}}, "pre.pt")
    assert report.dropped == [] and report.reinitialised == []
    for k in ("patch2query.weight", "feature_align.layers.1.weight", "class_embed.weight", "query_embed.weight"):
        assert torch.equal(model.state_dict()[k], pre_model.state_dict()[k]), k


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_smoke_run_ends_with_finite_per_class_ap_and_evaluation_is_repeatable(tmp_path):
    from updetr.local import eval_local, run_debug

    cfg = load_config(None, TINY + ["task=oneshot", "data.source=synthetic_voc", "data.synthetic_images=16",
                                    "data.synthetic_val_images=6", "data.synthetic_size=[64,80]",
                                    "pretext.patch_size=32", "data.batch_size=4", "schedule.epochs=2",
                                    "schedule.eval_every=0", "schedule.lr_drop=100", "optim.lr=1e-3",
                                    f"runtime.output_dir={tmp_path}", "runtime.threads=2", "name=oneshot_smoke",
                                    "oneshot.train_images_with_unseen=false"])  # as many steps as before CoAE's default
    outcome = run_debug(cfg, out=open(tmp_path / "log.txt", "w"))
    last = outcome.eval_metrics
    assert outcome.state.epoch == 2 and last is not None
    per_class = {k: v for k, v in last.items() if "_AP50_" in k}
    assert len(per_class) == 20
    evaluated = [v for v in per_class.values() if v != -1.0]
    assert evaluated and all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in evaluated)
    assert 0.0 <= last["seen_AP50"] <= 1.0 and 0.0 <= last["unseen_AP50"] <= 1.0
    assert last["unseen_episodes"] > 0 and last["seen_episodes"] > 0
    # same checkpoint -> same numbers, and the same as the run's own final evaluation
    a = eval_local(cfg, outcome.checkpoint)
    b = eval_local(cfg, outcome.checkpoint)
    scores = [k for k in a if "AP50" in k or "episodes" in k]
    assert {k: a[k] for k in scores} == {k: b[k] for k in scores} == {k: last[k] for k in scores}

"""Ray Data path: equals the local path per sample, epochs via the clock, streaming_split, shards, bad data."""
from __future__ import annotations

import threading

import pytest
import torch

ray = pytest.importorskip("ray")

from updetr.data import local_pretrain_batches, skips  # noqa: E402
from updetr.data.ray_pipeline import build_pretrain_dataset, iter_worker_batches  # noqa: E402
from updetr.data.shards import write_shards  # noqa: E402
from updetr.data.synthetic import write_bad_files, write_image_folder  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray_imgs")
    write_image_folder(root, 12, seed=11, size_range=(40, 64))
    return root


def _by_id(batches):
    out = {}
    for b in batches:
        assert b["images"].shape[0] == b["patches"].shape[0] == b["mask"].shape[0] == len(b["targets"])
        for i, t in enumerate(b["targets"]):
            h, w = t["size"].tolist()
            hm, wm = b["mask"].shape[1:]
            assert not b["mask"][i, :h, :w].any() and b["mask"][i].sum() == hm * wm - h * w
            iid = int(t["image_id"])
            assert iid not in out, "duplicated sample"
            out[iid] = (b["images"][i, :, :h, :w], b["patches"][i], t["boxes"], t["orig_size"])
    return out


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        for x, y in zip(a[k], b[k]):
            assert torch.equal(x, y), k


def test_folder_equals_local_for_two_epochs(folder, cfg_factory):
    cfg = cfg_factory("data.source=folder", f"data.path={folder}", "data.num_workers=1", "data.batch_size=5")
    ds = build_pretrain_dataset(cfg)
    for epoch in (0, 1):
        got = _by_id(iter_worker_batches(ds.iterator(), cfg, epoch))
        _assert_same(got, _by_id(local_pretrain_batches(cfg, epoch)))
    assert len(got) == 12


def test_streaming_split_two_consumers_no_dup_no_loss(folder, cfg_factory):
    cfg = cfg_factory("data.source=folder", f"data.path={folder}", "data.num_workers=1", "data.batch_size=2")
    shards = build_pretrain_dataset(cfg).streaming_split(2, equal=True)
    results: list = [None, None]

    def consume(i):
        results[i] = [int(t["image_id"]) for b in iter_worker_batches(shards[i], cfg, 0) for t in b["targets"]]

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(2)]
    [t.start() for t in threads]
    [t.join(timeout=120) for t in threads]
    assert all(r is not None for r in results), "a consumer hung"
    assert len(results[0]) == len(results[1]) == 6
    assert set(results[0]).isdisjoint(results[1])
    assert set(results[0]) | set(results[1]) == set(_by_id(local_pretrain_batches(cfg, 0)))


def test_shards_and_synthetic_equal_local(folder, tmp_path, cfg_factory):
    write_shards(folder, tmp_path / "sh", shard_size=5)
    cfg = cfg_factory("data.source=shards", f"data.path={tmp_path / 'sh'}", "data.num_workers=1")
    ref = _by_id(local_pretrain_batches(cfg_factory("data.source=folder", f"data.path={folder}"), 2))
    _assert_same(_by_id(iter_worker_batches(build_pretrain_dataset(cfg), cfg, 2)), ref)
    syn = cfg_factory("data.source=synthetic", "data.synthetic_images=6", "data.num_workers=2",
                      "schedule.steps_per_epoch=1", "data.batch_size=3")
    got = list(iter_worker_batches(build_pretrain_dataset(syn), syn, 0))
    assert len(got) == 1 and len(got[0]["targets"]) == 3  # steps_per_epoch caps the stream
    full = _by_id(local_pretrain_batches(syn.model_copy(update={"schedule": syn.schedule.model_copy(
        update={"steps_per_epoch": None})}), 0))
    one = _by_id(got)
    for k in one:
        for x, y in zip(one[k], full[k]):
            assert torch.equal(x, y)


def test_bad_data_is_counted_not_fatal(tmp_path, cfg_factory, monkeypatch):
    root = tmp_path / "mixed"
    write_image_folder(root, 3, seed=12, size_range=(40, 60))
    write_bad_files(root / "bad")
    monkeypatch.chdir(tmp_path)  # a relative data.path: sample ids must still be relative to it
    cfg = cfg_factory("data.source=folder", "data.path=mixed", "data.num_workers=1", "data.batch_size=4")
    seen: dict = {}
    ids = set()
    for b in iter_worker_batches(build_pretrain_dataset(cfg), cfg, 0):
        ids |= {int(t["image_id"]) for t in b["targets"]}
        for k, v in b["skipped"].items():
            seen[k] = seen.get(k, 0) + v
    assert ids == set(_by_id(local_pretrain_batches(cfg, 0)))
    assert len(ids) == 3 + 5  # 5 converted files kept
    assert seen == {skips.EMPTY_FILE: 1, skips.UNREADABLE: 1, skips.TRUNCATED: 1, skips.TOO_SMALL: 1,
                    "converted_cmyk": 1, "converted_gray": 1, "converted_alpha": 1, "converted_16bit": 1,
                    "converted_palette": 1}


def test_batches_from_a_class_sorted_folder_span_many_classes(tmp_path, cfg_factory):
    """ImageNet-like class folders -> `updetr data shard` -> Ray Data: each batch mixes classes, as the
    official sampler's uniform draws do (path-ordered shards gave batches of one or two classes)."""
    from tests.data.test_shards import _class_sorted_folder

    # The ImageNet proportions, scaled down: classes larger than the shuffle buffer, shards of about a class.
    _class_sorted_folder(tmp_path / "src", classes=8, per_class=40)
    write_shards(tmp_path / "src", tmp_path / "sh", shard_size=40)
    cfg = cfg_factory("data.source=shards", f"data.path={tmp_path / 'sh'}", "data.num_workers=1",
                      "data.batch_size=8", "pretext.min_image_px=17")
    per_batch = [len({int(t["orig_size"][1]) for t in b["targets"]})  # width 40+4k identifies class k
                 for b in iter_worker_batches(build_pretrain_dataset(cfg), cfg, 0)]
    assert len(per_batch) == 40
    assert sum(per_batch) / len(per_batch) >= 4, per_batch  # uniform draws: ~5.3 classes per batch of 8

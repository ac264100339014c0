"""Shard writing (streaming, flat memory), manifest, read-back round trip, and the `updetr data` command."""
from __future__ import annotations

import argparse
import json
import os
import tarfile
import tracemalloc

import torch

from updetr.data import local_pretrain_batches
from updetr.data.commands import register
from updetr.data.shards import index_shard, iter_image_files, iter_shard_samples, read_manifest, write_shards
from updetr.data.synthetic import write_image_folder


def test_round_trip_counts_and_bytes(tmp_path):
    src = tmp_path / "src"
    rels = write_image_folder(src, 23, seed=3, size_range=(30, 50))
    (src / "notes.txt").write_text("not an image")  # ignored: not an image extension
    m = write_shards(src, tmp_path / "out", shard_size=10)
    assert m["count"] == 23 and [s["count"] for s in m["shards"]] == [10, 10, 3]
    assert m["bytes"] == sum((src / r).stat().st_size for r in rels)
    assert read_manifest(tmp_path / "out") == json.loads((tmp_path / "out" / "manifest.json").read_text())
    back = {}
    for s in m["shards"]:
        for rel, data in iter_shard_samples(str(tmp_path / "out" / s["name"])):
            back[rel] = data
    assert sorted(back) == sorted(rels)
    assert all(back[r] == (src / r).read_bytes() for r in rels)
    # plain tar tools can read them, members grouped by key as WebDataset requires
    with tarfile.open(tmp_path / "out" / m["shards"][0]["name"]) as t:
        names = t.getnames()
    assert names[:2] == ["000000000.image", "000000000.path"]


def test_write_memory_is_flat(tmp_path):
    src = tmp_path / "src"
    write_image_folder(src, 400, seed=4, size_range=(24, 40), nested=True)

    def peak(n_limit_dir: str, out: str) -> int:
        tracemalloc.start()
        write_shards(n_limit_dir, tmp_path / out, shard_size=50)
        _, p = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return p

    small = tmp_path / "small"
    write_image_folder(small, 40, seed=4, size_range=(24, 40), nested=True)
    p_small, p_big = peak(str(small), "o1"), peak(str(src), "o2")
    assert p_big < 1_000_000, p_big                 # < 1 MB traced for 400 images
    assert p_big < 2.5 * p_small + 200_000, (p_small, p_big)  # does not grow with the image count


def test_shards_feed_the_same_samples_as_the_folder(tmp_path, cfg_factory):
    src = tmp_path / "src"
    write_image_folder(src, 9, seed=5, size_range=(40, 60))
    write_shards(src, tmp_path / "sh", shard_size=4)
    a = list(local_pretrain_batches(cfg_factory("data.source=folder", f"data.path={src}"), 0))
    b = list(local_pretrain_batches(cfg_factory("data.source=shards", f"data.path={tmp_path / 'sh'}"), 0))
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert torch.equal(x["images"], y["images"]) and torch.equal(x["patches"], y["patches"])
        assert [int(t["image_id"]) for t in x["targets"]] == [int(t["image_id"]) for t in y["targets"]]


def test_index_shard_offsets(tmp_path):
    src = tmp_path / "src"
    rels = write_image_folder(src, 3, seed=6, size_range=(30, 40), nested=False)
    m = write_shards(src, tmp_path / "o", shard_size=5, seed=None)  # path order
    entries = index_shard(str(tmp_path / "o" / m["shards"][0]["name"]))
    assert [e.rel_path for e in entries] == rels and entries[0].size == (src / rels[0]).stat().st_size


def test_iter_image_files_sorted_nested(tmp_path):
    for rel in ["b/2.JPEG", "a/z/1.png", "a/0.jpg", "c.txt", ".hidden/3.jpg"]:
        os.makedirs(tmp_path / os.path.dirname(rel), exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    assert list(iter_image_files(tmp_path)) == [".hidden/3.jpg", "a/0.jpg", "a/z/1.png", "b/2.JPEG"]


def test_cli_shard_command(tmp_path, capsys):
    write_image_folder(tmp_path / "src", 5, seed=7, size_range=(30, 40))
    parser = argparse.ArgumentParser(prog="updetr")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", "shard", str(tmp_path / "src"), str(tmp_path / "out"), "--shard-size", "2"])
    assert args.func(args) == 0
    assert "wrote 5 images" in capsys.readouterr().out
    assert read_manifest(tmp_path / "out")["count"] == 5
    bad = parser.parse_args(["data", "shard", str(tmp_path / "nope"), str(tmp_path / "o2")])
    assert bad.func(bad) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    e = parser.parse_args(["data", "shard", str(empty), str(tmp_path / "o3")])
    assert e.func(e) == 1
    syn = parser.parse_args(["data", "synth", str(tmp_path / "voc"), "--kind", "voc", "--n", "2"])
    assert syn.func(syn) == 0 and (tmp_path / "voc" / "VOC2007" / "Annotations").is_dir()


def _class_sorted_folder(root, classes: int = 8, per_class: int = 12) -> dict[str, int]:
    """ImageNet-like `n<class>/img.jpg` folder, images of class k all sized 40+4k (so a batch shows its classes)."""
    from updetr.data.synthetic import synthetic_image

    where = {}
    for k in range(classes):
        for i in range(per_class):
            rel = f"n{k:08d}/img_{i:04d}.jpg"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            synthetic_image(k * 100 + i, 3, (40 + 4 * k, 40 + 4 * k)).save(root / rel, quality=85)
            where[rel] = k
    return where


def test_shards_hold_a_seeded_random_order_recorded_in_the_manifest(tmp_path):
    src = tmp_path / "src"
    classes = _class_sorted_folder(src)
    manifest = write_shards(src, tmp_path / "sh", shard_size=12, seed=7)
    assert manifest["order"] == {"shuffled": True, "seed": 7}
    per_shard = [{classes[rel] for rel, _ in iter_shard_samples(str(tmp_path / "sh" / s["name"]))}
                 for s in manifest["shards"]]
    assert min(len(c) for c in per_shard) >= 4, per_shard  # path order: exactly one class per shard
    again = write_shards(src, tmp_path / "sh2", shard_size=12, seed=7)
    first = [rel for rel, _ in iter_shard_samples(str(tmp_path / "sh" / "shard-000000.tar"))]
    assert first == [rel for rel, _ in iter_shard_samples(str(tmp_path / "sh2" / "shard-000000.tar"))]
    assert again["count"] == 96
    plain = write_shards(src, tmp_path / "sh3", shard_size=12, seed=None)
    assert plain["order"]["shuffled"] is False

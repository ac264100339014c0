"""Indexable unlabeled image sources for the local (no-Ray) path: synthetic, folder, shards.

Each source maps an index 0..n-1 (a fixed, sorted order) to a stable sample id and loads the item as
encoded bytes (folder, shards) or a PIL image (synthetic). Sample ids:
  * folder / shards: `sample_id_from_key(relative path)` (identical for a folder and its shards);
  * synthetic: the image index.
"""
from __future__ import annotations

import logging
import os
from typing import Union

from PIL import Image

from updetr.data import skips
from updetr.data.image_io import BadImage
from updetr.data.seeding import sample_id_from_key
from updetr.data.shards import ShardEntry, index_shard, iter_image_files, read_entry, shard_paths, walk_order_key
from updetr.data.synthetic import default_size_range, synthetic_image

log = logging.getLogger("updetr.data")

Item = Union[bytes, Image.Image]


class SyntheticSource:
    """`n` seeded synthetic images (content depends on (seed, index) only, not on the epoch)."""

    def __init__(self, n: int, seed: int, size_range) -> None:
        self.n, self.seed, self.size_range = n, seed, default_size_range(size_range)

    def __len__(self) -> int:
        return self.n

    def sample_id(self, i: int) -> int:
        return int(i)

    def load(self, i: int) -> Item:
        return synthetic_image(int(i), self.seed, self.size_range)


class FolderSource:
    """Every image file under `root` (recursive, any nesting, e.g. ImageNet train/<wnid>/*.JPEG)."""

    def __init__(self, root: str) -> None:
        if "://" in root:
            raise ValueError(f"{root}: object-store URIs are read by the Ray pipeline, not the local one")
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder not found: {root}")
        self.root = root
        self.rel_paths = list(iter_image_files(root))
        self._ids = [sample_id_from_key(r) for r in self.rel_paths]
        if not self.rel_paths:
            log.warning("data: no image files under %s", root)

    def __len__(self) -> int:
        return len(self.rel_paths)

    def sample_id(self, i: int) -> int:
        return self._ids[i]

    def load(self, i: int) -> Item:
        path = os.path.join(self.root, self.rel_paths[i])
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise BadImage(skips.MISSING_FILE, path) from None
        except OSError as e:
            raise BadImage(skips.UNREADABLE, f"{path}: {e}") from None


class ShardSource:
    """Images inside the tar shards of a `updetr data shard` output dir (random access by offset)."""

    def __init__(self, shard_dir: str) -> None:
        self.entries: list[ShardEntry] = []
        for p in shard_paths(shard_dir):
            if not os.path.isfile(p):
                log.warning("data: shard listed in the manifest is missing: %s", p)
                continue
            self.entries.extend(index_shard(p))
        # Shards hold a random order (updetr data shard); index them like the source folder, so a folder and
        # its shards give the same epoch order and the same batches.
        self.entries.sort(key=lambda e: walk_order_key(e.rel_path))
        self._ids = [sample_id_from_key(e.rel_path) for e in self.entries]

    def __len__(self) -> int:
        return len(self.entries)

    def sample_id(self, i: int) -> int:
        return self._ids[i]

    def load(self, i: int) -> Item:
        try:
            return read_entry(self.entries[i])
        except OSError as e:
            raise BadImage(skips.MISSING_FILE, f"{self.entries[i].shard}: {e}") from None


def open_source(cfg):
    """The pre-training source named by `cfg.data.source` (synthetic | folder | shards)."""
    d = cfg.data
    if d.source == "synthetic":
        return SyntheticSource(d.synthetic_images, cfg.seed, d.synthetic_size)
    if d.source == "folder":
        return FolderSource(d.path)
    if d.source == "shards":
        return ShardSource(d.path)
    raise ValueError(f"data.source '{d.source}' is not a pre-training source (synthetic | folder | shards)")

"""Image shards: stream a folder of images into WebDataset-style tar files plus a manifest, and read them back.

Format (the default and only one): POSIX tar files `shard-000000.tar`, ... holding, per image, two
members `<key>.image` (the original encoded bytes, untouched) and `<key>.path` (UTF-8 path relative to the
source root), key = 9-digit running index. `manifest.json` lists count, bytes, source and the shards.

Order: images are written in a seeded random order of the whole listing (`order` in the manifest: seed and
`"shuffled"`), not in path order. A class-sorted folder (ImageNet's `train/<wnid>/`) written in path order
gives shards of one or two classes, and a streaming reader — which shuffles shard order and then rows
within a bounded buffer — would build batches from one or two classes; the official sampler draws from the
whole set. With a random order every shard, hence every buffer, is a uniform sample of the set. The cost
is holding the path list in memory (~100 MB for ImageNet's 1.28 M paths) and non-sequential source reads.

Why tar (WebDataset) rather than Parquet with a bytes column:
  * writing streams one member at a time (memory flat in the number and size of images; Parquet buffers a
    whole row group), and a crashed write leaves valid leading shards;
  * `ray.data.read_webdataset(decoder=None)` reads them directly (raw bytes, no eager decode) and the
    files are sequential reads, which suits object stores;
  * plain `tar tf` / `tar xf` inspect or unpack them; no schema to evolve for "bytes + path".
The relative path is kept so a sample has the same id (`seeding.sample_id_from_key`) whether it is read
from the folder or from the shards, so folder- and shard-fed runs draw identical samples.
"""
from __future__ import annotations

import io
import json
import random
import logging
import os
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from updetr.data import skips
from updetr.data.image_io import is_image_name
from updetr.data.skips import SkipCounter

log = logging.getLogger("updetr.data")

MANIFEST = "manifest.json"
FORMAT = "webdataset-tar"
IMAGE_SUFFIX = "image"
PATH_SUFFIX = "path"


def iter_image_files(root: str | os.PathLike) -> Iterator[str]:
    """Relative '/'-separated paths of image files under root, any nesting, in a deterministic order
    (directories and files sorted), streamed: memory grows with one directory listing, not the tree."""
    root = os.fspath(root)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        for name in sorted(filenames):
            if is_image_name(name):
                rel = name if rel_dir == "." else os.path.join(rel_dir, name)
                yield rel.replace(os.sep, "/")


def walk_order_key(rel: str) -> tuple:
    """Sort key that puts '/'-separated relative paths in `iter_image_files` order (a folder's files, sorted,
    before its sub-folders, sorted), so shards written in any order index like their source folder."""
    *dirs, name = rel.split("/")
    return tuple((1, d) for d in dirs) + ((0, name),)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(mtime)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shards(src_dir: str | os.PathLike, out_dir: str | os.PathLike, shard_size: int = 1000,
                 counter: Optional[SkipCounter] = None, progress_every: int = 0, seed: Optional[int] = 0) -> dict:
    """Stream every image under src_dir into tar shards of `shard_size` images in out_dir.

    Images go in a random order seeded by `seed` (module docstring); `seed=None` keeps path order.

    Bytes are copied, not decoded (bad images are dealt with when read); files that disappear or cannot
    be read are counted as `missing_file`. Returns the manifest dict (also written to manifest.json).
    """
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    src, out = Path(src_dir), Path(out_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"source folder not found: {src}")
    out.mkdir(parents=True, exist_ok=True)
    counter = counter if counter is not None else SkipCounter()
    shards: list[dict] = []
    tar: Optional[tarfile.TarFile] = None
    count = total_bytes = 0
    t0 = time.time()

    def close_current() -> None:
        nonlocal tar
        if tar is not None:
            tar.close()
            tar = None

    listing: list[str] = list(iter_image_files(src))
    if seed is not None:
        random.Random(seed).shuffle(listing)
    try:
        for rel in listing:
            try:
                data = (src / rel).read_bytes()
            except OSError as e:
                counter.add(skips.MISSING_FILE)
                log.warning("shard: cannot read %s: %s", rel, e)
                continue
            if tar is None or shards[-1]["count"] >= shard_size:
                close_current()
                name = f"shard-{len(shards):06d}.tar"
                # Member names are short keys (the path lives in the `.path` member), so plain USTAR.
                tar = tarfile.open(out / name, "w", format=tarfile.USTAR_FORMAT)
                shards.append({"name": name, "count": 0, "bytes": 0})
            key = f"{count:09d}"
            now = time.time()
            _add_member(tar, f"{key}.{IMAGE_SUFFIX}", data, now)
            _add_member(tar, f"{key}.{PATH_SUFFIX}", rel.encode("utf-8"), now)
            shards[-1]["count"] += 1
            shards[-1]["bytes"] += len(data)
            count += 1
            total_bytes += len(data)
            if progress_every and count % progress_every == 0:
                log.info("shard: %d images, %.1f MB, %.0f img/s", count, total_bytes / 1e6,
                         count / max(time.time() - t0, 1e-9))
    finally:
        close_current()
    manifest = {"format": FORMAT, "version": 1, "count": count, "bytes": total_bytes,
                "source": str(src.resolve()), "shard_size": shard_size, "shards": shards,
                "order": {"shuffled": seed is not None, "seed": seed},
                "skipped": counter.total}
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(out / MANIFEST)  # atomic: a manifest present means the shard set is complete
    return manifest


def read_manifest(shard_dir: str | os.PathLike) -> dict:
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest (not a shard dir written by `updetr data shard`?)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: unsupported shard format {manifest.get('format')!r}")
    return manifest


def shard_paths(shard_dir: str) -> list[str]:
    """Shard file paths in manifest order (works for local dirs; URIs are joined as strings)."""
    if "://" in shard_dir:
        raise ValueError("shard_paths reads local manifests only; pass URIs straight to Ray Data")
    return [os.path.join(shard_dir, s["name"]) for s in read_manifest(shard_dir)["shards"]]


@dataclass(frozen=True)
class ShardEntry:
    """Where one image lives inside a shard: file, byte offset and size of `<key>.image`, rel path."""

    shard: str
    offset: int
    size: int
    rel_path: str


def index_shard(path: str) -> list[ShardEntry]:
    """Scan one tar's headers (data members are skipped by seeking, only `.path` members are read)."""
    entries: list[ShardEntry] = []
    pending: dict[str, dict] = {}
    with tarfile.open(path, "r:") as tar:
        for m in tar:
            if not m.isfile() or "." not in m.name.rsplit("/", 1)[-1]:
                continue
            base, _, suffix = m.name.partition(".")
            slot = pending.setdefault(base, {})
            if suffix == IMAGE_SUFFIX:
                slot["offset"], slot["size"] = m.offset_data, m.size
            elif suffix == PATH_SUFFIX:
                f = tar.extractfile(m)
                slot["rel"] = f.read().decode("utf-8") if f is not None else base
            if "offset" in slot and "rel" in slot:
                entries.append(ShardEntry(path, slot["offset"], slot["size"], slot["rel"]))
                del pending[base]
    for base, slot in pending.items():  # an image without a path member keeps its key as the path
        if "offset" in slot:
            entries.append(ShardEntry(path, slot["offset"], slot["size"], base))
    return entries


def read_entry(entry: ShardEntry) -> bytes:
    with open(entry.shard, "rb") as f:
        f.seek(entry.offset)
        return f.read(entry.size)


def iter_shard_samples(path: str) -> Iterator[tuple[str, bytes]]:
    """Sequential `(rel_path, image bytes)` from one shard (what a streaming reader sees)."""
    for e in index_shard(path):
        yield e.rel_path, read_entry(e)

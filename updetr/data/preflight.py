"""Check a data source before any work starts (no model built, no Ray, no MLflow run).

`check_source(cfg)` raises `DataSourceError` with one line naming the path and the reason (not found, not a
folder, no images, no shard manifest, ...) and otherwise returns the number of items when it is known
cheaply (synthetic: configured; shards: the manifest; local folder: one listing), None for object stores.
Both `updetr debug` and `updetr run` call it first, so a mistyped path costs seconds, not a FAILED run.
"""
from __future__ import annotations

import json
import os
from typing import Optional

from updetr.data.image_io import IMAGE_EXTENSIONS
from updetr.data.shards import FORMAT, MANIFEST, iter_image_files


class DataSourceError(ValueError):
    """The configured data source cannot be read; the message is one line."""


def _existing_dir(path: str, what: str) -> str:
    if not os.path.exists(path):
        raise DataSourceError(f"data.path {path}: not found (data.source={what})")
    if not os.path.isdir(path):
        raise DataSourceError(f"data.path {path}: not a folder (data.source={what} reads a folder)")
    return path


def check_folder(path: str) -> int:
    _existing_dir(path, "folder")
    n = sum(1 for _ in iter_image_files(path))
    if n == 0:
        raise DataSourceError(f"data.path {path}: no image files under it (looked for "
                              f"{', '.join(IMAGE_EXTENSIONS[:4])}, ... at any depth)")
    return n


def check_shards(path: str) -> int:
    _existing_dir(path, "shards")
    manifest = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest):
        raise DataSourceError(f"data.path {path}: no {MANIFEST} (not a shard folder written by "
                              f"`updetr data shard`, or that run did not finish)")
    try:
        data = json.loads(open(manifest, encoding="utf-8").read())
    except (OSError, ValueError) as e:
        raise DataSourceError(f"{manifest}: unreadable ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise DataSourceError(f"{manifest}: not a {FORMAT} manifest")
    missing = [s["name"] for s in data.get("shards", []) if not os.path.isfile(os.path.join(path, s["name"]))]
    if missing:
        raise DataSourceError(f"data.path {path}: {len(missing)} shard(s) listed in {MANIFEST} are missing "
                              f"(first: {missing[0]})")
    if not int(data.get("count", 0)):
        raise DataSourceError(f"data.path {path}: the shards hold no images")
    return int(data["count"])


def check_source(cfg) -> Optional[int]:
    """Validate `cfg.data` for reading (module docstring); returns the item count or None when unknown."""
    d = cfg.data
    if d.source == "synthetic":
        return d.synthetic_images
    path = str(d.path)
    if "://" in path:
        return None  # object stores are listed by Ray Data itself
    if d.source == "folder":
        return check_folder(path)
    if d.source == "shards":
        return check_shards(path)
    if not os.path.exists(path):
        raise DataSourceError(f"data.path {path}: not found (data.source={d.source})")
    return None

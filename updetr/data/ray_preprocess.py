"""Ray Data preprocessing UDF: decode + patch crops per row, bad rows flagged instead of raising."""
from __future__ import annotations

import logging
from collections import Counter
from typing import Optional, Sequence

import numpy as np
import ray

from updetr.data.pretext import safe_record
from updetr.data.seeding import sample_id_from_key
from updetr.data.shards import IMAGE_SUFFIX, PATH_SUFFIX
from updetr.data.skips import DECODE_ERROR, SkipCounter
from updetr.data.synthetic import default_size_range, synthetic_image

log = logging.getLogger("updetr.data")

CLOCK_NAMESPACE = "updetr"


def strip_scheme(path: str) -> str:
    # Ray Data reports object-store paths without the scheme ("bucket/prefix/file.jpg").
    return path.split("://", 1)[1] if "://" in path else path


def _relative(path: str, prefixes: Sequence[str]) -> str:
    """`path` relative to the first matching prefix ('/'-separated), or unchanged."""
    path = path.replace("\\", "/")
    for prefix in prefixes:
        if prefix and path.startswith(prefix + "/"):
            return path[len(prefix) + 1:]
    return path


class PretrainPreprocessor:
    """Ray Data UDF (numpy batch -> numpy batch, one row out per row in); see the module docstring.

    Input columns: `bytes` + `path` (read_binary_files), `image` + `path` + `__key__` (read_webdataset
    with decoder=None; `path` holds the relative path as bytes), or `id` (synthetic).
    Output columns: image (uint8 [H, W, 3] per row, ragged), patches uint8 [n, M, P, P, 3],
    boxes float32 [n, M, 4], image_id int64 [n], orig_size / size int64 [n, 2], ok bool [n], events str [n].
    """

    def __init__(self, cfg, root_prefix: str = "", clock: Optional[str] = None) -> None:
        import torch

        # Each actor reserves data.preprocess_cpus; torch's intra-op pool would otherwise fan out per core.
        torch.set_num_threads(max(1, int(cfg.data.preprocess_cpus)))
        self.cfg = cfg
        # newline-separated candidates (the path as given, its absolute form); see ray_pipeline._read
        self.prefixes = [p.rstrip("/") for p in root_prefix.split("\n") if p]
        self.epoch = 0
        if clock is not None:
            try:
                actor = ray.get_actor(clock, namespace=CLOCK_NAMESPACE)
                self.epoch = int(ray.get(actor.get.remote()))
            except ValueError:  # no clock: the dataset is iterated without iter_worker_batches
                self.epoch = 0

    def _item(self, batch: dict, i: int):
        """(sample id, bytes or PIL image) of row i."""
        if "id" in batch:
            idx = int(batch["id"][i])
            d = self.cfg.data
            return idx, synthetic_image(idx, self.cfg.seed, default_size_range(d.synthetic_size))
        if IMAGE_SUFFIX in batch:  # webdataset shard row
            raw = batch[PATH_SUFFIX][i] if PATH_SUFFIX in batch else batch["__key__"][i]
            key = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else str(raw)
            return sample_id_from_key(key), batch[IMAGE_SUFFIX][i]
        return sample_id_from_key(_relative(str(batch["path"][i]), self.prefixes)), batch["bytes"][i]

    def __call__(self, batch: dict) -> dict:
        pcfg = self.cfg.pretext
        n = len(next(iter(batch.values())))
        m, p = pcfg.num_patches, pcfg.patch_size
        images = np.empty(n, dtype=object)
        patches = np.zeros((n, m, p, p, 3), dtype=np.uint8)
        boxes = np.zeros((n, m, 4), dtype=np.float32)
        image_id = np.zeros(n, dtype=np.int64)
        orig_size = np.zeros((n, 2), dtype=np.int64)
        size = np.zeros((n, 2), dtype=np.int64)
        ok = np.zeros(n, dtype=bool)
        events = np.empty(n, dtype=object)
        for i in range(n):
            counter = SkipCounter()
            rec = None
            try:
                sid, item = self._item(batch, i)
                image_id[i] = sid
                rec = safe_record(item, pcfg, (self.cfg.seed, self.epoch, sid), counter, self.cfg.data.decode)
            except Exception as e:  # noqa: BLE001 - a malformed row must not kill the pipeline
                counter.add(DECODE_ERROR)
                log.warning("data: unexpected error on a row: %s: %s", type(e).__name__, e)
            events[i] = ",".join(f"{k}:{v}" for k, v in sorted(counter.total.items()))
            if rec is None:
                images[i] = np.zeros((1, 1, 3), dtype=np.uint8)
                continue
            images[i] = rec["image"]
            patches[i], boxes[i] = rec["patches"], rec["boxes"]
            orig_size[i], size[i] = rec["orig_size"], rec["size"]
            ok[i] = True
        return {"image": images, "patches": patches, "boxes": boxes, "image_id": image_id,
                "orig_size": orig_size, "size": size, "ok": ok, "events": events}


def count_events(events) -> dict[str, int]:
    """`events` column (strings like 'too_small:1,converted_cmyk:1') -> reason counts."""
    out: Counter = Counter()
    for ev in events:
        if not ev:
            continue
        for part in str(ev).split(","):
            reason, _, n = part.rpartition(":")
            out[reason] += int(n)
    return dict(out)

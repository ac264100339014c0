"""Data for UP-DETR: query-patch sampling, synthetic / folder / shard / COCO / VOC sources, local and Ray paths.

Entry points (updetr/CONTRACTS.md): `local_pretrain_batches` here, `ray_pipeline.build_pretrain_dataset` and
`ray_pipeline.iter_worker_batches` (import `updetr.data.ray_pipeline` explicitly; it imports Ray).
Names below are imported lazily so that torch-free modules (e.g. the Ray preprocessing UDF) stay torch-free.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "SkipCounter": "updetr.data.skips",
    "collate_detection": "updetr.data.collate",
    "collate_records": "updetr.data.collate",
    "pad_images": "updetr.data.collate",
    "local_pretrain_batches": "updetr.data.local_loader",
    "make_pretrain_sample": "updetr.data.pretext",
    "resized_size": "updetr.data.pretext",
    "sample_patch_boxes": "updetr.data.pretext",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'updetr.data' has no attribute {name!r}")

"""Box predictions in COCO's results format, shared by the box evaluators (COCO AP and one-shot AP50)."""
from __future__ import annotations

from typing import Mapping

import torch


def to_coco_results(predictions: Mapping[int, Mapping[str, torch.Tensor]]) -> list[dict]:
    """`{image_id: {scores [N], labels [N], boxes [N, 4] xyxy pixels}}` -> COCO results (xywh, one dict
    per detection: image_id, category_id, bbox, score), the format `COCO.loadRes` and the server read."""
    out = []
    for image_id, p in predictions.items():
        boxes = p["boxes"].detach().float().cpu()
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        for score, label, box in zip(p["scores"].tolist(), p["labels"].tolist(), xywh):
            out.append({"image_id": int(image_id), "category_id": int(label), "bbox": [float(v) for v in box],
                        "score": float(score)})
    return out


def box_predictions(outputs: dict, targets: list[dict], postprocessors: dict) -> dict[int, dict[str, torch.Tensor]]:
    """`{image_id: {scores [Q], labels [Q], boxes [Q, 4] xyxy pixels}}` of one batch: postprocessors['bbox']
    scales `pred_boxes` [B, Q, 4] to each target's `orig_size` (what box evaluators accumulate)."""
    sizes = torch.stack([t["orig_size"] for t in targets]).to(outputs["pred_boxes"].device)
    results = postprocessors["bbox"](outputs, sizes)
    return {int(t["image_id"]): {k: v.cpu() for k, v in r.items()} for t, r in zip(targets, results)}

"""VOC devkit scoring of detections (`eval.metric: voc07 | voc12`): the COCO evaluator's accumulation (same
DDP state and results JSON), scored by `updetr.eval.voc_metric`: `AP50` = mean over the classes with ground
truth, `AP50_<class>` per class (-1: no non-difficult object).
"""
from __future__ import annotations

from pycocotools.coco import COCO

from updetr.eval.boxes import BoxDetections
from updetr.eval.voc_metric import VOC_METRICS, mean_ap, per_class_voc_ap


class VocEvaluator(BoxDetections):
    """Detections of the images of a VOC split (COCO form), scored by the devkit (`metric` voc07 | voc12)."""

    metric_names = ("AP50",)

    def __init__(self, coco_gt: COCO, metric: str = "voc07") -> None:
        if metric not in VOC_METRICS:
            raise ValueError(f"metric '{metric}' is not one of {VOC_METRICS}")
        super().__init__(coco_gt)
        self.metric = metric

    def summarize(self) -> dict[str, float]:
        img_ids = self.evaluated_ids()
        cats = {int(c["id"]): c["name"] for c in self.coco_gt.dataset["categories"]}
        ap = per_class_voc_ap(self.coco_gt, self.results, img_ids, list(cats), self.metric)
        out = {"AP50": mean_ap(ap)}
        out.update({f"AP50_{cats[c]}": v for c, v in ap.items()})
        return out

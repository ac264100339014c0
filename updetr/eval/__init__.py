"""Evaluation: one evaluator interface (`base`) and its implementations side by side: COCO-style box AP with
pycocotools (COCO and VOC, which is scored COCO-style), one-shot AP50, panoptic PQ / AP^seg."""
from updetr.eval.base import EvalError, Evaluator
from updetr.eval.boxes import to_coco_results
from updetr.eval.coco_eval import COCO_METRICS, CocoEvaluator

__all__ = ["COCO_METRICS", "CocoEvaluator", "EvalError", "Evaluator", "to_coco_results"]

"""Evaluation: COCO-style box AP with pycocotools (COCO and VOC, which is scored COCO-style)."""
from updetr.eval.coco_eval import COCO_METRICS, CocoEvaluator, EvalError, format_table, to_coco_results

__all__ = ["COCO_METRICS", "CocoEvaluator", "EvalError", "format_table", "to_coco_results"]

"""`eval:` how the evaluation split is scored."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from updetr.config.base import _Strict


class EvalConfig(_Strict):
    """How the evaluation split is scored (owner: `updetr.tasks`, `updetr.eval`)."""

    metric: Optional[Literal["coco", "voc07", "voc12"]] = Field(
        None, description="coco = pycocotools COCOeval (AP, AP50, AP75, ...; VOC difficult objects are crowd "
                          "regions); voc07 / voc12 = the VOC devkit at IoU 0.5 (difficult detections ignored; "
                          "11-point / all-point AP), VOC data only. None (unset): coco for detect (the paper's "
                          "Table 1 reports COCO-style AP on test2007), voc07 for oneshot (CoAE, Table 3).")

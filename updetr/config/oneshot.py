"""`oneshot:` one-shot detection on VOC (task oneshot)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from updetr.config.base import _Strict


# The 20 Pascal VOC classes; category ids are 1..20 in this order (`updetr.data.voc`).
VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor")
ONESHOT_UNSEEN = ["cow", "sheep", "cat", "aeroplane"]


class OneShotConfig(_Strict):
    """One-shot detection on VOC (owner: `updetr.tasks.oneshot`): a query patch of a class cropped from another
    image is added to all N object queries (one patch, as pre-training with M=1); the model finds that class's
    instances. Query patches use pretext.patch_size and pretext.min_patch_px."""

    unseen_classes: list[str] = Field(
        default_factory=lambda: list(ONESHOT_UNSEEN),
        description="VOC classes held out of training and scored apart (paper Table 3 / CoAE: cow, sheep, cat, "
                    "aeroplane); every other VOC class is seen.")
    train_images_with_unseen: bool = Field(
        True, description="Keep training images that also show unseen-class objects, those objects unlabelled "
                          "(background), as CoAE does. False drops them, so no unseen object is ever seen in "
                          "training (about 20 % of VOC07+12 trainval).")
    class_sampling: Literal["inverse_frequency", "uniform"] = Field(
        "inverse_frequency", description="The class of a training episode among its image's seen classes: "
                                         "weighted by 1 / (training images showing the class), as CoAE; or "
                                         "uniform.")
    query_flip: float = Field(0.5, ge=0.0, le=1.0, description="Probability of flipping a training query patch "
                                                               "horizontally (CoAE: 0.5; 0 = never).")
    patch_dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="Probability of zeroing the query-patch feature in a query slot during "
                                         "training (pre-training's pretext.patch_dropout; off: with one patch a "
                                         "slot without it cannot tell which class to find).")

    @field_validator("unseen_classes")
    @classmethod
    def _voc_names(cls, v: list[str]) -> list[str]:
        bad = [c for c in v if c not in VOC_CLASSES]
        if bad:
            raise ValueError(f"{bad} are not VOC classes ({', '.join(VOC_CLASSES)})")
        if len(set(v)) == len(VOC_CLASSES):
            raise ValueError("every VOC class is unseen; nothing would be trained")
        return v

"""`pretext:` random query patch detection (the pre-training pretext task)."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from updetr.config.base import _Strict


# The paper's image scales for pre-training (reference-notes §2.1: 384 is absent on purpose).
PRETRAIN_SCALES = [320, 336, 352, 368, 400, 416, 432, 448, 464, 480]


class PretextConfig(_Strict):
    """Random query patch detection (owner: UPDETR model and the patch-cropping preprocessor)."""

    num_patches: int = Field(10, gt=0, description="Query patches M per image; N/M queries per patch.")
    feature_recon: bool = Field(True, description="Reconstruct the patch CNN feature (loss_feature).")
    query_shuffle: bool = Field(False, description="Shuffle object queries across patch groups "
                                                   "(paper: on; official code and README: off).")
    attention_mask: bool = Field(True, description="Block-diagonal group mask in decoder self-attention.")
    patch_dropout: float = Field(0.1, ge=0.0, lt=1.0,
                                 description="Probability of zeroing a query patch feature (official mask_ratio).")
    patch_dropout_mode: Literal["slot", "patch"] = Field(
        "slot", description="'slot': independent drop per (query slot, image), the official code; "
                            "'patch': drop whole patches, as the paper describes.")
    classification: Optional[Literal["softmax", "focal"]] = Field(
        None, description="How patch queries are classified. None = the detector's own: DETR's (K+1)-way softmax "
                          "with the no-object weight loss.eos_coef; Deformable DETR's sigmoid focal loss and focal "
                          "matching cost. 'softmax' on Deformable DETR: UP-DETR's softmax with loss.eos_coef and "
                          "the -p matching cost (as the Siamese DETR port; loss.ce and loss.set_cost_class then "
                          "default to 1). 'focal' is Deformable DETR's only.")
    patch_size: int = Field(128, gt=0, description="Query patches are resized to patch_size x patch_size.")
    min_patch_px: int = Field(8, gt=0, description="Smallest patch side in pixels (official min_pixel).")
    scales: list[int] = Field(default_factory=lambda: list(PRETRAIN_SCALES),
                              description="Shorter-side sizes for the image resize, one picked per image.")
    max_size: int = Field(600, gt=0, description="Longest image side after resize.")
    min_image_px: int = Field(17, gt=0, description="Images with a side below this are skipped (official: > 16).")
    augment: bool = Field(True, description="Query-patch augmentation (colour jitter, grayscale, blur).")
    resize: Literal["torch", "pil"] = Field(
        "torch", description="Bilinear antialiased resize of the image and the query patches (full decode): "
                             "'torch' = torch's uint8 kernel, ~3x faster, within 1 grey level of PIL's; "
                             "'pil' = PIL's resize, the reference's pixels exactly.")

    @model_validator(mode="after")
    def _check(self) -> "PretextConfig":
        if not self.scales:
            raise ValueError("scales must not be empty")
        if self.min_image_px <= 2 * self.min_patch_px:
            raise ValueError(f"min_image_px ({self.min_image_px}) must exceed 2*min_patch_px "
                             f"({2 * self.min_patch_px}) so a patch can be drawn")
        return self

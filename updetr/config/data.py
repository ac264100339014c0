"""`data:` the data source and batching; `detection:` detection augmentation."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from updetr.config.base import _Strict


class DataConfig(_Strict):
    """Where images come from and how they are batched (owner: `updetr.data`)."""

    source: Literal["synthetic", "folder", "shards", "coco", "voc", "synthetic_coco", "synthetic_voc",
                    "coco_panoptic", "synthetic_panoptic"] = Field(
        "synthetic", description="Pre-training: synthetic | folder | shards; detection: coco | voc | "
                                 "synthetic_coco (a seeded shapes dataset written on first use under "
                                 "data.path, default <runtime.output_dir>/data/synthetic_coco-<seed>-<n>-<n val>-<sizes>); "
                                 "one-shot: voc | synthetic_voc (the same shapes in a VOC2007 layout, "
                                 "trainval = synthetic_images, test = synthetic_val_images, written likewise); "
                                 "panoptic (and detection of its things + stuff boxes): coco_panoptic | "
                                 "synthetic_panoptic (seeded shapes on stuff regions, written on first use).")
    path: Optional[str] = Field(None, description="Image folder, shard dir, object-store URI or dataset root.")
    val_path: Optional[str] = Field(None, description="Evaluation split root / annotation (fine-tuning).")
    synthetic_images: int = Field(64, gt=0, description="Number of images in the built-in synthetic source.")
    synthetic_size: tuple[int, int] = Field((96, 128), description="(min, max) side of synthetic images.")
    synthetic_val_images: int = Field(16, gt=0, description="Evaluation images of data.source synthetic_coco.")
    batch_size: int = Field(2, gt=0, description="Images per worker per step.")
    num_workers: int = Field(2, ge=0, description="Local mode: DataLoader processes; Ray: preprocessing actors.")
    preprocess_cpus: float = Field(1.0, gt=0, description="CPUs reserved per Ray Data preprocessing actor.")
    shuffle: bool = Field(True, description="Shuffle sample order each epoch (seeded).")
    decode: Literal["full", "reduced"] = Field(
        "full", description="JPEG decode for pre-training: 'full' decodes the whole image (reference "
                            "behaviour); 'reduced' (faster, a listed departure) lets libjpeg decode at 1/2-1/8 "
                            "scale when the result still covers the resized image (only images >= 2x the "
                            "target size; small query patches of those are then cut from fewer pixels).")
    drop_last: bool = Field(True, description="Drop each rank's last short batch of an epoch, as the official "
                                              "loader does (batch sampler drop_last=True).")
    prefetch_batches: int = Field(2, ge=0, description="Batches prepared ahead per consumer (Ray iterator "
                                                        "prefetch; DataLoader prefetch per worker).")
    preprocess_batch_size: int = Field(8, gt=0, description="Ray Data: images per decode + patch-crop call "
                                                            "(small keeps the first batch fast and memory flat).")


class DetectionConfig(_Strict):
    """DETR's detection augmentation and evaluation resize (owner: `updetr.data.detection_transforms`)."""

    scales: list[int] = Field(default_factory=lambda: list(range(480, 801, 32)),
                              description="Training shorter-side sizes (DETR: 480..800 step 32), one per image.")
    max_size: int = Field(1333, gt=0, description="Longest side after any resize (DETR: 1333).")
    crop_resize: list[int] = Field(default_factory=lambda: [400, 500, 600],
                                   description="Crop branch: shorter-side sizes before RandomSizeCrop.")
    crop_min: int = Field(384, gt=0, description="RandomSizeCrop smallest side.")
    crop_max: int = Field(600, gt=0, description="RandomSizeCrop largest side.")
    eval_size: int = Field(800, gt=0, description="Evaluation shorter side (DETR: 800, longest <= max_size).")

    @model_validator(mode="after")
    def _check(self) -> "DetectionConfig":
        if not self.scales or not self.crop_resize:
            raise ValueError("scales and crop_resize must not be empty")
        if self.crop_min > self.crop_max:
            raise ValueError(f"crop_min ({self.crop_min}) must not exceed crop_max ({self.crop_max})")
        return self

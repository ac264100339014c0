"""Typed experiment configuration: pydantic models, YAML loading with one `base:` file, dotted overrides.

An experiment YAML is a small diff over the defaults below. `load_config(path, overrides)` resolves
`base:` (at most one level), applies `key=value` overrides, validates, and returns a frozen
`ExperimentConfig`. Every error names the file, the field path and the reason (`ConfigError`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from updetr.task_defaults import inherit_pre_norm, resolve_task_defaults

# The paper's image scales for pre-training (reference-notes §2.1: 384 is absent on purpose).
PRETRAIN_SCALES = [320, 336, 352, 368, 400, 416, 432, 448, 464, 480]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class ModelConfig(_Strict):
    """Architecture of the DETR / UP-DETR network (owner: `updetr.models.build_model`)."""

    backbone: Literal["resnet18", "resnet34", "resnet50", "resnet101"] = Field(
        "resnet50", description="torchvision ResNet used as the CNN backbone.")
    backbone_weights: Optional[str] = Field(
        None, description="Local weight file for the backbone (torchvision or SwAV state_dict; `module.` "
                          "prefixes stripped). None keeps random init: nothing is ever downloaded.")
    freeze_backbone: Optional[bool] = Field(
        None, description="Freeze the whole CNN. When False, layers 2-4 train at optim.lr_backbone and the "
                          "stem + layer1 stay frozen, as in DETR. None (unset): per task as the official code "
                          "(updetr.task_defaults): True for pretrain (--fre_cnn), False otherwise.")
    dilation: bool = Field(False, description="Replace stride with dilation in the last ResNet stage (DC5).")
    position_embedding: Literal["sine", "learned"] = Field("sine", description="Positional encoding type.")
    hidden_dim: int = Field(256, gt=0, description="Transformer width d_model.")
    nheads: int = Field(8, gt=0, description="Attention heads.")
    enc_layers: int = Field(6, ge=0, description="Transformer encoder layers.")
    dec_layers: int = Field(6, gt=0, description="Transformer decoder layers.")
    dim_feedforward: int = Field(2048, gt=0, description="FFN hidden size in each transformer layer.")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout inside the transformer.")
    pre_norm: Optional[bool] = Field(
        None, description="Pre-norm transformer (UP-DETR) instead of post-norm (DETR). None (unset): per task "
                          "(updetr.task_defaults): True for pretrain and for detect / oneshot starting from "
                          "init.checkpoint, False otherwise; a chained stage takes the previous stage's.")
    num_queries: int = Field(100, gt=0, description="Number of object queries N.")
    aux_loss: bool = Field(True, description="Auxiliary decoding losses on every decoder layer.")
    num_classes: Optional[int] = Field(
        None, gt=0, description="Detection classes (max category id + 1). None: 2 for pre-training "
                                "(index 1 = patch; pre-training needs >= 2), taken from the dataset "
                                "for fine-tuning.")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "ModelConfig":
        if self.hidden_dim % self.nheads:
            raise ValueError(f"hidden_dim ({self.hidden_dim}) must be divisible by nheads ({self.nheads})")
        return self


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


class LossConfig(_Strict):
    """Loss and matcher weights (owner: SetCriterion / HungarianMatcher). A loss with weight 0 is off."""

    ce: float = Field(1.0, ge=0, description="Weight of loss_ce.")
    bbox: float = Field(5.0, ge=0, description="Weight of loss_bbox (L1).")
    giou: float = Field(2.0, ge=0, description="Weight of loss_giou.")
    feature: float = Field(1.0, ge=0, description="Weight of loss_feature (pre-training reconstruction).")
    eos_coef: float = Field(0.1, gt=0, le=1, description="Relative class weight of no-object (paper's lambda). "
                            "`M/N` sets it to pretext.num_patches / model.num_queries, the paper's lambda for "
                            "any M (0.1, the official value, is M/N only for M=10, N=100).")
    set_cost_class: float = Field(1.0, ge=0, description="Matcher cost of the class probability.")
    set_cost_bbox: float = Field(5.0, ge=0, description="Matcher cost of the L1 box distance.")
    set_cost_giou: float = Field(2.0, ge=0, description="Matcher cost of the GIoU.")

    @model_validator(mode="after")
    def _something_trains(self) -> "LossConfig":
        if self.ce == 0 and self.bbox == 0 and self.giou == 0 and self.feature == 0:
            raise ValueError("every loss weight (ce, bbox, giou, feature) is 0: nothing would train")
        return self


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


class InitConfig(_Strict):
    """Where the weights of a run come from before step 0 (owner: `updetr.tasks`)."""

    checkpoint: Optional[str] = Field(
        None, description="updetr checkpoint (ours, or an official .pth converted by `updetr checkpoint "
                          "convert`) whose model weights start the run; 'previous' = the previous stage "
                          "of a chained experiment (the default for every stage after the first).")
    strict: bool = Field(True, description="Refuse any missing / unexpected key other than the ones the task "
                                           "expects (pre-training heads dropped, detection head re-initialised).")


class OptimConfig(_Strict):
    """AdamW with a separate backbone learning rate and gradient clipping (owner: engine)."""

    lr: float = Field(1e-4, gt=0, description="Learning rate of transformer and heads.")
    lr_backbone: Optional[float] = Field(
        None, ge=0, description="Learning rate of trainable backbone layers. None (unset): per task "
                                "(updetr.task_defaults): 5e-5 for detect / oneshot from init.checkpoint "
                                "(UP-DETR's recipe), optim.lr for an unfrozen pretrain (main.py), else 1e-5.")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay.")
    clip_max_norm: float = Field(0.1, ge=0, description="Gradient-norm clip; 0 disables.")


class ScheduleConfig(_Strict):
    """Length of training, LR drop and checkpoint cadence (owner: engine)."""

    epochs: int = Field(60, gt=0, description="Training epochs.")
    lr_drop: int = Field(40, gt=0, description="Epoch at which the LR is multiplied by 0.1 (StepLR).")
    max_steps: Optional[int] = Field(None, gt=0, description="Stop after this many optimizer steps (smoke runs).")
    steps_per_epoch: Optional[int] = Field(
        None, gt=0, description="Cap on steps per epoch (streaming sources); None: one pass over the data.")
    checkpoint_every: int = Field(500, gt=0, description="Write a checkpoint every K optimizer steps.")
    log_every: int = Field(10, gt=0, description="Progress line / per-step metrics every K steps.")
    eval_every: int = Field(1, ge=0, description="Evaluate every K epochs and at the end (tasks with an "
                                                 "evaluation split); 0: only at the end.")


class RuntimeConfig(_Strict):
    """Where and how one process computes (owner: engine / CLI)."""

    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available.")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16 autocast (CUDA only).")
    output_dir: str = Field("runs", description="Local runs folder (checkpoints, resolved config).")
    threads: Optional[int] = Field(None, gt=0, description="torch intra-op threads; None = torch default.")
    # Speed-ups. All off (fold_frozen_bn=false channels_last=false fused_adamw=false onednn_linear=false
    # bool_dropout_masks=false prefetch_dropout_masks=false compile=false, precision=fp32) is the reference
    # path: the official arithmetic op for op.
    fold_frozen_bn: bool = Field(
        True, description="Fold each FrozenBatchNorm into the convolution before it at run time (weights and "
                          "state-dict keys unchanged); same numbers as conv-then-BN up to fp32 rounding.")
    channels_last: bool = Field(
        True, description="Run the CNN in channels-last (NHWC) memory format, which oneDNN (CPU) and cuDNN "
                          "(GPU) convolutions prefer; the feature map is handed on in the usual layout.")
    fused_adamw: Optional[bool] = Field(
        None, description="AdamW's fused kernel (one kernel for all parameters; rounding-level differences "
                          "only). None = on (CUDA and CPU).")
    onednn_linear: bool = Field(
        True, description="CPU only: run the linear layers and attention projections (forward and backward) on "
                          "oneDNN's matmul instead of MKL's sgemm, ~2x faster on AMD processors; rounding-level "
                          "differences only. Ignored on CUDA and under autocast.")
    bool_dropout_masks: bool = Field(
        True, description="CPU only: keep dropout masks as bool (1 byte) instead of float (4 bytes) until the "
                          "backward; the same masks and numbers bit for bit, less memory.")
    prefetch_dropout_masks: bool = Field(
        True, description="CPU, pre-training: draw the transformer's dropout masks in a thread while the frozen "
                          "CNN runs (the same masks from the same generator, in the same order; bit for bit). "
                          "Needs onednn_linear and bool_dropout_masks.")
    compile: Optional[bool] = Field(
        None, description="torch.compile the model (inductor). None = on for CUDA, off on CPU, where the "
                          "compile time outweighs the gain for runs of this size (README, Benchmarks).")


class RayConfig(_Strict):
    """Ray Train scaling, storage and fault tolerance (owner: `updetr.orchestration`)."""

    address: Optional[str] = Field(None, description="Cluster address; None starts a local Ray.")
    num_workers: int = Field(1, gt=0, description="Ray Train workers.")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs per training worker (leave some for Ray Data).")
    storage_path: Optional[str] = Field(None, description="Checkpoint storage (local path or s3://, gs://); "
                                                          "None = <output_dir>/ray.")
    run_name: Optional[str] = Field(None, description="Run name; None derives it from the experiment name.")
    max_failures: int = Field(2, ge=-1, description="Worker-group restarts before the run fails (-1: forever).")
    num_to_keep: int = Field(2, gt=0, description="Checkpoints kept in storage.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="How training workers are placed on nodes (Ray placement group strategy); "
                            "STRICT_SPREAD puts each worker on its own node.")
    stall_warn_s: float = Field(
        120.0, ge=0, description="Say on the terminal and in MLflow (with what Ray Data reports) when a training "
                                 "worker has waited this long for a batch; 0 disables.")
    stall_fail_s: float = Field(
        1800.0, ge=0, description="Fail the run (checkpoints kept) when a worker has waited this long for a batch; "
                                  "0 disables. Counts per worker attempt (ray.max_failures restarts it).")


# ---------------------------------------------------------------------------------------- one-shot (issue 9)
# The paper's Table 3 split (following CoAE): these four VOC classes are never trained on.
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
        from updetr.data.voc import VOC_CLASSES

        bad = [c for c in v if c not in VOC_CLASSES]
        if bad:
            raise ValueError(f"{bad} are not VOC classes ({', '.join(VOC_CLASSES)})")
        if len(set(v)) == len(VOC_CLASSES):
            raise ValueError("every VOC class is unseen; nothing would be trained")
        return v
# ------------------------------------------------------------------------------------ end one-shot (issue 9)


class TrackingConfig(_Strict):
    """MLflow tracking (owner: `updetr.tracking`)."""

    enabled: bool = Field(True, description="Track the run in MLflow.")
    uri: Optional[str] = Field(None, description="Tracking URI; None = sqlite file mlflow.db under the working "
                                                 "directory (made absolute).")
    experiment: Optional[str] = Field(None, description="MLflow experiment name; None = the experiment name.")


class EvalConfig(_Strict):
    """How the evaluation split is scored (owner: `updetr.tasks`, `updetr.eval`)."""

    metric: Optional[Literal["coco", "voc07", "voc12"]] = Field(
        None, description="coco = pycocotools COCOeval (AP, AP50, AP75, ...; VOC difficult objects are crowd "
                          "regions); voc07 / voc12 = the VOC devkit at IoU 0.5 (difficult detections ignored; "
                          "11-point / all-point AP), VOC data only. None (unset): coco for detect (the paper's "
                          "Table 1 reports COCO-style AP on test2007), voc07 for oneshot (CoAE, Table 3).")


# ---- panoptic segmentation (task `panoptic`) ------------------------------------------------------------
class PanopticConfig(_Strict):
    """DETR's mask head on a frozen detector and its post-processing (owner: `updetr.tasks.panoptic`)."""

    freeze_detector: bool = Field(True, description="Freeze every detector weight (DETR's --frozen_weights): only "
                                                    "the mask head (bbox_attention, mask_head) trains.")
    mask_attention_norm: Literal["per_head", "joint"] = Field(
        "per_head", description="Softmax of the mask head's attention maps: per_head = over H x W for each head "
                                "(UP-DETR's code, the paper's Table 4); joint = over heads x H x W (DETR's "
                                "code, facebookresearch/detr#247).")
    mask_loss: float = Field(1.0, ge=0, description="Weight of loss_mask (sigmoid focal loss; DETR mask_loss_coef).")
    dice_loss: float = Field(1.0, ge=0, description="Weight of loss_dice (DETR dice_loss_coef).")
    threshold: float = Field(0.85, gt=0, lt=1, description="PostProcessPanoptic: keep queries whose best "
                                                           "non-empty class probability exceeds this.")
    min_area: int = Field(4, ge=0, description="PostProcessPanoptic: drop segments of at most this many pixels "
                                               "(at the processed size), then re-assign their pixels.")
    mask_threshold: float = Field(0.5, gt=0, lt=1, description="PostProcessSegm: sigmoid threshold of the "
                                                               "per-query masks scored by AP^seg.")
# ---- end panoptic ----------------------------------------------------------------------------------------


TASKS = ("pretrain", "detect", "oneshot", "panoptic")
# The field was called `stage` before tasks existed; old YAMLs and overrides keep working.
_LEGACY_STAGE = {"pretrain": "pretrain", "finetune": "detect"}


class ExperimentConfig(_Strict):
    """One experiment: a task plus every setting it needs."""

    name: str = Field("experiment", min_length=1, description="Experiment name (run names derive from it).")
    task: Literal["pretrain", "detect", "oneshot", "panoptic"] = Field(
        "pretrain", description="What is trained (updetr.tasks): pretrain = random query patch detection, "
                                "detect = DETR detection fine-tuning / evaluation, oneshot = one-shot "
                                "detection on VOC (paper Table 3), panoptic = DETR's mask head on a frozen "
                                "detector, scored by PQ and AP^seg. (`stage: finetune` is read as detect.)")
    seed: int = Field(42, description="Run seed; every random draw derives from it.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Network architecture.")
    pretext: PretextConfig = Field(default_factory=PretextConfig, description="Random query patch detection.")
    detection: DetectionConfig = Field(default_factory=DetectionConfig, description="Detection augmentation.")
    init: InitConfig = Field(default_factory=InitConfig, description="Weight initialisation.")
    loss: LossConfig = Field(default_factory=LossConfig, description="Loss and matcher weights.")
    data: DataConfig = Field(default_factory=DataConfig, description="Data source and batching.")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimizer.")
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description="Schedule and checkpoints.")
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig, description="Device and precision.")
    ray: RayConfig = Field(default_factory=RayConfig, description="Ray Train settings.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking.")
    oneshot: OneShotConfig = Field(default_factory=OneShotConfig, description="One-shot detection (task oneshot).")
    panoptic: PanopticConfig = Field(default_factory=PanopticConfig, description="Panoptic mask head.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation metric.")

    @model_validator(mode="before")
    @classmethod
    def _task_defaults(cls, data: Any) -> Any:
        return resolve_task_defaults(data)

    @model_validator(mode="before")
    @classmethod
    def _legacy_stage(cls, data: Any) -> Any:
        if isinstance(data, dict) and "stage" in data:
            data = dict(data)
            stage = data.pop("stage")
            if stage not in _LEGACY_STAGE:
                raise ValueError(f"stage: '{stage}' is not pretrain | finetune (the field is now `task`: "
                                 "pretrain | detect)")
            data.setdefault("task", _LEGACY_STAGE[stage])
        return data

    @model_validator(mode="before")
    @classmethod
    def _eos_coef_m_over_n(cls, data: Any) -> Any:
        loss = data.get("loss") if isinstance(data, dict) else None
        if isinstance(loss, dict) and isinstance(loss.get("eos_coef"), str) and \
                loss["eos_coef"].replace(" ", "") == "M/N":
            m = (data.get("pretext") or {}).get("num_patches", PretextConfig.model_fields["num_patches"].default)
            n = (data.get("model") or {}).get("num_queries", ModelConfig.model_fields["num_queries"].default)
            if isinstance(m, int) and isinstance(n, int) and n > 0:  # other types: the field checks report them
                data = {**data, "loss": {**loss, "eos_coef": m / n}}
        return data

    @model_validator(mode="after")
    def _cross_field(self) -> "ExperimentConfig":
        if self.task == "pretrain":
            n, m = self.model.num_queries, self.pretext.num_patches
            if n % m:
                raise ValueError(f"model.num_queries ({n}) must be divisible by pretext.num_patches ({m})")
            if self.model.num_classes is not None and self.model.num_classes < 2:
                # Index num_classes is no-object: with 1 class, the patch label 1 would be no-object.
                raise ValueError(f"model.num_classes ({self.model.num_classes}) must be >= 2 for pre-training "
                                 "(label 1 = patch; index num_classes is no-object)")
            if self.data.source in ("coco", "voc", "synthetic_coco", "synthetic_voc", "coco_panoptic",
                                    "synthetic_panoptic"):
                raise ValueError(f"data.source '{self.data.source}' is a detection dataset; pre-training "
                                 "reads synthetic | folder | shards")
        elif self.task == "oneshot":
            self._check_oneshot()
        elif self.data.source == "synthetic_voc":
            raise ValueError("data.source 'synthetic_voc' is read by task oneshot; detect reads coco | voc | "
                             "synthetic_coco")
        elif self.data.source in ("synthetic", "folder", "shards"):
            raise ValueError(f"data.source '{self.data.source}' has no labels; detection reads coco | voc | "
                             "synthetic_coco")
        if self.task == "panoptic" and self.data.source not in ("coco_panoptic", "synthetic_panoptic"):
            raise ValueError(f"data.source '{self.data.source}' has no segment maps; the panoptic task reads "
                             "coco_panoptic | synthetic_panoptic")
        if self.eval.metric in ("voc07", "voc12") and (self.task not in ("detect", "oneshot") or
                                                       self.data.source not in ("voc", "synthetic_voc")):
            raise ValueError(f"eval.metric '{self.eval.metric}' is the VOC devkit's: it scores VOC data only "
                             f"(task detect | oneshot with data.source voc | synthetic_voc; here task "
                             f"{self.task}, data.source '{self.data.source}')")
        if self.data.source in ("folder", "shards", "coco", "voc", "coco_panoptic") and not self.data.path:
            raise ValueError(f"data.path is required for data.source '{self.data.source}'")
        return self

    def _check_oneshot(self) -> None:
        if self.data.source not in ("voc", "synthetic_voc"):
            raise ValueError(f"data.source '{self.data.source}': one-shot detection reads voc | synthetic_voc")
        if self.model.num_classes not in (None, 2):
            raise ValueError(f"model.num_classes ({self.model.num_classes}) must be 2 (or unset) for oneshot: "
                             "label 1 = instance of the query's class, as pre-training's label 1 = patch")
        if self.loss.feature != 0:
            raise ValueError(f"loss.feature ({self.loss.feature}) must be 0 for oneshot: feature reconstruction "
                             "is a pre-training loss (feature_align is kept in the model, not trained)")

    @model_validator(mode="before")
    @classmethod
    def _oneshot_defaults(cls, data: Any) -> Any:
        # One-shot keeps feature_align's weights but has no feature loss: its weight defaults to 0 there.
        if isinstance(data, dict) and data.get("task") == "oneshot":
            loss = data.get("loss") if isinstance(data.get("loss"), dict) else {}
            if "feature" not in loss and not isinstance(data.get("loss"), (str, int, float, list)):
                data = {**data, "loss": {**loss, "feature": 0.0}}
        return data

    @property
    def num_classes(self) -> int:
        """Classes the head predicts (excluding no-object): 2 for pre-training unless overridden."""
        if self.model.num_classes is not None:
            return self.model.num_classes
        if self.task in ("pretrain", "oneshot"):
            return 2
        raise ValueError("model.num_classes must be set for fine-tuning (max category id + 1)")


class ConfigError(ValueError):
    """Bad experiment input; the message names the file, the field path and the reason."""


def _merge(base: dict, diff: dict) -> dict:
    out = dict(base)
    for k, v in diff.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _set_dotted(tree: dict, dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted}={raw}: '{k}' is not a section")
        node = nxt
    # YAML parsing gives ints, floats, bools, null and lists the same types as in a file.
    node[keys[-1]] = yaml.safe_load(raw) if raw != "" else ""


def parse_overrides(overrides: list[str] | None) -> list[tuple[str, str]]:
    """`["a.b=1", ...]` -> `[("a.b", "1"), ...]`, with a clear error for a malformed item."""
    pairs = []
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override '{item}': expected dotted key=value, e.g. schedule.epochs=2")
        pairs.append((key.strip(), value))
    return pairs


def _format_validation(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"{origin}: {loc}: {msg}")
    return "\n".join(lines)


def resolve_dict(path: str | Path | None, overrides: list[str] | None = None) -> dict:
    """The merged raw mapping (defaults not yet applied): base file, experiment file, overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        tree = _read_yaml(path)
        base = tree.pop("base", None)
        if base is not None:
            base_path = (path.parent / str(base)).resolve()
            base_tree = _read_yaml(base_path)
            if "base" in base_tree:
                raise ConfigError(f"{base_path}: base: a base file may not name another base (one level only)")
            tree = _merge(base_tree, tree)
    for key, value in parse_overrides(overrides):
        _set_dotted(tree, key, value)
    return tree


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read, merge and validate an experiment.

    Args:
        path: experiment YAML, or None for pure defaults.
        overrides: dotted `key=value` strings applied last (values parsed as YAML scalars / lists).
    Returns:
        the frozen `ExperimentConfig`.
    Raises:
        ConfigError: naming the file (or 'override'), the field path and the reason.
    """
    tree = resolve_dict(path, overrides)
    origin = str(path) if path is not None else "<defaults>"
    if "stages" in tree:
        raise ConfigError(f"{origin}: stages: a chained experiment holds one config per stage; this command "
                          "takes a single-stage experiment (`updetr run` / `debug` / `eval` / `config show` "
                          "read chains)")
    if overrides:
        origin += " (with overrides " + " ".join(overrides) + ")"
    try:
        return ExperimentConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_validation(e, origin)) from None


STAGE_ACTIONS = ("train", "eval")


@dataclass(frozen=True)
class Stage:
    """One stage of an experiment: `train` (fit the task) or `eval` (score the previous stage's weights)."""

    name: str
    action: str
    cfg: ExperimentConfig


@dataclass(frozen=True)
class Experiment:
    """An experiment file resolved into its stages (one stage when the file has no `stages:`)."""

    name: str
    stages: tuple[Stage, ...]
    chained: bool


def load_experiment(path: str | Path | None, overrides: list[str] | None = None) -> Experiment:
    """Read an experiment that may hold `stages:` (a chain such as pretrain -> finetune -> eval).

    Each stage is a mapping `{name, action: train | eval, ...diff}` merged over the file's shared settings;
    its config name becomes `<name>-<stage>` and, after the first stage, `init.checkpoint` defaults to
    `previous` (the previous stage's final checkpoint). An `eval` stage's diff goes over the previous
    stage's settings (it scores that stage's weights on that stage's evaluation split). Overrides `k=v` apply to every stage;
    `stages.<stage>.k=v` to one stage only; `name=X` renames the chain. A file without `stages:` is one `train` stage.
    """
    origin = str(path) if path is not None else "<defaults>"
    tree = resolve_dict(path, None)
    raw_stages = tree.pop("stages", None)
    if raw_stages is None:
        cfg = load_config(path, overrides)
        return Experiment(cfg.name, (Stage(cfg.task, "train", cfg),), False)
    if not isinstance(raw_stages, list) or not raw_stages:
        raise ConfigError(f"{origin}: stages: must be a non-empty list of mappings with a name")
    pairs = parse_overrides(overrides)
    names = [s.get("name") if isinstance(s, dict) else None for s in raw_stages]
    for key, _ in pairs:
        if key.startswith("stages.") and key.split(".")[1] not in names:
            raise ConfigError(f"override {key}: no stage named '{key.split('.')[1]}' (stages: {names})")
    # `name=X` names the chain (its stages become X-<stage>), it does not set every stage's name to X
    renamed = [v for k, v in pairs if k == "name"]
    pairs = [(k, v) for k, v in pairs if k != "name"]
    base_name = str(renamed[-1] if renamed else tree.get("name", "experiment"))
    stages = []
    previous_tree: Optional[dict] = None
    for i, raw in enumerate(raw_stages):
        where = f"{origin}: stages.{i}"
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) or not raw["name"]:
            raise ConfigError(f"{where}: each stage is a mapping with a non-empty `name`")
        raw = dict(raw)
        sname, action = raw.pop("name"), raw.pop("action", "train")
        if names.count(sname) > 1:
            raise ConfigError(f"{where}.name: stage name '{sname}' is used twice")
        if action not in STAGE_ACTIONS:
            raise ConfigError(f"{where}.action: '{action}' is not train | eval")
        # an eval stage scores the previous stage's weights on that stage's data: its diff goes over it
        over = previous_tree if action == "eval" and previous_tree is not None else tree
        if over is previous_tree:
            over = {k: v for k, v in over.items() if k != "init"}
        merged = copy.deepcopy(_merge(over, raw))  # overrides below must not reach the shared tree
        previous_tree = merged
        merged["name"] = f"{base_name}-{sname}"
        # one MLflow experiment per chain: the parent run and every stage's child run live together
        merged["tracking"] = {"experiment": base_name, **(merged.get("tracking") or {})}
        if i > 0 and not (merged.get("init") or {}).get("checkpoint"):
            merged.setdefault("init", {})
            merged["init"] = {**merged["init"], "checkpoint": "previous"}
        for key, value in pairs:
            if key.startswith("stages."):
                if key.split(".")[1] != sname:
                    continue
                key = ".".join(key.split(".")[2:])
            _set_dotted(merged, key, value)
        merged = inherit_pre_norm(merged, stages[-1].cfg.model.pre_norm if stages else None)
        try:
            cfg = ExperimentConfig.model_validate(merged)
        except ValidationError as e:
            raise ConfigError(_format_validation(e, f"{origin} (stage {sname})")) from None
        if i == 0 and cfg.init.checkpoint == "previous":
            raise ConfigError(f"{where}: init.checkpoint: 'previous' needs a stage before this one")
        if action == "eval" and i == 0 and not cfg.init.checkpoint:
            raise ConfigError(f"{where}: an eval stage needs weights: a stage before it or init.checkpoint")
        stages.append(Stage(sname, action, cfg))
    return Experiment(base_name, tuple(stages), True)


def config_to_dict(cfg: ExperimentConfig) -> dict:
    """Plain, YAML-safe nested dict of a config (tuples become lists)."""
    return cfg.model_dump(mode="json")


def config_to_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def config_from_dict(data: dict) -> ExperimentConfig:
    """Rebuild a config saved with `config_to_dict` (e.g. from a checkpoint)."""
    return ExperimentConfig.model_validate(data)


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}` (lists kept as values); used for MLflow params."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


# ------------------------------------------------------------------------------------------ run identity
# Settings that never change what a training step computes: where it runs, how data is prepared (samples
# are seeded per item, so worker counts do not matter), what is logged and where things are stored.
# Everything else (runtime.precision and any runtime switch included) is part of a run's identity.
OPERATIONAL_PREFIXES = ("ray.", "tracking.", "runtime.output_dir", "runtime.threads", "data.num_workers",
                        "data.preprocess_cpus", "data.prefetch_batches", "data.preprocess_batch_size",
                        "schedule.checkpoint_every", "schedule.log_every", "eval.metric")
IDENTITY_KEEP = ("ray.use_gpu",)  # GPU vs CPU arithmetic
# How long to train: extending a run (updetr debug --resume with a higher max_steps) continues it.
RUN_LENGTH_FIELDS = ("schedule.epochs", "schedule.max_steps")


def identity_fields(config: "ExperimentConfig | dict") -> dict[str, Any]:
    """Flattened settings that change the arithmetic of training: equal identity = same run, resumable.

    A change of `ray.num_workers` is not in it: the run resumes, and `resume_note` states the new global
    batch size.
    """
    data = config_to_dict(config) if isinstance(config, ExperimentConfig) else dict(config)
    return {k: v for k, v in flatten(data).items()
            if k in IDENTITY_KEEP or not k.startswith(OPERATIONAL_PREFIXES)}


def identity_diff(saved: Optional[dict], cfg: "ExperimentConfig", ignore: tuple[str, ...] = ()) -> list[str]:
    """`["runtime.precision: checkpoint 'fp32' vs config 'bf16'", ...]` for identity fields that differ.

    Fields missing from `saved` (a checkpoint of an older updetr) are not compared.
    """
    if not saved:
        return []
    old, now = identity_fields(saved), identity_fields(cfg)
    return [f"{k}: checkpoint {old[k]!r} vs config {v!r}" for k, v in now.items()
            if k in old and old[k] != v and k not in ignore]


def resume_note(saved: Optional[dict], cfg: "ExperimentConfig", world_size: int) -> Optional[str]:
    """One line when a resume changes the worker count (and so the global batch size), else None."""
    before = ((saved or {}).get("ray") or {}).get("num_workers")
    if before is None or int(before) == world_size:
        return None
    b = cfg.data.batch_size
    return (f"resuming with {world_size} worker(s) instead of {before}: the global batch size changes from "
            f"{int(before) * b} to {world_size * b} ({b} per worker); the learning rate is not rescaled")

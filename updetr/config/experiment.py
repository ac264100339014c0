"""The root config: one experiment = a task plus every section it needs."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from updetr.config.base import _Strict
from updetr.config.data import DataConfig, DetectionConfig
from updetr.config.evaluation import EvalConfig
from updetr.config.loss import LossConfig
from updetr.config.model import ModelConfig
from updetr.config.oneshot import OneShotConfig
from updetr.config.optim import OptimConfig
from updetr.config.panoptic import PanopticConfig
from updetr.config.pretext import PretextConfig
from updetr.config.ray import RayConfig
from updetr.config.runtime import RuntimeConfig
from updetr.config.schedule import ScheduleConfig
from updetr.config.task_defaults import resolve_task_defaults
from updetr.config.tracking import TrackingConfig
from updetr.config.weights import InitConfig


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

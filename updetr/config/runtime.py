"""`runtime:` device, precision, threads and the compute switches."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from updetr.config.base import _Strict


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
    tf32: Optional[bool] = Field(
        None, description="CUDA only: TensorFloat-32 tensor cores. None = PyTorch's defaults, as the official "
                          "code runs (convolutions in TF32, matmuls in full fp32); true = matmuls in TF32 too "
                          "(faster on Ampere and later, ~1e-3 relative rounding; a departure); false = "
                          "everything in full fp32.")
    compile: Optional[bool] = Field(
        None, description="torch.compile the model (inductor). None = on for CUDA, off on CPU, where the "
                          "compile time outweighs the gain for runs of this size (README, Benchmarks).")

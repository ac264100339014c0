"""`tracking:` MLflow tracking."""
from __future__ import annotations

from typing import Optional

from pydantic import Field

from updetr.config.base import _Strict


class TrackingConfig(_Strict):
    """MLflow tracking (owner: `updetr.tracking`)."""

    enabled: bool = Field(True, description="Track the run in MLflow.")
    uri: Optional[str] = Field(None, description="Tracking URI; None = sqlite file mlflow.db under the working "
                                                 "directory (made absolute).")
    experiment: Optional[str] = Field(None, description="MLflow experiment name; None = the experiment name.")

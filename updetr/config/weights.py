"""`init:` where a run's starting weights come from."""
from __future__ import annotations

from typing import Optional

from pydantic import Field

from updetr.config.base import _Strict


class InitConfig(_Strict):
    """Where the weights of a run come from before step 0 (owner: `updetr.tasks`)."""

    checkpoint: Optional[str] = Field(
        None, description="updetr checkpoint (ours, or an official .pth converted by `updetr checkpoint "
                          "convert`) whose model weights start the run; 'previous' = the previous stage "
                          "of a chained experiment (the default for every stage after the first).")
    strict: bool = Field(True, description="Refuse any missing / unexpected key other than the ones the task "
                                           "expects (pre-training heads dropped, detection head re-initialised).")

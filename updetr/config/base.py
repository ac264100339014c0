"""What every config section shares: strict, frozen pydantic models, and the one error type of bad input."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class ConfigError(ValueError):
    """Bad experiment input; the message names the file, the field path and the reason."""

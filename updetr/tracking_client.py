"""How every updetr MLflow client connects: short HTTP retry limits and the credentials of a server with a
login (`updetr mlflow-server --auth`, see docs/security.md). Imports nothing of updetr."""
from __future__ import annotations

import configparser
import os
from pathlib import Path

CREDENTIALS_ENV = "UPDETR_TRACKING_CREDENTIALS"  # path of a credentials file runs read

# MLflow's HTTP client retries 7 times with a 2 s exponential backoff and a 120 s timeout by default:
# minutes per call when a server is gone. Trackers use short limits unless the user set them.
HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}


class CredentialsError(ValueError):
    """A credentials file that cannot be used; the message names it."""


def read_credentials(path: str | os.PathLike) -> tuple[str, str]:
    """(username, password) of a credentials file in MLflow's `~/.mlflow/credentials` format."""
    if not Path(path).is_file():
        raise CredentialsError(f"{path}: no such credentials file")
    parser = configparser.ConfigParser()
    try:
        parser.read(path)
    except (OSError, configparser.Error) as e:
        raise CredentialsError(f"{path}: cannot be read ({e})") from None
    if "mlflow" not in parser:
        raise CredentialsError(f"{path}: not an MLflow credentials file (no [mlflow] section)")
    section = parser["mlflow"]
    user, password = section.get("mlflow_tracking_username"), section.get("mlflow_tracking_password")
    if not user or not password:
        raise CredentialsError(f"{path}: needs mlflow_tracking_username and mlflow_tracking_password")
    return user, password


def prepare_client_env() -> None:
    """Before making an MlflowClient: the short HTTP limits (unless set), and the user / password from
    $UPDETR_TRACKING_CREDENTIALS unless MLFLOW_TRACKING_USERNAME / PASSWORD are set (MLflow itself also
    reads ~/.mlflow/credentials). Raises CredentialsError for an unusable file."""
    for key, value in HTTP_ENV.items():
        os.environ.setdefault(key, value)
    path = os.environ.get(CREDENTIALS_ENV)
    if not path or (os.environ.get("MLFLOW_TRACKING_USERNAME") and os.environ.get("MLFLOW_TRACKING_PASSWORD")):
        return
    user, password = read_credentials(path)
    os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = user, password

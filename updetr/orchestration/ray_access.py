"""Reaching a Ray cluster from this host: a free local port, and token auth when a token is configured.
Shared by the local cluster (`updetr local-cluster`), the Jobs client and the Ray session of a run."""
from __future__ import annotations

import os
import socket
from pathlib import Path


def free_port(avoid: set[int] | None = None) -> int:
    """A TCP port free on 127.0.0.1 and on all interfaces right now (and not in `avoid`)."""
    while True:
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        if not avoid or port not in avoid:
            return port


def token_available() -> bool:
    """True when a Ray auth token is configured for this process (env, token path, ~/.ray/auth_token)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return Path(path).is_file() if path else (Path.home() / ".ray" / "auth_token").is_file()


def enable_token_auth() -> None:
    """Use token auth towards clusters when a token is configured and the user did not choose a mode."""
    if "RAY_AUTH_MODE" not in os.environ and token_available():
        os.environ["RAY_AUTH_MODE"] = "token"

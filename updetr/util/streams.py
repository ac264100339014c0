"""The process's standard streams as default arguments.

A default of `out=sys.stdout` is bound once, when the function is defined: if `sys.stdout` is replaced
later (a notebook, a test capture, `contextlib.redirect_stdout`), the function keeps writing to the old,
possibly closed, stream. `STDOUT` / `STDERR` look `sys.stdout` / `sys.stderr` up on every use instead.
"""
from __future__ import annotations

import sys


class _CurrentStream:
    """Forwards every attribute (`write`, `flush`, ...) to `sys.<name>` as it is at the time of the call."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str):
        return getattr(getattr(sys, self._name), attr)

    def __repr__(self) -> str:
        return f"<current sys.{self._name}>"


STDOUT = _CurrentStream("stdout")
STDERR = _CurrentStream("stderr")

"""`SkipCounter`: bad-data events counted by reason (dropped items, converted images, clipped boxes)."""
from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import Mapping

log = logging.getLogger("updetr.data")

# Reasons used across the data package (a counter accepts any string; these are the documented ones).
EMPTY_FILE = "empty_file"            # 0-byte file: item dropped
UNREADABLE = "unreadable"            # not an image PIL can identify: item dropped
TRUNCATED = "truncated"              # header fine, pixel data cut short: item dropped
DECODE_ERROR = "decode_error"        # any other decoder failure: item dropped
TOO_SMALL = "too_small"              # a side below pretext.min_image_px: item dropped
MISSING_FILE = "missing_file"        # named in an annotation / listing but absent: item dropped
CONVERTED_PREFIX = "converted_"      # converted_{cmyk,gray,alpha,palette,16bit,other}: item kept as RGB
BOX_CLIPPED = "box_clipped"          # annotation box partly outside the image: clipped, kept
BOX_DEGENERATE = "box_degenerate"    # annotation box empty after clipping (or w/h <= 0): dropped, image kept


class SkipCounter:
    """Thread-safe `reason -> count`; `take()` returns the counts since the previous `take()`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._total: Counter = Counter()
        self._pending: Counter = Counter()

    def add(self, reason: str, n: int = 1) -> None:
        if n <= 0:
            return
        with self._lock:
            self._total[reason] += n
            self._pending[reason] += n

    def update(self, counts: Mapping[str, int]) -> None:
        for reason, n in counts.items():
            self.add(reason, int(n))

    def take(self) -> dict[str, int]:
        """Counts since the last call (and reset them); what a batch dict's `skipped` carries."""
        with self._lock:
            out, self._pending = dict(self._pending), Counter()
        return out

    @property
    def total(self) -> dict[str, int]:
        with self._lock:
            return dict(self._total)

    def __bool__(self) -> bool:
        return bool(self._total)

    def summary(self, what: str = "epoch") -> str:
        tot = self.total
        if not tot:
            return f"data: {what}: no bad items"
        parts = ", ".join(f"{k}={v}" for k, v in sorted(tot.items()))
        return f"data: {what}: bad-data events by reason: {parts}"

    def log_summary(self, what: str = "epoch") -> None:
        """One log line (WARNING when anything was dropped or fixed, else INFO)."""
        (log.warning if self._total else log.info)(self.summary(what))


def merge_counts(*counts: Mapping[str, int]) -> dict[str, int]:
    out: Counter = Counter()
    for c in counts:
        out.update({k: int(v) for k, v in c.items() if v})
    return dict(out)


# Events after which the item is still used (fixed, not dropped): reported apart from skips.
KEPT_REASONS = (BOX_CLIPPED, BOX_DEGENERATE)


def is_kept(reason: str) -> bool:
    """True for conversions / fixes (the item was used), False for reasons that dropped the item."""
    return reason.startswith(CONVERTED_PREFIX) or reason in KEPT_REASONS


def split_counts(counts: Mapping[str, float]) -> tuple[dict[str, int], dict[str, int]]:
    """`{reason: n}` -> (dropped items by reason, converted / fixed items by reason)."""
    dropped = {r: int(n) for r, n in counts.items() if n and not is_kept(r)}
    kept = {r: int(n) for r, n in counts.items() if n and is_kept(r)}
    return dropped, kept

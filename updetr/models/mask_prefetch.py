"""Drawing a training step's dropout masks while the frozen CNN runs (`runtime.prefetch_dropout_masks`).

On CPU a step spends ~13 % of its time in PyTorch's Bernoulli kernel, which draws the dropout masks one
number after another on one core (~4.5 ns each, ~22 M per pre-training step at the paper's shapes) while
the other cores wait. The masks depend only on the generator and their shapes, and every shape of the
transformer's dropouts is known once the image size is (`Transformer.dropout_plan`). So a thread draws them,
in the reference's order and from the same default generator, while the CNN runs on the other cores: the CNN
starts on one thread fewer and gets all threads back between two of its blocks as soon as the masks are
drawn (`poll`). The transformer's dropouts then take the masks in order (`take`), checking each shape and
rate against the plan. The masks, and so every number, are bit for bit the ones drawn in place
(tests/models/test_fast_path.py); nothing else draws from the generator in between (UP-DETR makes its own
draws, query shuffle and patch dropout, before the CNN).
"""
from __future__ import annotations

import threading
from typing import Optional

import torch
from torch import Tensor

_ACTIVE = threading.local()
Plan = list[tuple[tuple[int, ...], float]]  # (mask shape, dropout rate p) in the order the forward asks


def active() -> Optional["MaskPrefetch"]:
    return getattr(_ACTIVE, "prefetch", None)


def poll() -> None:
    """Called by the CNN between blocks: all threads back to it once the masks are drawn."""
    prefetch = active()
    if prefetch is not None:
        prefetch.poll()


def cnn_done() -> None:
    """Called after the CNN: every thread back to the main thread, drawn or not."""
    prefetch = active()
    if prefetch is not None:
        prefetch.restore_threads()


class MaskPrefetch:
    """Context manager around a training forward: draws `plan`'s bool masks (True = keep, drawn as
    `bernoulli_(1 - p)`) in a thread from the moment it is entered, with one intra-op thread fewer for the
    main thread until they are drawn. On exit every mask must have been taken."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.masks: list[Optional[Tensor]] = [None] * len(plan)
        self.taken = 0
        self.threads = torch.get_num_threads()
        self.reduced = False
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._draw, name="updetr-dropout-masks", daemon=True)

    def _draw(self) -> None:
        try:
            for i, (shape, p) in enumerate(self.plan):
                self.masks[i] = torch.empty(shape, dtype=torch.bool).bernoulli_(1.0 - p)
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread by take()
            self.error = e

    def __enter__(self) -> "MaskPrefetch":
        if active() is not None:
            raise RuntimeError("dropout mask prefetch: already active in this thread")
        if self.threads > 1:
            torch.set_num_threads(self.threads - 1)
            self.reduced = True
        _ACTIVE.prefetch = self
        self.thread.start()
        return self

    def poll(self) -> None:
        if self.reduced and not self.thread.is_alive():
            self.restore_threads()

    def restore_threads(self) -> None:
        if self.reduced:
            torch.set_num_threads(self.threads)
            self.reduced = False

    def take(self, x: Tensor, p: float) -> Tensor:
        """The next mask, for dropout of x with rate p (must match the plan: shape, rate, contiguous x)."""
        self.restore_threads()
        self.thread.join()
        if self.error is not None:
            raise RuntimeError(f"drawing the dropout masks failed: {self.error}") from self.error
        if self.taken >= len(self.plan):
            raise RuntimeError(f"dropout mask plan has {len(self.plan)} masks; the forward asked for more")
        shape, q = self.plan[self.taken]
        if tuple(x.shape) != shape or q != p or not x.is_contiguous():
            raise RuntimeError(f"dropout mask plan out of step at mask {self.taken}: planned {shape} p={q}, "
                               f"the forward asked for {tuple(x.shape)} p={p} (contiguous: {x.is_contiguous()})")
        mask, self.masks[self.taken] = self.masks[self.taken], None
        self.taken += 1
        return mask

    def __exit__(self, exc_type, exc, tb) -> None:
        self.restore_threads()
        self.thread.join()
        _ACTIVE.prefetch = None
        if exc_type is None and self.taken != len(self.plan):
            raise RuntimeError(f"dropout mask plan: {len(self.plan)} masks drawn, {self.taken} used")

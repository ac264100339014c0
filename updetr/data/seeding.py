"""Per-sample random generators keyed on (run seed, epoch, sample id), and stable sample ids."""
from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

_MASK64 = (1 << 64) - 1
_MASK63 = (1 << 63) - 1


def sample_id_from_key(key: str) -> int:
    """Stable non-negative int63 id of a sample key (a '/'-separated path relative to the dataset root).

    blake2b of the UTF-8 key, so the id does not depend on listing order, worker count or machine, and a
    folder and the shards written from it give every image the same id (shards store the relative path).
    Backslashes are normalised to '/' so Windows-made listings agree.
    """
    digest = hashlib.blake2b(key.replace("\\", "/").encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK63


def seed_sequence(seed_tuple: Sequence[int]) -> np.random.SeedSequence:
    # SeedSequence needs non-negative entropy; negative run seeds wrap to their 64-bit pattern.
    return np.random.SeedSequence([int(v) & _MASK64 for v in seed_tuple])


def numpy_rng(seed_tuple: Sequence[int]) -> np.random.Generator:
    """`numpy.random.Generator` (PCG64) for e.g. `(run_seed, epoch, sample_id)`."""
    return np.random.Generator(np.random.PCG64(seed_sequence(seed_tuple)))


def torch_generator(seed_tuple: Sequence[int]):
    """`torch.Generator` seeded from the same tuple (independent stream from `numpy_rng`)."""
    import torch  # lazily: the Ray preprocessing actors never need torch

    state = seed_sequence(list(seed_tuple) + [0x7A7C4]).generate_state(1, dtype=np.uint64)[0]
    g = torch.Generator()
    g.manual_seed(int(state) & _MASK63)
    return g


def epoch_permutation(n: int, seed: int, epoch: int, tag: int = 0) -> np.ndarray:
    """Seeded permutation of `range(n)` for one epoch (the same on every rank and worker)."""
    return numpy_rng((seed, epoch, 0x5EED0F, tag)).permutation(n)

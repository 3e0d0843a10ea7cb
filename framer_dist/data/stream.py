"""The global sample stream: which item a global position holds, who reads it, its seed.

Global position ``g`` (0, 1, 2, ... over the whole run) -> epoch ``g // N`` and offset ``g % N``
-> item ``perm_epoch[offset]``, with one permutation per epoch seeded by (seed, epoch). A training
step of a data-parallel run consumes consecutive positions; rank ``r`` reads micro-batch ``j``
(counted from the resume position ``start``) at positions
``start + (j * world + r) * B + [0, B)``, and dataloader worker ``w`` produces the micro-batches
``j`` with ``j % num_workers == w``. So the position a run resumes from is one integer (samples
consumed, over all ranks) and it means the same after a change of world size.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


def mix(*keys: int) -> int:
    """A 63-bit integer hashed from integers (stable across processes and platforms)."""
    ss = np.random.SeedSequence([int(k) & (2 ** 64 - 1) for k in keys])
    return int(ss.generate_state(1, np.uint64)[0] >> np.uint64(1))


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def splitmix64(seed: int, n: int) -> np.ndarray:
    """``n`` 64-bit words of the SplitMix64 sequence started at ``seed`` (fast, vectorised)."""
    with np.errstate(over="ignore"):
        x = np.uint64(int(seed) & (2 ** 64 - 1)) + _GOLDEN * np.arange(1, n + 1, dtype=np.uint64)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


@lru_cache(maxsize=2)
def _perm(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, 0xDA7A])).permutation(n)


def item_at(position: int, n: int, seed: int, shift: int = 0) -> int:
    """Item index at a global position; ``shift`` walks forward in the same epoch (replacements
    for unreadable items)."""
    epoch, off = divmod(position, n)
    return int(_perm(n, seed, epoch)[(off + shift) % n])


def sample_seed(seed: int, position: int) -> int:
    """The per-sample seed (crop, degradation, null prompt) of a global position."""
    return mix(seed, position, 0x5A3)


def micro_batch_positions(start: int, j: int, rank: int, world: int, batch: int) -> list[int]:
    base = start + (j * world + rank) * batch
    return list(range(base, base + batch))

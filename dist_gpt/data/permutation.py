"""A keyed pseudo-random permutation of range(n), evaluated per index in O(1) memory.

The sampler needs "block j of epoch e" without storing a shuffled list of every block (a 1 TB
corpus has a billion blocks) and without hidden state (so any rank, at any time, on any world size
computes the same answer). A balanced Feistel network over 2h bits is a bijection on [0, 4^h);
cycle-walking (re-applying it while the value is >= n) turns it into a bijection on [0, n).
With 4^h < 4n the expected number of walks is below 4.
"""

from __future__ import annotations

import numpy as np

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_GOLDEN = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1
ROUNDS = 4


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a fast, well-mixed 64-bit hash of uint64 values (wraps mod 2^64)."""
    x = x ^ (x >> _S30)
    x = x * _M1
    x = x ^ (x >> _S27)
    x = x * _M2
    return x ^ (x >> _S31)


def mix_int(*values: int) -> int:
    """Hash a tuple of Python ints to one uint64 (used to derive keys from seed and epoch)."""
    h = 0x6A09E667F3BCC908
    for v in values:
        h = (h ^ (v & _MASK64)) * _GOLDEN & _MASK64
        h = int(mix64(np.array([h], dtype=np.uint64))[0])
    return h


class FeistelPermutation:
    """perm(j) for j in [0, n): a bijection determined only by (n, key)."""

    def __init__(self, n: int, key: int):
        if n < 1:
            raise ValueError("permutation of an empty range")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        bits += bits & 1  # balanced halves
        self.half = bits // 2
        self.mask = np.uint64((1 << self.half) - 1)
        self.keys = [np.uint64(mix_int(key, r)) for r in range(ROUNDS)]

    def _rounds(self, x: np.ndarray) -> np.ndarray:
        half = np.uint64(self.half)
        left, right = x >> half, x & self.mask
        for k in self.keys:
            left, right = right, left ^ (mix64(right ^ k) & self.mask)
        return (left << half) | right

    def __call__(self, j: np.ndarray) -> np.ndarray:
        """Permute an int array of indices in [0, n); returns int64."""
        x = self._rounds(np.asarray(j, dtype=np.uint64))
        outside = x >= np.uint64(self.n)
        while outside.any():
            x[outside] = self._rounds(x[outside])
            outside = x >= np.uint64(self.n)
        return x.astype(np.int64)

"""Which source each global sample of a mixture comes from: a pure function of the sample index.

A schedule is a list of segments, each `(first global batch position, one weight per source)`: the
mixture's weights from position 0, then each declared phase (data.mix_phases), then any change made
on resume with data.mix_override. Inside a segment the weights are made exact integers `n_s` over
a period `D` (the smallest common denominator of the normalised weights when it is at most 65,536,
e.g. 0.7/0.2/0.1 -> 7/2/1 over 10; otherwise the weights rounded to 1/65,536), and one period of
sources is laid out by smooth weighted round robin (each sample goes to the source furthest behind
its share: `credit += n; pick argmax(credit); credit[pick] -= D`). So within a segment, after any
number i of samples every source s has drawn within one block of `w_s * i` (so a window of whole
global batches is within two blocks of its share at most, one at each end), and the
period repeats exactly, which makes the source of sample i a table look-up: `table[(i - start) % D]`.

Each source keeps its own block counter k_s (the k-th block drawn from source s over the whole
run), again a pure function of the index: the blocks s drew in earlier segments, plus whole
periods times n_s, plus the occurrences of s earlier in the period. Block k_s of source s is sample
k_s of that source's own single-dataset stream (dist_gpt.data.sampler, keyed by the seed and the
source's name), so each source runs through its epochs in a fresh keyed permutation each, exactly
as a lone dataset does. Nothing here has state: any rank on any world size computes the same
(source, block) for a sample, and a resumed run continues the stream exactly.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from dist_gpt.data.permutation import mix_int

MAX_PERIOD = 65536


def integer_weights(weights: list[float]) -> tuple[np.ndarray, int]:
    """Normalised weights as integer counts per period: (n (S,) int64, D = n.sum())."""
    total = sum(weights)
    exact = [Fraction(w / total).limit_denominator(4096) for w in weights]
    period = math.lcm(*(f.denominator for f in exact))
    if sum(exact) == 1 and period <= MAX_PERIOD:
        return np.array([int(f * period) for f in exact], dtype=np.int64), period
    target = np.array(weights, dtype=np.float64) / total * MAX_PERIOD  # largest remainder to MAX_PERIOD
    n = np.floor(target).astype(np.int64)
    order = np.argsort(-(target - n), kind="stable")
    n[order[:MAX_PERIOD - int(n.sum())]] += 1
    return n, MAX_PERIOD


def round_robin(counts: np.ndarray) -> np.ndarray:
    """One period of smooth weighted round robin: (D,) source ids, source s appearing counts[s] times."""
    period = int(counts.sum())
    credit = [0] * len(counts)
    n = counts.tolist()
    table = np.empty(period, dtype=np.int64)
    for i in range(period):
        credit = [c + w for c, w in zip(credit, n)]
        pick = max(range(len(credit)), key=credit.__getitem__)  # ties: the first source
        credit[pick] -= period
        table[i] = pick
    return table


@dataclass
class _Segment:
    start: int            # first global sample index
    counts: np.ndarray    # (S,) blocks per period
    table: np.ndarray     # (D,) source of each sample of a period
    occurrence: np.ndarray  # (D,) how many earlier samples of the period have the same source
    prefix: np.ndarray    # (D + 1, S) blocks of each source in the first j samples of a period
    before: np.ndarray    # (S,) blocks each source drew before this segment

    def drawn(self, samples: int) -> np.ndarray:
        """(S,) blocks of each source in this segment's first `samples` samples."""
        whole, rest = divmod(samples, self.table.size)
        return whole * self.counts + self.prefix[rest]


class MixSchedule:
    """Global sample index -> (source, that source's block counter), for a list of segments
    `[(first position, weights), ...]` (first position 0, increasing) at `global_batch` samples each."""

    def __init__(self, segments: list[tuple[int, list[float]]], global_batch: int):
        self.positions = [p for p, _ in segments]
        self.weights = [list(w) for _, w in segments]
        self.segments: list[_Segment] = []
        before = np.zeros(len(segments[0][1]), dtype=np.int64)
        for i, (position, weights) in enumerate(segments):
            start = position * global_batch
            if self.segments:
                before = self.segments[-1].before + self.segments[-1].drawn(start - self.segments[-1].start)
            counts, _ = integer_weights(weights)
            table = round_robin(counts)
            onehot = np.eye(len(counts), dtype=np.int64)[table]  # (D, S)
            prefix = np.concatenate([np.zeros((1, len(counts)), dtype=np.int64), np.cumsum(onehot, axis=0)])
            occurrence = prefix[np.arange(table.size), table]
            self.segments.append(_Segment(start, counts, table, occurrence, prefix, before))
        self.starts = np.array([s.start for s in self.segments], dtype=np.int64)

    def locate(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global sample indices -> (source id, block counter of that source), both int64."""
        samples = np.asarray(samples, dtype=np.int64)
        which = np.searchsorted(self.starts, samples, side="right") - 1
        if which.size and which.min() == which.max():  # the usual case: every sample in one segment
            return self._in_segment(self.segments[int(which[0])], samples)
        source = np.empty_like(samples)
        block = np.empty_like(samples)
        for i in np.unique(which).tolist():
            sel = which == i
            source[sel], block[sel] = self._in_segment(self.segments[i], samples[sel])
        return source, block

    @staticmethod
    def _in_segment(seg: _Segment, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        r = samples - seg.start
        whole, within = np.divmod(r, seg.table.size)
        source = seg.table[within]
        return source, seg.before[source] + whole * seg.counts[source] + seg.occurrence[within]

    def drawn_before(self, sample: int) -> np.ndarray:
        """(S,) blocks each source drew in global samples [0, sample)."""
        i = int(np.searchsorted(self.starts, sample, side="right")) - 1
        seg = self.segments[i]
        return seg.before + seg.drawn(sample - seg.start)

    def weights_at(self, position: int) -> list[float]:
        return self.weights[int(np.searchsorted(self.positions, position, side="right")) - 1]


def source_seed(seed: int, name: str) -> int:
    """The seed of source `name`'s own block stream: sources never share a permutation."""
    return mix_int(seed, zlib.crc32(name.encode()), 3)


def segments_of(weights: list[float], phases: list[tuple[int, list[float]]]) -> list[tuple[int, list[float]]]:
    """The declared schedule: the mixture's weights from position 0, then each phase."""
    return [(0, list(weights)), *[(p, list(w)) for p, w in phases]]


def resumed_segments(history: list[tuple[int, list]]) -> list[tuple[int, list[float]]]:
    """The schedule a run followed: `history` is [(from position, declared segments), ...], each
    declared schedule in force from its position on (the first from 0; later ones were made on resume
    with data.mix_override and continue the stream from there)."""
    out: list[tuple[int, list[float]]] = []
    for i, (since, declared) in enumerate(history):
        until = history[i + 1][0] if i + 1 < len(history) else None
        live = [(max(p, since), w) for j, (p, w) in enumerate(declared)
                if (j + 1 == len(declared) or declared[j + 1][0] > since) and (until is None or p < until)]
        out += live  # positions keep increasing: the earlier entries all end before `since`
    return out

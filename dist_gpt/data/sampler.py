"""Where each training and validation block lives: pure functions of (seed, sample index).

Train, `data.align=random` (TrainLayout). A block is `L = block_size + 1` tokens (inputs and
shifted targets). Shard s of length `len_s` holds `n_s = (len_s - L + 1) // L` non-overlapping
blocks, so each epoch has `N = sum(n_s)` blocks (the same N every epoch). Global sample i is block
`perm_e(i mod N)` of epoch `e = i // N`, where `perm_e` is a keyed permutation (key = seed, e):
within an epoch no block is drawn twice, and every block of every shard is equally likely, so
shards are drawn in proportion to their tokens. A shard's blocks start at a random offset in
`[0, len_s - n_s * L]` (at least L - 1 wide) drawn afresh per (epoch, shard), so over epochs
blocks start at every position.

Train, `data.align=document` (DocumentLayout). Blocks start where documents start (the dataset's
document index). A document of n tokens gets block starts at its start and at every whole
block_size past it (start, start + T, ..., while inside the document), so a document longer than
a block is covered by consecutive blocks that each predict the next T of its tokens; a block
starting at a short document reads on into the documents after it (packed one after another,
blocks never cross shards). A shard that begins inside a document (one ran across the shard's
end) gets a start at 0 as well. Starts too close to the shard's end for a whole block are replaced
by one block ending exactly at the shard's end (the only start that need not be a document start or
a whole block into one). So every token of a shard is in some block, and every token but a shard's
first is some block's target. An epoch is every start once (N = the number of starts), in the
order of a keyed permutation per epoch, as above; the starts themselves are the same every epoch.
With short documents an epoch is more than one pass over the tokens (each block of T tokens
begins at its own document; the documents after it are read again by their own blocks).

Nothing here has state: any rank computes any sample, so 1, 2 or N ranks draw the same global
stream and a resumed run continues it exactly.

Validation. Non-overlapping blocks from the start of each val shard, in order; optionally a fixed
seeded subset of them. Rank r of W takes every W-th block starting at r.
"""

from __future__ import annotations

import numpy as np

from dist_gpt.data.permutation import FeistelPermutation, mix64, mix_int
from dist_gpt.errors import DataError

VAL_SUBSET_KEY = 0x5EED_0F_7A1  # fixed: the val subset never depends on the training seed
WINDOW = 4096  # samples located per vectorized call; numpy's per-call overhead dominates small batches


class _Layout:
    """Global sample index -> (shard, start token), for any placement of an epoch's N blocks."""

    def __init__(self, blocks_per_epoch: int, seed: int):
        self.blocks_per_epoch, self.seed = blocks_per_epoch, seed
        self._perms: dict[int, FeistelPermutation] = {}
        self._windows: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # a cache of locate_exact()
        self.window = min(WINDOW, blocks_per_epoch)  # small datasets: one epoch per window

    def _place(self, epoch: int, block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Blocks of one epoch (indices in [0, N)) -> (shard, start)."""
        raise NotImplementedError

    def _perm(self, epoch: int) -> FeistelPermutation:
        perm = self._perms.get(epoch)
        if perm is None:
            if len(self._perms) > 4:
                self._perms.clear()
            perm = self._perms[epoch] = FeistelPermutation(self.blocks_per_epoch, mix_int(self.seed, epoch, 1))
        return perm

    def locate(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global sample indices (int64 array) -> (shard index, start token), both int64 arrays.

        Same answer as `locate_exact`, computed `window` consecutive samples at a time and cached
        (a cache of a pure function: it changes speed, never results).
        """
        samples = np.asarray(samples, dtype=np.int64)
        shard = np.empty_like(samples)
        start = np.empty_like(samples)
        size = self.window
        windows = samples // size
        for w in np.unique(windows).tolist():
            cached = self._windows.get(w)
            if cached is None:
                if len(self._windows) >= 4:
                    self._windows.pop(next(iter(self._windows)))
                cached = self._windows[w] = self.locate_exact(np.arange(w * size, (w + 1) * size))
            sel = windows == w
            shard[sel] = cached[0][samples[sel] - w * size]
            start[sel] = cached[1][samples[sel] - w * size]
        return shard, start

    def locate_exact(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The definition: each sample's (shard, start) from (seed, index) alone."""
        samples = np.asarray(samples, dtype=np.int64)
        shard = np.empty_like(samples)
        start = np.empty_like(samples)
        epochs = samples // self.blocks_per_epoch
        for epoch in np.unique(epochs).tolist():  # a batch spans at most two epochs
            sel = epochs == epoch
            shard[sel], start[sel] = self._place(epoch, self._perm(epoch)(samples[sel] - epoch * self.blocks_per_epoch))
        return shard, start


class TrainLayout(_Layout):
    """data.align=random: non-overlapping blocks at a random offset per (epoch, shard)."""

    def __init__(self, shard_tokens: list[int], block_len: int, seed: int):
        self.block_len = block_len
        lengths = np.asarray(shard_tokens, dtype=np.int64)
        self.blocks_per_shard = np.maximum(0, (lengths - block_len + 1) // block_len)
        self.slack = lengths - self.blocks_per_shard * block_len  # offsets are drawn in [0, slack]
        self.cum = np.concatenate([[0], np.cumsum(self.blocks_per_shard)])  # (S+1,)
        _check_blocks(int(self.cum[-1]), lengths, block_len)
        super().__init__(int(self.cum[-1]), seed)

    def _offsets(self, epoch: int, shard: np.ndarray) -> np.ndarray:
        """The epoch's random start offset of each given shard, in [0, slack]."""
        key = np.uint64(mix_int(self.seed, epoch, 2))
        h = mix64(shard.astype(np.uint64) ^ key)
        return (h % (self.slack[shard] + 1).astype(np.uint64)).astype(np.int64)

    def _place(self, epoch: int, block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s = np.searchsorted(self.cum, block, side="right") - 1
        return s, self._offsets(epoch, s) + (block - self.cum[s]) * self.block_len


class DocumentLayout(_Layout):
    """data.align=document: blocks start at document starts and whole blocks into long documents
    (the module docstring). Holds every start in memory: 8 bytes per start, about
    (documents + tokens / block_size) of them."""

    def __init__(self, shard_tokens: list[int], doc_starts: list[np.ndarray], block_len: int, seed: int):
        self.block_len = block_len
        per_shard = [shard_block_starts(n, d, block_len) for n, d in zip(shard_tokens, doc_starts)]
        self.cum = np.concatenate([[0], np.cumsum([p.size for p in per_shard])])  # (S+1,)
        self.starts = np.concatenate(per_shard) if per_shard else np.zeros(0, dtype=np.int64)  # (N,)
        _check_blocks(int(self.cum[-1]), np.asarray(shard_tokens, dtype=np.int64), block_len)
        super().__init__(int(self.cum[-1]), seed)

    def _place(self, epoch: int, block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.searchsorted(self.cum, block, side="right") - 1, self.starts[block]


def shard_block_starts(num_tokens: int, doc_starts: np.ndarray, block_len: int) -> np.ndarray:
    """A shard's block starts under data.align=document (sorted int64; see the module docstring)."""
    if num_tokens < block_len:
        return np.zeros(0, dtype=np.int64)
    step = block_len - 1  # each block predicts the next block_size tokens of its document
    doc_starts = np.asarray(doc_starts, dtype=np.int64)
    segments = doc_starts if doc_starts.size and doc_starts[0] == 0 else np.concatenate([[0], doc_starts])
    lengths = np.diff(np.append(segments, num_tokens))
    per = -(-lengths // step)  # ceil: starts per segment
    first = np.repeat(np.cumsum(per) - per, per)
    starts = np.repeat(segments, per) + (np.arange(int(per.sum())) - first) * step
    last = num_tokens - block_len
    fits = starts[starts <= last]
    if fits.size == starts.size or (fits.size and fits[-1] == last):
        return fits
    return np.append(fits, last)  # one block ends at the shard's end: the tail stays reachable


def document_ids(doc_starts: list[np.ndarray], shard: np.ndarray, start: np.ndarray, length: int) -> np.ndarray:
    """(R, length) int64: for row r = tokens [start[r], start[r] + length) of shard shard[r], which
    document each token belongs to, numbered 0, 1, ... from the row's first token (a document that
    starts inside the row starts a new number)."""
    ids = np.zeros((shard.size, length), dtype=np.int64)
    for row, (s, p) in enumerate(zip(shard.tolist(), start.tolist())):
        d = doc_starts[s]
        lo, hi = np.searchsorted(d, [p + 1, p + length])  # starts inside the row, after its first token
        ids[row, d[lo:hi] - p] = 1
    return np.cumsum(ids, axis=1, out=ids)


def _check_blocks(blocks: int, lengths: np.ndarray, block_len: int) -> None:
    if blocks == 0:
        raise DataError(
            f"the train split ({int(lengths.sum())} tokens in {len(lengths)} shards) has no block of "
            f"block_size + 1 = {block_len} tokens in any shard; use a smaller model.block_size or more data"
        )


class ValLayout:
    """The fixed list of validation blocks: (shard, start) pairs, the same at every evaluation."""

    def __init__(self, shard_tokens: list[int], block_len: int, max_blocks: int | None = None):
        lengths = np.asarray(shard_tokens, dtype=np.int64)
        per_shard = lengths // block_len
        shard = np.repeat(np.arange(len(lengths)), per_shard)
        first = np.concatenate([[0], np.cumsum(per_shard)])[:-1]
        start = (np.arange(shard.size) - np.repeat(first, per_shard)) * block_len
        if shard.size == 0:
            raise DataError(
                f"the val split ({int(lengths.sum())} tokens) has no block of block_size + 1 = {block_len} "
                f"tokens; use a smaller model.block_size or a larger validation split"
            )
        if max_blocks is not None and max_blocks < shard.size:
            if max_blocks < 1:
                raise DataError(f"max_blocks must be at least 1, got {max_blocks}")
            chosen = np.sort(FeistelPermutation(shard.size, VAL_SUBSET_KEY)(np.arange(max_blocks)))
            shard, start = shard[chosen], start[chosen]
        self.shard, self.start = shard, start

    def __len__(self) -> int:
        return int(self.shard.size)

    def for_rank(self, rank: int, world_size: int) -> tuple[np.ndarray, np.ndarray]:
        return self.shard[rank::world_size], self.start[rank::world_size]


def rank_samples(position: int, global_batch: int, micro_batch: int, rank: int, world_size: int,
                 first_sample: int | None = None) -> np.ndarray:
    """This rank's global sample indices for global batch `position`, micro-step by micro-step.

    Global batch g holds samples g*B .. g*B+B-1; rank r's micro-step a takes
    g*B + (a*W + r)*m .. +m-1. Returns shape (grad_accum * m,) in micro-step order.
    """
    base = position * global_batch if first_sample is None else first_sample
    grad_accum = global_batch // (micro_batch * world_size)
    steps = np.arange(grad_accum, dtype=np.int64)[:, None]
    within = np.arange(micro_batch, dtype=np.int64)[None, :]
    return (base + (steps * world_size + rank) * micro_batch + within).reshape(-1)

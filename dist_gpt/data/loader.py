"""Batches for the training loop: `TrainBatches` (train) and `ValBlocks` (evaluation).

`TrainBatches.next()` returns this rank's micro-batches of the next global batch as a list of
`grad_accum = B // (m * W)` pairs `(x, y)`, each `(m, T)` int64 on the device; with
`documents=True`, triples `(x, y, doc)` where `doc` (m, T) int64 numbers the documents of each row
from 0 (the model's `doc_ids`: attention stays inside a document). Each micro-batch is the model's
positional arguments: `model(*micro[a])`. Which blocks they hold is decided by `sampler.py` from
(seed, sample index) alone (`align`: random blocks, or blocks at document starts), so the only
state is the number of global batches consumed (`position`) and the sample index the next one
starts at. `ValBlocks` yields the same pairs or triples.

On CUDA the rows are gathered into a pinned host buffer and copied with `non_blocking=True` on a
side stream; with `prefetch` the next global batch is read and copied by a background thread
while the current one computes. The thread computes exactly what `next()` would, so prefetching
never changes results.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from dist_gpt.data.dataset import Dataset
from dist_gpt.data.sampler import DocumentLayout, TrainLayout, ValLayout, document_ids, rank_samples
from dist_gpt.errors import DataError

_PINNED_SLOTS = 3  # host buffers in flight on CUDA: being filled, being copied, spare
ALIGNS = ("random", "document")


class _HostToDevice:
    """Turns (R, L) token rows (and (R, T) document ids) into (2 or 3, R, T) int64 (inputs,
    targets[, document ids]) on the device, in one copy."""

    def __init__(self, device: torch.device, rows: int, block_size: int, planes: int = 2):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.shape = (planes, rows, block_size)
        if self.cuda:
            self.stream = torch.cuda.Stream(device=self.device)
            self.slots = [torch.empty(self.shape, dtype=torch.int64, pin_memory=True) for _ in range(_PINNED_SLOTS)]
            self.done = [None] * _PINNED_SLOTS
            self.next_slot = 0

    def convert(self, rows: np.ndarray, doc: np.ndarray | None = None) -> tuple[torch.Tensor, "torch.cuda.Event | None"]:
        if not self.cuda:
            host = torch.empty(self.shape, dtype=torch.int64)  # fresh: the caller may keep it
            self._fill(host, rows, doc)
            return host if self.device.type == "cpu" else host.to(self.device), None
        slot = self.next_slot
        self.next_slot = (slot + 1) % _PINNED_SLOTS
        if self.done[slot] is not None:
            self.done[slot].synchronize()  # the copy out of this pinned buffer has finished
        host = self.slots[slot]
        self._fill(host, rows, doc)
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            dev = host.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        self.done[slot] = event
        return dev, event

    @staticmethod
    def _fill(host: torch.Tensor, rows: np.ndarray, doc: np.ndarray | None) -> None:
        out = host.numpy()
        np.copyto(out[0], rows[:, :-1], casting="unsafe")  # x: tokens 0..T-1
        np.copyto(out[1], rows[:, 1:], casting="unsafe")   # y: tokens 1..T
        if doc is not None:
            out[2] = doc                                    # the document of each x token

    def wait(self, dev: torch.Tensor, event) -> torch.Tensor:
        """Make the compute stream wait for the copy; keep the memory alive for that stream."""
        if event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)
            dev.record_stream(stream)
        return dev


class TrainBatches:
    """This rank's share of a deterministic stream of global batches of random train blocks.

    `prefetch` builds the next batch in a thread while the device computes, on CUDA only.
    `prefetch_on_cpu=True` runs that thread on a CPU too: it exists so the tests exercise the CUDA prefetch path on machines without
    a GPU, and is not a setting for training runs.
    """

    def __init__(self, ds: Dataset, block_size: int, global_batch: int, micro_batch: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, device: torch.device | str = "cpu",
                 prefetch: bool = True, prefetch_on_cpu: bool = False, align: str = "random",
                 documents: bool = False):
        # The batch arithmetic is checked where it is configured (TrainConfig.grad_accum).
        self.grad_accum, rest = divmod(global_batch, micro_batch * world_size)
        if rest or not self.grad_accum:
            raise ValueError(f"global_batch={global_batch} does not split into micro-batches of {micro_batch} "
                             f"on {world_size} ranks")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world size {world_size}")
        if align not in ALIGNS:
            raise DataError(f"unknown block alignment {align!r} (expected {' or '.join(ALIGNS)})")
        self.ds, self.block_size, self.global_batch, self.micro_batch = ds, block_size, global_batch, micro_batch
        self.rank, self.world_size, self.seed, self.align = rank, world_size, seed, align
        lengths = [s.num_tokens for s in ds.shards["train"]]
        needed_by = "data.align=document" if align == "document" else "model.doc_mask" if documents else None
        docs = ds.doc_starts("train", needed_by) if needed_by else None
        self.layout = (DocumentLayout(lengths, docs, block_size + 1, seed) if align == "document"
                       else TrainLayout(lengths, block_size + 1, seed))
        self._docs = docs if documents else None  # per shard: where documents start (document ids)
        self.reader = ds.reader("train")
        rows = self.grad_accum * micro_batch
        self._rows = np.empty((rows, block_size + 1), dtype=ds.dtype)  # reused: read buffer
        self._h2d = _HostToDevice(torch.device(device), rows, block_size, 3 if documents else 2)
        self.position = 0       # global batches consumed
        self._next_sample = 0   # global sample index the next batch starts at (= position * B)
        # The thread runs on CUDA only unless asked: on a CPU its hand-off costs more than it
        # overlaps (the model's own threads already use the cores). Results are identical either way.
        threaded = prefetch and (self._h2d.cuda or prefetch_on_cpu)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="dist_gpt-prefetch") if threaded else None
        self._ahead: tuple[int, Future] | None = None  # (first sample, future) of the batch read ahead

    @property
    def blocks_per_epoch(self) -> int:
        return self.layout.blocks_per_epoch

    @property
    def epoch(self) -> float:
        return self._next_sample / self.layout.blocks_per_epoch

    def source_epochs(self) -> dict[str, float]:
        """Epochs the dataset has gone through, under its directory's name (as a mixture's sources)."""
        return {self.ds.path.name: self.epoch}

    def delivered_summary(self) -> dict | None:
        """What each source of a mixture delivered (MixtureBatches); None for one dataset."""
        return None

    def _build(self, first_sample: int):
        samples = rank_samples(0, self.global_batch, self.micro_batch, self.rank, self.world_size, first_sample)
        shard, start = self.layout.locate(samples)
        self.reader.read(shard, start, self._rows)
        doc = None if self._docs is None else document_ids(self._docs, shard, start, self.block_size)
        return self._h2d.convert(self._rows, doc)

    def next(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        first = self._next_sample
        if self._ahead is not None and self._ahead[0] != first:
            self._drop_ahead()
        if self._ahead is not None:
            dev, event = self._ahead[1].result()
        else:
            dev, event = self._build(first)
        self._ahead = None
        self.position += 1
        self._next_sample += self.global_batch
        if self._pool is not None:
            self._ahead = (self._next_sample, self._pool.submit(self._build, self._next_sample))
        planes = self._h2d.wait(dev, event)  # (2 or 3, grad_accum * m, T)
        m = self.micro_batch
        return [tuple(planes[:, a * m:(a + 1) * m]) for a in range(self.grad_accum)]

    def __iter__(self):
        while True:
            yield self.next()

    def _drop_ahead(self) -> None:
        if self._ahead is not None:
            self._ahead[1].result()  # let it finish: it writes the shared read buffer
            self._ahead = None

    def skip(self, n: int) -> None:
        """Skip n global batches without reading them."""
        self._drop_ahead()
        self.position += n
        self._next_sample += n * self.global_batch

    def state_dict(self) -> dict:
        return {"position": self.position, "next_sample": self._next_sample, "seed": self.seed,
                "block_size": self.block_size, "align": self.align, "dataset": self.ds.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        """Resume the same global stream; any world size or micro batch, same seed and dataset."""
        if "mixture" in state and not hasattr(self, "mix"):
            raise DataError(f"the checkpoint was trained on a mixture (data.mix with sources "
                            f"{', '.join(state['mixture']['names'])}), this run on data.path={self.ds.path}: resume "
                            "with the checkpoint's --data.mix, or start a new run")
        if state.get("dataset", self.ds.fingerprint) != self.ds.fingerprint:
            raise DataError(f"the checkpoint was trained on another dataset than {self.ds.path} "
                            "(fingerprint differs); point data.path at the original dataset or start a new run")
        state = {"align": "random", **state}  # checkpoints made before data.align drew random blocks
        for key, option in (("seed", "train.seed"), ("block_size", "model.block_size"), ("align", "data.align")):
            if key in state and state[key] != getattr(self, key):
                raise DataError(f"the checkpoint's data stream used {option}={state[key]}, this run has "
                                f"{getattr(self, key)}; resume with the same value or start a new run")
        self._drop_ahead()
        self.position = int(state["position"])
        self._next_sample = int(state.get("next_sample", self.position * self.global_batch))


class ValBlocks:
    """A fixed, deterministic validation set, split across ranks; iterate for (x, y) batches.

    Rank r holds blocks r, r + W, ...: the ranks' counts differ by at most one block, so ranks
    may run different numbers of batches. Sum loss x tokens and tokens per rank, then all-reduce
    once (no collective per batch, and no DDP forward: evaluate the raw model).
    """

    def __init__(self, ds: Dataset, block_size: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 max_blocks: int | None = None, device: torch.device | str = "cpu", documents: bool = False):
        if batch_size < 1:
            raise DataError(f"validation batch size must be at least 1, got {batch_size}")
        self.layout = ValLayout([s.num_tokens for s in ds.shards["val"]], block_size + 1, max_blocks)
        self.ds, self.block_size, self.batch_size, self.world_size = ds, block_size, batch_size, world_size
        self.shard, self.start = self.layout.for_rank(rank, world_size)
        self.device = torch.device(device)
        self._docs = ds.doc_starts("val", "model.doc_mask") if documents else None

    def __len__(self) -> int:
        """Blocks across all ranks (each rank iterates its own share: every W-th block)."""
        return len(self.layout)

    @property
    def max_batches(self) -> int:
        """Batches of the rank with the most blocks (ranks' shares differ by at most one block)."""
        most = -(-len(self.layout) // self.world_size)
        return -(-most // self.batch_size)

    def __iter__(self):
        reader = self.ds.reader("val")
        try:
            for i in range(0, self.shard.size, self.batch_size):
                shard, start = self.shard[i:i + self.batch_size], self.start[i:i + self.batch_size]
                rows = reader.read(shard, start, np.empty((shard.size, self.block_size + 1), dtype=self.ds.dtype))
                both = torch.from_numpy(rows.astype(np.int64))
                batch = [both[:, :-1].contiguous(), both[:, 1:].contiguous()]  # x, y
                if self._docs is not None:
                    batch.append(torch.from_numpy(document_ids(self._docs, shard, start, self.block_size)))
                if self.device.type == "cuda":
                    batch = [t.pin_memory().to(self.device, non_blocking=True) for t in batch]
                elif self.device.type != "cpu":
                    batch = [t.to(self.device) for t in batch]
                yield tuple(batch)
        finally:
            reader.close()

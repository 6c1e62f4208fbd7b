"""DCP's file writer plus a CRC32 of every tensor it wrote, so a loader can tell corrupt bytes.

torch.save's zip container does not verify its payload when read back: a flipped bit in a tensor
loads silently. Each rank re-reads what it just wrote (from the page cache) and leaves
`<data file>.crc32.json` = {byte offset: CRC32} beside the file; rank 0 merges these into DONE.
This runs inside write_data, so with async_save it happens in the background thread too, and it
finishes before DCP lets rank 0 write `.metadata` (DCP gathers every rank's write results first).

A full disk is said as such here, where the writes happen: torch's zip writer reports it as
"[enforce fail at inline_container.cc] unexpected pos", with the OSError only in its context.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import _StoragePrefix
from torch.futures import Future

from ..errors import CheckpointError
from .layout import SUMS_SUFFIX, crc32_file

_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full(error: BaseException, path: Path, needed_bytes: int = 0, keep_last: int | None = None) -> CheckpointError | None:
    """The one-line error for a write that failed on a full disk (or quota), wherever the OSError sits
    in the exception's chain; None for any other failure. `needed_bytes`: the whole checkpoint's
    bytes, every rank's part (the ranks write to one filesystem); `keep_last`: the retention setting,
    to name the one that makes room."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _FULL:
            where = next(p for p in (Path(path), *Path(path).parents) if p.exists())
            free = shutil.disk_usage(where).free / 1e6
            need = (f"the checkpoint needs {max(1, math.ceil(needed_bytes / 1e6))} MB in all (every rank's part): "
                    "free that much" if needed_bytes else "free space")
            return CheckpointError(f"no space left on device at {path} ({free:.0f} MB free): {need}"
                                   f"{_making_room(keep_last)}; the earlier checkpoints are intact")
        error = error.__cause__ or error.__context__
    return None


def _making_room(keep_last: int | None) -> str:
    """The retention setting that leaves room for the next checkpoint, as it stands now."""
    if keep_last is None:
        return " or lower checkpoint.keep_last"
    if keep_last == 0:
        return (", or keep fewer checkpoints: checkpoint.keep_last=0 keeps every one, "
                "--checkpoint.keep_last=N keeps the newest N")
    if keep_last == 1:
        return (" (checkpoint.keep_last=1 already keeps only the newest, which stays until the next one "
                "is complete), or move --train.run_dir to a larger filesystem")
    return f", or lower checkpoint.keep_last (now {keep_last})"


def planned_bytes(plan) -> int:
    """Bytes of tensor data a save plan writes: each item's chunk (its slice of a sharded tensor)."""
    total = 0
    for item in plan.items:
        if item.tensor_data is not None:
            element = torch.empty((), dtype=item.tensor_data.properties.dtype).element_size()
            total += math.prod(item.tensor_data.chunk.sizes) * element
    return total


@dataclass
class _PrefixAndTotal(_StoragePrefix):
    """DCP's per-rank file prefix, plus the bytes the whole checkpoint writes (all ranks' plans)."""

    total_bytes: int = 0


class ChecksummedFileSystemWriter(FileSystemWriter):
    keep_last: int | None = None  # the run's checkpoint.keep_last, for a full disk's message
    stager = None  # a ReusedStaging (checkpoint.async_staging=reuse), kept by the Checkpointer across saves

    def stage(self, state_dict):
        """dcp.async_save's copy of the state (this writer is its stager): into the reused buffers when
        a stager is set, else DCP's fresh copy (allocated per save)."""
        if self.stager is None:
            return super().stage(state_dict)
        self.per_thread_copy_ahead = 0  # as FileSystemWriter.stage: the copy is on the host already
        return self.stager.stage(state_dict)

    def prepare_global_plan(self, plans):
        """On the coordinator, with every rank's plan (replicated tensors already given to one rank):
        each rank's plan learns the whole checkpoint's size, which a full disk's message gives."""
        plans = super().prepare_global_plan(plans)
        total = sum(planned_bytes(p) for p in plans)
        return [dataclasses.replace(p, storage_data=_PrefixAndTotal(p.storage_data.prefix, total))
                if isinstance(p.storage_data, _StoragePrefix) else p for p in plans]

    def write_data(self, plan, planner) -> Future:
        try:
            fut = super().write_data(plan, planner)
            results = fut.wait()  # DCP's writer has finished by the time it returns; this only unwraps
            self._write_sums(results)
        except Exception as e:
            total = getattr(plan.storage_data, "total_bytes", 0) or planned_bytes(plan)
            full = disk_full(e, Path(self.path), total, self.keep_last)
            if full is None:
                raise
            raise full from None
        return fut

    def _write_sums(self, results) -> None:
        per_file: dict[str, dict[str, int]] = {}
        for r in results:
            info = r.storage_data  # _StorageInfo(relative_path, offset, length)
            per_file.setdefault(info.relative_path, {})[str(info.offset)] = crc32_file(
                Path(self.path) / info.relative_path, info.offset, info.length)
        for name, items in per_file.items():
            sums = Path(self.path) / (name + SUMS_SUFFIX)
            with open(sums, "w") as f:
                json.dump(items, f)
                f.flush()
                os.fsync(f.fileno())

    def finish(self, metadata, results) -> None:
        """Rank 0 writes `.metadata` here."""
        try:
            super().finish(metadata, results)
        except Exception as e:
            full = disk_full(e, Path(self.path), keep_last=self.keep_last)
            if full is None:
                raise
            raise full from None

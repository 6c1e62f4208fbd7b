"""DCP's file writer plus a CRC32 of every tensor it wrote, so a loader can tell corrupt bytes.

torch.save's zip container does not verify its payload when read back: a flipped bit in a tensor
loads silently. Each rank re-reads what it just wrote (from the page cache) and leaves
`<data file>.crc32.json` = {byte offset: CRC32} beside the file; rank 0 merges these into DONE.
This runs inside write_data, so with async_save it happens in the background thread too, and it
finishes before DCP lets rank 0 write `.metadata` (DCP gathers every rank's write results first).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch.distributed.checkpoint import FileSystemWriter
from torch.futures import Future

from .layout import SUMS_SUFFIX, crc32_file


class ChecksummedFileSystemWriter(FileSystemWriter):
    def write_data(self, plan, planner) -> Future:
        fut = super().write_data(plan, planner)
        results = fut.wait()  # DCP's writer has finished by the time it returns; this only unwraps
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
        return fut

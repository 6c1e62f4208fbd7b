"""Is a process alive? The one check for the run lock (a holder on this host) and prepare (a stale
work directory of a dead prepare). Ground floor: imports nothing of dist_gpt, and no torch."""

from __future__ import annotations

import os
from pathlib import Path


def process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), or None where /proc has no answer."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])  # field 22 of proc(5), after "pid (comm)"
    except (OSError, ValueError, IndexError):
        return None


def pid_alive(pid: int, start: int | None = None) -> bool:
    """Whether `pid` runs (someone else's process counts as running); with `start` (process_start's
    answer when it was recorded), whether it is still that process and not a later one given its pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: alive
    return start is None or process_start(pid) in (start, None)

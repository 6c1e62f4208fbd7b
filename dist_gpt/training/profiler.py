"""A torch.profiler trace of a window of steps, on every rank (`--train.profile=START:STOP`).

    python -m dist_gpt.train --train.profile=10:15                       # steps 10 to 14, one process
    torchrun --standalone --nproc_per_node=8 -m dist_gpt.train --train.profile=100:103

The steps are numbered like checkpoints: step S is the one that starts after S steps are done, so
`10:15` records the five steps 10, 11, 12, 13 and 14 (and any evaluation or checkpoint due at steps
10 to 14, which run at the start of their step). Each rank writes
`<run_dir>/profile/steps<START>-<STOP>/rank<r>.pt.trace.json`, a Chrome trace that Perfetto
(https://ui.perfetto.dev, "Open trace file") opens; on CUDA also `rank<r>.memory.pickle`, the CUDA
allocator's history over the window (`torch.cuda.memory._record_memory_history`, which PyTorch
recommends over the profiler's deprecated `export_memory_timeline`): https://pytorch.org/memory_viz
shows it as a memory timeline, each allocation with its stack.

The trainer labels its phases with `record_function`: data, forward, backward, agree (the stop/NaN
agreement), optimizer, evaluate and checkpoint. Outside the window no profiler exists: the labels
cost what a `record_function` costs with profiling off (a check of a flag), nothing is recorded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity



class StepProfiler:
    """Starts a torch.profiler.profile when the run reaches START, writes the trace at STOP (or when
    the run ends first); does nothing, and holds no profiler, at any other time."""

    def __init__(self, window: tuple[int, int] | None, run_dir: Path, rank: int, device: torch.device,
                 keep_history: bool = False) -> None:
        self.window, self.rank, self.device = window, rank, device
        self.keep_history = keep_history  # train.memory_snapshot records the allocator's history all along
        self.out = Path(run_dir) / "profile" / (f"steps{window[0]}-{window[1]}" if window else "")
        self.prof: torch.profiler.profile | None = None
        self.done = window is None

    def at(self, step: int) -> None:
        """Called at the start of every step (before its evaluation and checkpoint)."""
        if self.done:
            return
        start, stop = self.window
        if self.prof is None and start <= step < stop:
            self._start()
        elif self.prof is not None and step >= stop:
            self.close()

    def _start(self) -> None:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.memory._record_memory_history(max_entries=100_000)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        self.prof = torch.profiler.profile(activities=activities)
        self.prof.__enter__()

    def close(self) -> Path | None:
        """Stop and write the trace (when one is being recorded); returns its path."""
        if self.prof is None:
            return None
        prof, self.prof, self.done = self.prof, None, True
        prof.__exit__(None, None, None)
        self.out.mkdir(parents=True, exist_ok=True)
        trace = _free(self.out / f"rank{self.rank}.pt.trace.json")
        prof.export_chrome_trace(str(trace))
        if self.device.type == "cuda":
            torch.cuda.memory._dump_snapshot(str(_free(self.out / f"rank{self.rank}.memory.pickle")))
            if not self.keep_history:
                torch.cuda.memory._record_memory_history(enabled=None)
        return trace


def _free(path: Path) -> Path:
    """`path`, or `<name>.2<suffixes>`... when an earlier attempt of the run wrote it: never overwritten."""
    if not path.exists():
        return path
    stem, rest = path.name.split(".", 1)
    n = 2
    while (path.parent / f"{stem}.{n}.{rest}").exists():
        n += 1
    return path.parent / f"{stem}.{n}.{rest}"

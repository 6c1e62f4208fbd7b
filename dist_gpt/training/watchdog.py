"""A rank whose own step stops making progress: every thread's stack on file, then one line and exit 6.

`train.hang_timeout_s` (default 900 s, above `train.timeout_s`'s 600; 0 turns it off). Each rank
runs a daemon thread that checks, once a second, when this rank's training loop last moved: the
trainer marks the start and the end of every step. When no mark came for `hang_timeout_s` seconds
the thread writes every thread's Python stack (`faulthandler.dump_traceback(all_threads=True)`) to
`<run_dir>/hang/rank<r>.txt`, prints

    error: rank 1: step 1200 made no progress for 900 s (train.hang_timeout_s); every thread's Python
    stack is in runs/x/hang/rank1.txt; run the same command again to resume from the last checkpoint

and ends the process with status 6 (`os._exit`: the main thread may be stuck in C, in a collective or
in I/O, where no exception reaches it). torchrun (`--max-restarts`) or SLURM's requeue restarts the
job, which resumes from its last checkpoint. The cause might be a deadlock, stuck I/O or a stuck
collective; the stack says which.

The watchdog is not armed until the first step has ended (it compiles the model), and it pauses
while the loop evaluates (validation, eval.tasks, samples) and saves a checkpoint.

Which timer fires first when a peer stops: the peer's own watchdog cannot fire if it is SIGSTOPped
(its thread is stopped too). The other ranks wait in a collective: with the defaults their collective
timeout (`train.timeout_s`, 600 s) fires first and names the silent peer (faults.Heartbeat); with
`hang_timeout_s` below `timeout_s` their watchdogs fire first and each of them dumps its stacks (the
collective it waits in is in the dump). A rank that hangs by itself (a deadlock, stuck I/O) is
caught by its own watchdog.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import sys
import threading
import time
from pathlib import Path

from dist_gpt.parallel import dist
from dist_gpt.errors import Hang

EXIT_HANG = Hang.exit_code


class HangWatchdog:
    def __init__(self, timeout_s: float, run_dir: str | Path, rank: int) -> None:
        self.timeout_s, self.rank = timeout_s, rank
        self.path = Path(run_dir) / "hang" / f"rank{rank}.txt"
        self.last = time.monotonic()
        self.step = -1
        self.armed = False   # after the first step (compilation)
        self.pauses = 0      # evaluation and saves in progress
        self.closed = False
        if timeout_s > 0:
            threading.Thread(target=self._watch, name="dist_gpt-hang-watchdog", daemon=True).start()

    def started(self, step: int) -> None:
        """The trainer begins step `step`."""
        self.last, self.step = time.monotonic(), step

    def ended(self) -> None:
        """The trainer finished a step: from now on the watchdog is armed."""
        self.last, self.armed = time.monotonic(), True

    @contextlib.contextmanager
    def paused(self):
        """Evaluation, checkpoints, the end of the run: long by nature, never a hang of the step."""
        self.pauses += 1
        try:
            yield
        finally:
            self.pauses -= 1
            self.last = time.monotonic()

    def close(self) -> None:
        self.armed, self.closed = False, True  # the thread ends within a second

    def _watch(self) -> None:
        interval = min(1.0, self.timeout_s / 10)
        while not self.closed:
            time.sleep(interval)
            if self.armed and not self.pauses and time.monotonic() - self.last > self.timeout_s:
                self._fire()

    def _fire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w") as f:
            f.write(f"rank {self.rank} (pid {os.getpid()}): step {self.step} made no progress for "
                    f"{self.timeout_s:g} s (train.hang_timeout_s); every thread's Python stack, most recent call first:\n\n")
            f.flush()
            faulthandler.dump_traceback(f, all_threads=True)
        # the one refusal path (one line from one rank, quoted in torchrun's summary); never collective
        code = dist.refuse(Hang(f"rank {self.rank}: step {self.step} made no progress for {self.timeout_s:g} s "
                                f"(train.hang_timeout_s); every thread's Python stack is in {self.path}; run the same "
                                "command again to resume from the last checkpoint"))
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(code)

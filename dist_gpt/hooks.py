"""Test hooks: the points where a test holds a process or injects a fault, read from the environment
(never set in normal use). Any module may call them; they import nothing of dist_gpt, and new hooks
go here.

    DIST_GPT_FAULT_NAN_AT=P          the loss of global batch P becomes NaN (once per process)
    DIST_GPT_FAULT_POISON_AT=P       every token of global batch P (inputs and targets) becomes token 0 on every
                                     rank, once per process (a rolled-back run that meets P again trains on it
                                     unpoisoned): a finite loss spike whose one unclipped update visibly damages
                                     a run (bench/spike_bench.py)
    DIST_GPT_FAULT_KILL_AT=S:R       rank R SIGKILLs itself before step S, on torchrun's first attempt only
    DIST_GPT_FAULT_SIGNAL_AT=S:NAME  rank 0 sends itself signal NAME before step S (first attempt only)
    DIST_GPT_FAULT_HANG_AT=S:R       rank R stops answering (sleeps) before step S
    DIST_GPT_FAULT_OOM_AT=S:R        rank R raises torch.OutOfMemoryError at the start of step S (first attempt only)
    DIST_GPT_FAULT_SLOW=R:MS         rank R spends MS more milliseconds of CPU time computing each step (a busy
                                     loop, not a sleep: training/stragglers.py measures compute as CPU time)
    DIST_GPT_FAULT_PAUSE_AT=P,...    hold the process at each point P until the test releases it (see
                                     `pause`; needs DIST_GPT_FAULT_PAUSE_DIR): `start` (the trainer's stop
                                     handlers are in), `shard` (prepare renamed a complete shard), or a
                                     step number S (every rank, before step S, after a checkpoint due at S)
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def _first_attempt() -> bool:
    return os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0" and os.environ.get("SLURM_RESTART_COUNT", "0") == "0"


def pause(point: str, stop=None) -> None:
    """Test-only: hold this process at `point` while a test acts on it, so the test never races it.

    With `point` in DIST_GPT_FAULT_PAUSE_AT (on the first attempt of a restarted job only), the process
    writes DIR/paused-POINT-PID (DIR = DIST_GPT_FAULT_PAUSE_DIR) and waits until DIR/release-POINT exists
    or a stop signal reached `stop` (a StopSignals, whose `code` is then set); SIGINT ends the wait as a
    KeyboardInterrupt, SIGKILL as ever. Whoever leaves the wait writes DIR/release-POINT, so a job
    requeued without a restart count (submitit's local executor) does not pause there again.
    """
    if point not in os.environ.get("DIST_GPT_FAULT_PAUSE_AT", "").split(",") or not _first_attempt():
        return
    folder = Path(os.environ["DIST_GPT_FAULT_PAUSE_DIR"])
    release = folder / f"release-{point}"
    if release.exists():
        return
    (folder / f"paused-{point}-{os.getpid()}").touch()
    while not release.exists() and not (stop is not None and stop.code):
        time.sleep(0.01)
    release.touch()


class FaultInjector:
    """The step-level faults above, for one rank: `before_step` kills, hangs or signals; `poison` spoils
    the chosen global batch's targets; `corrupt_loss` turns the chosen global batch's loss into NaN."""

    def __init__(self, rank: int, stop=None) -> None:
        self.rank, self.stop = rank, stop
        nan_at = os.environ.get("DIST_GPT_FAULT_NAN_AT")
        self.nan_at = int(nan_at) if nan_at else None
        poison_at = os.environ.get("DIST_GPT_FAULT_POISON_AT")
        self.poison_at = int(poison_at) if poison_at else None
        self.kill = self._parse("DIST_GPT_FAULT_KILL_AT")
        self.signal = self._parse("DIST_GPT_FAULT_SIGNAL_AT")
        self.hang = self._parse("DIST_GPT_FAULT_HANG_AT")
        self.oom = self._parse("DIST_GPT_FAULT_OOM_AT")
        slow = self._parse("DIST_GPT_FAULT_SLOW")
        self.slow_s = int(slow[1]) / 1000 if slow and slow[0] == rank else 0.0

    @staticmethod
    def _parse(name: str) -> tuple[int, str] | None:
        raw = os.environ.get(name)
        if not raw:
            return None
        step, _, arg = raw.partition(":")
        return int(step), arg

    def before_step(self, step: int) -> None:
        pause(str(step), self.stop)
        if self.kill and self.kill[0] == step and int(self.kill[1]) == self.rank and _first_attempt():
            os.kill(os.getpid(), signal.SIGKILL)
        if self.hang and self.hang[0] == step and int(self.hang[1]) == self.rank:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # torchrun's SIGTERM may end the hung rank
            time.sleep(24 * 3600)
        if self.signal and self.signal[0] == step and self.rank == 0 and _first_attempt():
            os.kill(os.getpid(), getattr(signal, self.signal[1]))
        if self.oom and self.oom[0] == step and int(self.oom[1]) == self.rank and _first_attempt():
            import torch  # start-up cost: prepare's workers import this module and never import torch

            raise torch.OutOfMemoryError(f"CUDA out of memory (DIST_GPT_FAULT_OOM_AT={step}:{self.rank})")

    def slow(self) -> None:
        """DIST_GPT_FAULT_SLOW: burn this thread's CPU time, the way a slower device or a throttled core would."""
        if self.slow_s:
            end = time.thread_time() + self.slow_s
            while time.thread_time() < end:
                pass

    def poison(self, position: int, micro: list) -> list:
        """DIST_GPT_FAULT_POISON_AT: the first time global batch `position` is drawn, every token of this
        rank's micro-batches [(x, y, *doc)] becomes token 0: one context and one answer the model finds
        unlikely at every position, so the loss jumps and the gradients add up instead of cancelling
        (a norm ~100x the usual)."""
        if self.poison_at is None or position != self.poison_at:
            return micro
        self.poison_at = None
        return [(x.new_zeros(x.shape), y.new_zeros(y.shape), *doc) for x, y, *doc in micro]

    def corrupt_loss(self, loss, position: int):
        if self.nan_at is not None and position == self.nan_at:
            self.nan_at = None
            return loss * float("nan")
        return loss

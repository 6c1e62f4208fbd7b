"""Faults: stop signals agreed by every rank, the requeue marker, and test-only fault injection.

SIGTERM, SIGUSR1 and SIGUSR2 (SLURM's warning before a time limit or preemption; submitit's default
is USR2) only set a flag in the handler. Once per step every rank all-reduces its flags, so all
ranks see the same stop request at the same step boundary, save one checkpoint together, and rank 0
leaves `requeue.json` in the run directory. The ranks then exit 0: torchrun turns a failed worker
into a restart or exit status 1, so the request to requeue must not ride on the exit status. The
launchers (slurm/train.sh, launch/submit.py) requeue the job when they find the marker.

Fault injection for the tests, read from the environment (never set in normal use):
    DIST_GPT_FAULT_NAN_AT=P          the loss of global batch P becomes NaN (once per process)
    DIST_GPT_FAULT_KILL_AT=S:R       rank R SIGKILLs itself before step S, on torchrun's first attempt only
    DIST_GPT_FAULT_SIGNAL_AT=S:NAME  rank 0 sends itself signal NAME before step S (first attempt only)
    DIST_GPT_FAULT_HANG_AT=S:R       rank R stops answering (sleeps) before step S
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

# No torch import at module level: the entry points install StopSignals before importing torch.

STOP_SIGNALS = {signal.SIGTERM: 1, signal.SIGUSR1: 2, signal.SIGUSR2: 3}
CODE_TO_NAME = {code: sig.name for sig, code in STOP_SIGNALS.items()}
MARKER = "requeue.json"


class StopSignals:
    """Records the last stop signal; the training loop asks `agreed()` at each step boundary."""

    def __init__(self) -> None:
        self.code = 0

    def install(self) -> "StopSignals":
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:  # no work in a handler: just remember it
        self.code = STOP_SIGNALS[signal.Signals(signum)]

    def state_dict(self) -> dict:
        return {"code": self.code}


def agree(stop: StopSignals, nonfinite) -> tuple[str | None, bool]:
    """One all-reduce per step: (the stop signal any rank got, whether any rank's loss was not finite).

    `nonfinite` is a 0-d bool tensor on the training device; reading the result is the step's one
    host-device synchronisation.
    """
    import torch

    from . import dist

    flags = torch.stack([torch.tensor(float(stop.code), device=nonfinite.device), nonfinite.float()])
    flags = dist.all_reduce_max(flags).tolist()
    code = int(flags[0])
    return (CODE_TO_NAME[code] if code else None), bool(flags[1])


def write_marker(run_dir: Path, signal_name: str, step: int, checkpoint: Path | None) -> Path:
    path = run_dir / MARKER
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"signal": signal_name, "step": step,
                               "checkpoint": str(checkpoint) if checkpoint else None,
                               "time": time.time()}, indent=2))
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------
# Test-only fault injection

def _first_attempt() -> bool:
    return os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0" and os.environ.get("SLURM_RESTART_COUNT", "0") == "0"


class FaultInjector:
    def __init__(self, rank: int) -> None:
        self.rank = rank
        nan_at = os.environ.get("DIST_GPT_FAULT_NAN_AT")
        self.nan_at = int(nan_at) if nan_at else None
        self.kill = self._parse("DIST_GPT_FAULT_KILL_AT")
        self.signal = self._parse("DIST_GPT_FAULT_SIGNAL_AT")
        self.hang = self._parse("DIST_GPT_FAULT_HANG_AT")

    @staticmethod
    def _parse(name: str) -> tuple[int, str] | None:
        raw = os.environ.get(name)
        if not raw:
            return None
        step, _, arg = raw.partition(":")
        return int(step), arg

    def before_step(self, step: int) -> None:
        if self.kill and self.kill[0] == step and int(self.kill[1]) == self.rank and _first_attempt():
            os.kill(os.getpid(), signal.SIGKILL)
        if self.hang and self.hang[0] == step and int(self.hang[1]) == self.rank:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # torchrun's SIGTERM may end the hung rank
            time.sleep(24 * 3600)
        if self.signal and self.signal[0] == step and self.rank == 0 and _first_attempt():
            os.kill(os.getpid(), getattr(signal, self.signal[1]))

    def corrupt_loss(self, loss, position: int):
        if self.nan_at is not None and position == self.nan_at:
            self.nan_at = None
            return loss * float("nan")
        return loss

"""Stop signals: SIGTERM, SIGUSR1 and SIGUSR2 only set a flag (FaultGuard agrees on it at the next
step boundary, dist_gpt/training/faults.py), and the requeue marker the launchers look for.

Torch-free on purpose: `python -m dist_gpt.train` installs these handlers before it imports torch,
since a signal that arrives while torch imports must not kill a rank.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from dist_gpt.hooks import pause

STOP_SIGNALS = {signal.SIGTERM: 1, signal.SIGUSR1: 2, signal.SIGUSR2: 3}
AGENT_LOST = 4  # not a signal: the torchrun agent that started this rank is gone
CODE_TO_NAME = {**{code: sig.name for sig, code in STOP_SIGNALS.items()}, AGENT_LOST: "AGENT_LOST"}
MARKER = "requeue.json"


class StopSignals:
    """Records the last stop signal; `FaultGuard.after_loss` agrees on it at each step boundary."""

    def __init__(self) -> None:
        self.code = 0

    def install(self) -> "StopSignals":
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        pause("start", self)
        return self

    def _handle(self, signum, frame) -> None:  # no work in a handler: just remember it
        self.code = STOP_SIGNALS[signal.Signals(signum)]


def write_marker(run_dir: Path, signal_name: str, step: int, checkpoint: Path | None) -> Path:
    path = run_dir / MARKER
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"signal": signal_name, "step": step,
                               "checkpoint": str(checkpoint) if checkpoint else None,
                               "time": time.time()}, indent=2))
    os.replace(tmp, path)
    return path

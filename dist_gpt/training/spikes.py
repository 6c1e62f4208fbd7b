"""Loss spikes: a finite loss or gradient norm far above the recent steps', and `train.spike_policy`.

    detector = SpikeDetector(cfg.train, state)
    spike = detector.check(step, position, loss, grad_norm)   # None, or a Spike with its z-scores

The inputs are the step's global loss (mean over the ranks) and gradient norm, which every rank
receives from the step's one agreement all-reduce (FaultGuard.after_loss) before the optimizer
step: every rank holds the same numbers and history, so every rank decides the same, with no
other synchronisation, and `skip` can still drop the harmful update itself.

A z-score is (x - mean) / deviation over the last `train.spike_window` accepted steps (only upward
deviations count); detection starts once the window is full. A step is a spike when its loss's
z-score reaches `train.spike_z` or its gradient norm's reaches `train.spike_grad_z` (0: never by
itself), the higher bar: gradient norms are heavy-tailed, and healthy runs (bench/spike_bench.py,
clipping off) reached gradient-norm z-scores of 13 with loss z-scores below 1, where a poisoned
batch gives loss z-scores of 60 to 330. The window lives in the run state
(RunState.spike_history), so a resumed run, or one rolled back to a checkpoint, decides exactly as
the uninterrupted run would. What FaultGuard does with a spike:

    warn      log it; the update is taken and the step joins the window
    skip      log it; the update is dropped (the batch is spent, as with nan_policy=skip); a loss that
              stays "spiking" for MAX_SKIPS_IN_A_ROW steps is a shift, not a spike: the run stops
    rollback  log it; reload the latest checkpoint and skip the train.spike_skip_batches global
              batches that end at the spike (RunState.bad_positions, like a NaN rollback), at most
              train.nan_max_rollbacks times; with no checkpoint yet, the step is skipped instead
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_SKIPS_IN_A_ROW = 10
MIN_DEVIATION = 1e-3  # relative to the mean: a flat window (a constant loss) does not make every wiggle a spike


@dataclass
class Spike:
    step: int
    position: int        # the global batch of the step
    loss: float
    loss_z: float
    grad_norm: float
    grad_norm_z: float

    def describe(self) -> str:
        return (f"loss spike at step {self.step} (global batch {self.position}): loss {self.loss:.4f} "
                f"(z {self.loss_z:.1f}), grad norm {self.grad_norm:.3g} (z {self.grad_norm_z:.1f})")


class SpikeDetector:
    """z-scores of (loss, grad norm) against the window of recent accepted steps in `state`."""

    def __init__(self, cfg, state) -> None:
        self.policy, self.z, self.grad_z, self.window = cfg.spike_policy, cfg.spike_z, cfg.spike_grad_z, cfg.spike_window
        self.state = state

    @property
    def on(self) -> bool:
        return self.policy != "off"

    def check(self, step: int, position: int, loss: float, grad_norm: float) -> Spike | None:
        """The spike this step is, or None; a step that is none joins the window (warn: every step)."""
        history = self.state.spike_history
        recent = history[-self.window:]  # (a resume may have shortened train.spike_window)
        spike = None
        if len(recent) >= self.window and math.isfinite(loss) and math.isfinite(grad_norm):
            loss_z, norm_z = (_z(value, [h[i] for h in recent]) for i, value in enumerate((loss, grad_norm)))
            if loss_z >= self.z or 0 < self.grad_z <= norm_z:
                spike = Spike(step, position, loss, loss_z, grad_norm, norm_z)
        if spike is None or self.policy == "warn":
            history.append([loss, grad_norm])
            del history[:-self.window]
        return spike


def _z(value: float, window: list[float]) -> float:
    mean = sum(window) / len(window)
    deviation = math.sqrt(sum((v - mean) ** 2 for v in window) / len(window))
    return (value - mean) / max(deviation, MIN_DEVIATION * abs(mean), 1e-12)

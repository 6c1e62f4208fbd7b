"""Re-exports dist_gpt.optim.muon under its old path `dist_gpt.muon` (nothing in the package imports it)."""

from dist_gpt.optim.muon import (ADJUST_LR_FNS, BATCH_MIN_SIDE, DEFAULT_COEFFICIENTS, DEFAULT_EPS, DEFAULT_NS_STEPS,
                                 Muon, adjusted_lr, newton_schulz)

__all__ = ["ADJUST_LR_FNS", "BATCH_MIN_SIDE", "DEFAULT_COEFFICIENTS", "DEFAULT_EPS", "DEFAULT_NS_STEPS", "Muon",
           "adjusted_lr", "newton_schulz"]

"""Re-exports dist_gpt.training.runlock under its old path `dist_gpt.runlock` (nothing in the package imports it)."""

from dist_gpt.training.runlock import (LOCK, REFRESH_S, STALE_S, Holder, RunLock, held)

__all__ = ["LOCK", "REFRESH_S", "STALE_S", "Holder", "RunLock", "held"]

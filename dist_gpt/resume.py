"""Re-exports dist_gpt.checkpoint.run_state under its old path `dist_gpt.resume` (nothing in the package imports it)."""

from dist_gpt.checkpoint.run_state import (MODEL_KEYS_FREE, TRAIN_KEYS_FIXED, ConfigIdentity, DatasetIdentity,
                                           RunState)

__all__ = ["MODEL_KEYS_FREE", "TRAIN_KEYS_FIXED", "ConfigIdentity", "DatasetIdentity", "RunState"]

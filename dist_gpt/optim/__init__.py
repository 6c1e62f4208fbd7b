"""Re-exports dist_gpt.optim.optimizers under the old path `dist_gpt.optim` (nothing in the package imports it)."""

from .optimizers import (OPTIMIZERS, SCHEDULES, LRSchedule, OptimConfig, build_optimizers, clip_grad_norm,
                         param_group_name, split_params)

__all__ = ["OPTIMIZERS", "SCHEDULES", "LRSchedule", "OptimConfig", "build_optimizers", "clip_grad_norm",
           "param_group_name", "split_params"]

"""Re-exports dist_gpt.training.trainer under its old path `dist_gpt.trainer` (nothing in the package imports it)."""

from dist_gpt.training.trainer import (Trainer, build, build_model, dropout_seed, forward_backward, open_dataset,
                                       optimizer_step, restore, zero_grads)
from dist_gpt.parallel.dist import use_compile

__all__ = ["Trainer", "build", "build_model", "dropout_seed", "forward_backward", "open_dataset", "optimizer_step",
           "restore", "use_compile", "zero_grads"]

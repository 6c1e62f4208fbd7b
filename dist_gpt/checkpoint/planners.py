"""DCP planners that enforce dist_gpt's rules: tensors only, and matching keys and shapes.

DCP flattens a nested state dict into dotted keys (`model_optim.model.h.0.attn.qkv.weight`); the
checks run on those, so the messages name the exact entry.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, DefaultSavePlanner

from ..errors import CheckpointError


class TensorOnlySavePlanner(DefaultSavePlanner):
    """Refuses to write anything that is not a tensor: non-tensor state belongs in meta.json."""

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=False) -> None:
        super().set_up_planner(state_dict, storage_meta, is_coordinator)
        for key, value in self.state_dict.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"checkpoint state {key!r} is a {type(value).__name__}, not a tensor: "
                                "put non-tensor state into the checkpoint's meta (JSON), never into DCP")


class SafeLoadPlanner(DefaultLoadPlanner):
    """Checks every key this run needs against the checkpoint before anything is read.

    `strict_prefixes`: the checkpoint may not hold keys under these prefixes that this run lacks
    (a deeper model's extra layers would otherwise be ignored silently). Keys outside them are
    allowed to be left unread, e.g. the optimizer state when only the weights are wanted.
    """

    def __init__(self, path: str | Path, strict_prefixes: tuple[str, ...] = ()):
        super().__init__()
        self.ckpt_path = Path(path)
        self.strict_prefixes = tuple(strict_prefixes)

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        super().set_up_planner(state_dict, metadata, is_coordinator)
        saved = metadata.state_dict_metadata
        fix = ("resume with the model and optimizer settings it was saved with (see its meta.json), "
               "or start a fresh run with --resume none")
        for key, value in self.state_dict.items():
            shape = tuple(value.size()) if isinstance(value, torch.Tensor) else None
            if key in saved and shape != tuple(saved[key].size):
                raise CheckpointError(f"checkpoint {self.ckpt_path} holds {key!r} with shape {list(saved[key].size)} "
                                      f"but this run's has shape {list(shape or ())}: {fix}")
        missing = [k for k in self.state_dict if k not in saved]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CheckpointError(f"checkpoint {self.ckpt_path} does not hold {missing[0]!r}{more} that this run "
                                  f"needs: it was saved with another model or optimizer; {fix}")
        extra = [k for k in saved if k.startswith(self.strict_prefixes) and k not in self.state_dict]
        if extra:
            more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
            raise CheckpointError(f"checkpoint {self.ckpt_path} holds {extra[0]!r}{more} that this run does not "
                                  f"have: it was saved with another model or optimizer; {fix}")

    def load_bytes(self, read_item, value) -> None:
        raise CheckpointError(f"checkpoint {self.ckpt_path}: {read_item.dest_index.fqn!r} is a non-tensor entry; "
                              "refusing to unpickle it")

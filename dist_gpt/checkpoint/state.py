"""Stateful adapter that puts a model and its optimizers into a checkpoint as tensors only.

    tensors = {"model_optim": ModelOptimizerState(model, optimizers)}
    ckpt.save(step, tensors, meta)            # and ckpt.load(path, tensors)

It goes through `torch.distributed.checkpoint.state_dict.get_state_dict`, which strips DDP's
`module.` and torch.compile's `_orig_mod.` prefixes, keys the optimizer state by parameter name
(not by position) and handles FSDP2 sharded parameters. What it saves:

    model.<fqn>                       every parameter and persistent buffer
    optim.state.<fqn>.<key>           every optimizer state tensor (AdamW: step, exp_avg, exp_avg_sq)

The optimizer's param_groups (lr, betas, weight decay, which parameters) are not saved: they are
rebuilt from the config, and the LR schedule sets lr before every step. Optimizer state that is a
Python number (some optimizers keep `step` as an int) is stored as a 0-d tensor and turned back on
load, so the checkpoint stays tensors only.

Note: DCP gives a never-stepped optimizer its state by taking one zero-gradient step with lr 0
(AdamW's `step` becomes 1), so checkpoint after the first optimizer step, not before it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

_SCALARS = (bool, int, float)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module under DDP and torch.compile wrappers (the one whose parameters the optimizers hold)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


class ModelOptimizerState(Stateful):
    def __init__(self, model: nn.Module, optimizers: Sequence[torch.optim.Optimizer] = ()):
        self.model = unwrap_model(model)
        self.optimizers = list(optimizers)
        self._scalar_types: dict[tuple[str, str], type] = {}

    def state_dict(self) -> dict:
        if not self.optimizers:
            return {"model": get_model_state_dict(self.model)}
        model_sd, optim_sd = get_state_dict(self.model, self.optimizers)
        state: dict[str, dict[str, torch.Tensor]] = {}
        self._scalar_types = {}
        for fqn, entries in optim_sd["state"].items():
            state[fqn] = {}
            for key, value in entries.items():
                if isinstance(value, torch.Tensor):
                    state[fqn][key] = value
                elif isinstance(value, _SCALARS):
                    self._scalar_types[(fqn, key)] = type(value)
                    state[fqn][key] = torch.tensor(value)
                elif value is not None:
                    raise TypeError(f"optimizer state {fqn}.{key} is a {type(value).__name__}: only tensors and "
                                    "numbers can be checkpointed")
        return {"model": model_sd, "optim": {"state": state}}

    def load_state_dict(self, sd: dict) -> None:
        if not self.optimizers:
            set_model_state_dict(self.model, sd["model"])
            return
        _, live = get_state_dict(self.model, self.optimizers)
        state = {}
        for fqn, entries in sd["optim"]["state"].items():
            state[fqn] = {}
            for key, value in entries.items():
                kind = self._scalar_types.get((fqn, key))
                state[fqn][key] = kind(value.item()) if kind is not None else value
        set_state_dict(self.model, self.optimizers, model_state_dict=sd["model"],
                       optim_state_dict={"state": state, "param_groups": live["param_groups"]})


class JsonState:
    """A plain JSON value as a checkpoint's JSON state: saved as it is, loaded back into `.value`
    (for what has no live object of its own, e.g. the notebook importer's provenance)."""

    def __init__(self, value=None):
        self.value = value

    def state_dict(self):
        return self.value

    def load_state_dict(self, value) -> None:
        self.value = value

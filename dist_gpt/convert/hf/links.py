"""Tensor-by-tensor correspondence between dist_gpt's parameters and a Hugging Face architecture's.

An architecture module (gpt2.py, llama.py) lists `Link`s for one (GPTConfig, HF config) pair; the
two functions here apply them in either direction. Every conversion is a copy, a transpose, a
split/concatenation of rows, or a tensor that one side lacks and the other holds as zeros, so a
round trip gives back identical bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from dist_gpt.errors import CheckpointError, ConfigError
from dist_gpt.model.gpt import GPT, GPTConfig


@dataclass(frozen=True)
class Link:
    """dist_gpt tensor `ours` <-> the HF tensors `theirs` (concatenated along dim 0 in that order).

    ours=None: dist_gpt has no such tensor and the HF one is zero (a bias dist_gpt lacks).
    theirs=(): HF has no such tensor, so dist_gpt's must be zero (a bias the architecture lacks).
    transpose: HF stores it (in, out), GPT-2's Conv1D. same: every HF tensor equals ours (the gate
    and up projections of a ReLU² MLP). `rows`: the rows of each HF tensor in the concatenation
    (default equal shares). `shape`: the zero tensor's shape when ours is None."""

    ours: str | None
    theirs: tuple[str, ...]
    transpose: bool = False
    same: bool = False
    rows: tuple[int, ...] | None = None
    shape: tuple[int, ...] | None = None


def our_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every dist_gpt tensor of `cfg`, from a model built on the meta device (no memory)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in GPT(cfg).state_dict().items()}


def to_ours(links: list[Link], get: Callable[[str], torch.Tensor], has: Callable[[str], bool],
            cfg: GPTConfig, where: str) -> dict[str, torch.Tensor]:
    """dist_gpt's state dict from HF tensors (`get(name)`), checked name by name and shape by shape."""
    shapes = our_shapes(cfg)
    out: dict[str, torch.Tensor] = {}
    for link in links:
        missing = [name for name in link.theirs if not has(name)]
        if missing:
            raise CheckpointError(f"{where}: tensor {missing[0]} is missing from the weights: the files are "
                                  "incomplete or belong to another model; download the model again")
        tensors = [get(name) for name in link.theirs]
        if link.ours is None:
            if any(t.any() for t in tensors):
                raise CheckpointError(f"{where}: {link.theirs[0]} is not zero, but the dist_gpt settings in "
                                      "config.json say the model has no such bias: the weights were changed "
                                      "outside dist_gpt; delete the \"dist_gpt\" entry of config.json to import "
                                      "them as a plain Hugging Face model")
            continue
        if not tensors:
            out[link.ours] = torch.zeros(shapes[link.ours])
            continue
        if link.transpose:
            tensors = [t.t() for t in tensors]
        if link.same:
            if any(not torch.equal(t, tensors[0]) for t in tensors[1:]):
                raise CheckpointError(f"{where}: {link.theirs[1]} differs from {link.theirs[0]}, but the dist_gpt "
                                      "settings in config.json say they are one ReLU² weight: the weights were "
                                      "changed outside dist_gpt")
            tensors = tensors[:1]
        want = shapes[link.ours]
        rows = link.rows or (want[0] // len(tensors),) * len(tensors)
        for name, t, n in zip(link.theirs, tensors, rows):
            if tuple(t.shape) != (n, *want[1:]):
                got, expect = tuple(t.shape), (n, *want[1:])
                if link.transpose:  # say it in the file's (in, out) layout
                    got, expect = got[::-1], expect[::-1]
                raise CheckpointError(f"{where}: tensor {name} has shape {got} but config.json describes "
                                      f"{expect}: the weights do not belong to this config.json")
        out[link.ours] = (tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)).contiguous()
    return out


def to_theirs(links: list[Link], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF tensors from dist_gpt's state dict; refuses a nonzero tensor the architecture cannot hold."""
    out: dict[str, torch.Tensor] = {}
    for link in links:
        if link.ours is None:
            out[link.theirs[0]] = torch.zeros(link.shape, dtype=state["tok_emb.weight"].dtype)
            continue
        tensor = state[link.ours]
        if not link.theirs:
            if tensor.any():
                raise ConfigError(f"{link.ours} is not zero and the exported architecture has no such tensor: "
                                  "this model cannot be exported exactly")
            continue
        if link.same:
            parts = [tensor] * len(link.theirs)
        else:
            parts = list(tensor.split(link.rows or tensor.shape[0] // len(link.theirs), dim=0))
        for name, part in zip(link.theirs, parts):
            # a copy each: safetensors refuses tensors that share memory (gate = up, split rows)
            out[name] = (part.t() if link.transpose else part).contiguous().clone()
    return out


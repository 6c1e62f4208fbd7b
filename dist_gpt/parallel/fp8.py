"""FP8 training (`train.fp8=true`): the blocks' linear layers compute their matmuls in float8.

    pip install 'dist_gpt[fp8]'                                               # torchao
    python -m dist_gpt.train --preset gpt2-124m --train.fp8=true              # one H100 (compiled)
    torchrun --nproc_per_node=8 -m dist_gpt.train --preset gpt2-124m --train.fp8=true
    DIST_GPT_FP8_EMULATE=1 python -m dist_gpt.train --train.fp8=true --train.precision=bf16   # CPU, emulated

The recipe torchtitan and nanochat use: torchao's float8 training (`convert_to_float8_training`,
`Float8LinearConfig` with its default tensorwise scaling: one scale per tensor, from its absolute
maximum, taken afresh at every step) swaps every `nn.Linear` inside `model.blocks` for a
`Float8Linear`. The embeddings and the head stay in the run's bf16 (they are a small share of the
FLOPs and the most sensitive to rounding). Weights, gradients and optimizer state stay fp32; the
weight is cast to e4m3 for each forward, and gradients to e5m2 in backward. A Float8Linear holds
exactly nn.Linear's parameters under the same names, so a checkpoint resumes across fp8 and bf16
and exports as usual.

The conversion is applied by `dist.parallelize`, before compile and before fully_shard, as
torchtitan does. FP8 matmuls need a GPU of compute capability 8.9 or later (Ada, Hopper, Blackwell);
anywhere else the run is refused, except under DIST_GPT_FP8_EMULATE=1, where torchao emulates the
float8 rounding in higher precision (`Float8LinearConfig(emulate=True)`): numerically FP8, no
faster. That is how the tests run it on a CPU; its speed is measured on GPU only.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from dist_gpt.errors import ConfigError

EMULATE_ENV = "DIST_GPT_FP8_EMULATE"
MIN_CAPABILITY = (8, 9)  # float8 tensor cores: Ada (8.9), Hopper (9.0) and later


def emulated() -> bool:
    """Whether DIST_GPT_FP8_EMULATE asks for torchao's emulation (float8 rounding, no FP8 hardware)."""
    return os.environ.get(EMULATE_ENV, "").lower() in ("1", "true", "yes")


def check(device: torch.device, precision: str) -> None:
    """Refuse train.fp8=true where it cannot run, in one line: without torchao, on a CPU or a GPU
    without FP8 (unless emulated), or in a precision other than bf16 (`precision` is the resolved one)."""
    _torchao()
    if not emulated():
        if device.type != "cuda":
            raise ConfigError(f"train.fp8=true needs a GPU with FP8 (compute capability 8.9+), and this run is on "
                              f"the {device.type.upper()}: use --train.fp8=false (or {EMULATE_ENV}=1 to emulate "
                              "FP8 for testing, no faster)")
        capability = torch.cuda.get_device_capability(device)
        if capability < MIN_CAPABILITY:
            raise ConfigError(f"train.fp8=true needs a GPU with FP8 (compute capability 8.9+, e.g. H100, L4, "
                              f"RTX 4090); {torch.cuda.get_device_name(device)} has "
                              f"{capability[0]}.{capability[1]}: use --train.fp8=false")
    if precision != "bf16":
        raise ConfigError(f"train.fp8=true runs the blocks' linears in FP8 and the rest in bf16, but this run's "
                          f"precision is {precision}: use --train.precision=bf16 (or auto on a GPU)")


def convert(model: nn.Module) -> int:
    """Swap the nn.Linear layers of `model.blocks` for torchao's Float8Linear, in place (the model may
    be on the meta device); returns how many were swapped. Both sides of a linear must be multiples
    of 16 (FP8 matmul tiles); a linear that is not stays as it is."""
    torchao = _torchao()
    config = torchao.Float8LinearConfig(emulate=emulated())  # tensorwise scaling: the default recipe
    swapped = []

    def in_blocks(module: nn.Module, fqn: str) -> bool:
        ok = (fqn.startswith("blocks.") and isinstance(module, nn.Linear)
              and module.in_features % 16 == 0 and module.out_features % 16 == 0)
        if ok:
            swapped.append(fqn)
        return ok

    torchao.convert_to_float8_training(model, module_filter_fn=in_blocks, config=config)
    return len(swapped)


def _torchao():
    """torchao.float8, or a one-line ConfigError naming the extra to install."""
    # Importing torchao warns about each CUDA kernel library it cannot load (mxfp8, cutlass: unused by
    # tensorwise float8 training) and torch about an enum torchao registers the old way: noise only.
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        import torchao.float8 as float8  # optional: pip install 'dist_gpt[fp8]'
    except ImportError:
        raise ConfigError("train.fp8=true needs torchao: pip install 'dist_gpt[fp8]'") from None
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    return float8

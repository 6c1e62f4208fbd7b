"""Memory you can plan with: each rank's bytes under each layout, before anything is allocated.

    python -m dist_gpt.train --preset modern-1b --dry-run                 # this launch's world size
    python -m dist_gpt.train --preset modern-1b --dry-run --dry-run-world=8 --dry-run-memory=80

`estimate(cfg, layout, world, ...)` gives one rank's bytes of
    params      the parameters this rank holds (fp32; its shard under fsdp/hsdp)
    grads       their gradients (sharded like the parameters; whole under fsdp while a step
                accumulates over several micro-batches, since they are reduced only on the last one)
    optimizer   optimizer state: AdamW 2 fp32 numbers per parameter + a step counter per tensor,
                Muon 1 (its momentum) for the block matrices; sharded like the parameters
    gathered    fsdp/hsdp: parameters gathered whole for the blocks being computed (the root's and
                two blocks' at a time; every block's with parallel.reshard_after_forward=false)
    activations what one micro-batch's forward keeps for the backward

Parameters are counted from the model built on the meta device, exactly. Activations are measured,
not guessed: a probe runs the real forward on the CPU at the run's widths but one and two blocks,
a few tokens and two tiny vocabularies, counts the bytes autograd saves (saved-tensor hooks, each
storage once) and extrapolates linearly in layers, tokens and vocabulary. The vocabulary's share is
measured too: a training forward keeps one fp32 (tokens, V) tensor, the log-softmax of the logits
(the fp32 logits themselves are not kept; a soft-cap keeps its tanh as well), plus under bf16 a bf16
copy of the (V, C) head weight. A run planned for a GPU in bf16 is probed under CUDA's autocast
policy emulated on the CPU (`CudaAutocast`: matmuls and attention in bf16, pow/softmax/norms/losses
in fp32), with the attention kernel's inputs kept in bf16 as on a GPU, not in fp32 as the CPU path
does; what a GPU's own kernels save beyond their inputs and outputs is not emulated.
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .metrics import format_params, format_value
from .model.gpt import GPT, GPTConfig
from .parallel.precision import resolve_precision

GIB = 2**30
_PROBE_VOCAB = 64
_PROBE_VOCAB_WIDE = 128  # the second vocabulary: the difference is the vocabulary's share


@dataclass(frozen=True)
class Estimate:
    params: int
    grads: int
    optimizer: int
    gathered: int
    activations: int

    @property
    def states(self) -> int:
        """Parameters, gradients and optimizer state: what sharding divides."""
        return self.params + self.grads + self.optimizer

    @property
    def total(self) -> int:
        return self.states + self.gathered + self.activations


def _shard_numel(shape: torch.Size, shard: int) -> int:
    """Elements of the largest shard (rank 0's) when dim 0 is split like torch.chunk."""
    if shard <= 1 or not shape:
        return math.prod(shape)
    return math.ceil(shape[0] / shard) * math.prod(shape[1:])


def shard_size(cfg, layout: str, world: int, local_world: int) -> int:
    """Ranks a parameter is split over: 1 (ddp), the world (fsdp), the shard groups' size (hsdp)."""
    parallel = dataclasses.replace(cfg.parallel, data=layout)
    shape = parallel.mesh_shape(world, local_world)
    return shape[-1] if shape else 1


def estimate(cfg, layout: str, world: int, local_world: int, checkpointing: bool,
             activations: "ActivationProbe") -> Estimate:
    """One rank's bytes for `cfg` under `layout` on `world` ranks (`local_world` per node)."""
    shard = shard_size(cfg, layout, world, local_world) if world > 1 else 1
    with torch.device("meta"):
        model = GPT(cfg.model)
    named = list(model.named_parameters())
    matrices = {n for n, p in named if cfg.optim.name == "muon" and n.startswith("blocks.") and p.ndim == 2}
    params = sum(_shard_numel(p.shape, shard) for _, p in named) * 4
    optimizer = sum(_shard_numel(p.shape, shard) * (4 if n in matrices else 8) + 4 for n, p in named)
    accum = cfg.train.grad_accum(world)
    grads = sum(p.numel() for _, p in named) * 4 if shard > 1 and accum > 1 else params
    gathered = 0
    if shard > 1:
        wide = 2 if activations.gpu and activations.precision == "bf16" else 4  # gathered in bf16 on a GPU
        block = sum(p.numel() for n, p in named if n.startswith("blocks.0."))
        root = sum(p.numel() for n, p in named if not n.startswith("blocks."))
        per = root + (block * cfg.model.n_layer if not cfg.parallel.reshard_after_forward else 2 * block)
        gathered = per * wide
    acts = activations.bytes(cfg.train.micro_batch, cfg.model.block_size, cfg.model.vocab_size, checkpointing)
    return Estimate(params, grads, optimizer, gathered, acts)


class ActivationProbe:
    """Bytes autograd saves in one forward of `model_cfg` in `precision` (fp32 | bf16 autocast),
    measured on small probes and extrapolated (see the module docstring). `gpu`: probe under CUDA's
    autocast policy (bf16 only; fp32 is the same everywhere)."""

    def __init__(self, model_cfg: GPTConfig, precision: str, gpu: bool = False):
        self.cfg, self.precision, self.gpu = model_cfg, precision, gpu
        tokens = (8, 16)
        one = [self._measure(1, _PROBE_VOCAB, t) for t in tokens]
        two = [self._measure(2, _PROBE_VOCAB, t) for t in tokens]
        wide = [self._measure(1, _PROBE_VOCAB_WIDE, t) for t in tokens]
        # bytes = layers * (per_token * n + per_layer) + rest_per_token * n + rest
        #         + (V - probe V) * (vocab_per_token * n + vocab_const)
        layer = [b - a for a, b in zip(one, two)]
        self.per_token = (layer[1] - layer[0]) / (tokens[1] - tokens[0])
        self.per_layer = layer[0] - self.per_token * tokens[0]
        rest = [a - s for a, s in zip(one, layer)]
        self.rest_per_token = (rest[1] - rest[0]) / (tokens[1] - tokens[0])
        self.rest = rest[0] - self.rest_per_token * tokens[0]
        vocab = [(w - a) / (_PROBE_VOCAB_WIDE - _PROBE_VOCAB) for a, w in zip(one, wide)]  # bytes per vocabulary entry
        self.vocab_per_token = (vocab[1] - vocab[0]) / (tokens[1] - tokens[0])  # 4: the fp32 log-softmax
        self.vocab_const = vocab[0] - self.vocab_per_token * tokens[0]         # bf16: the head weight's copy

    def _measure(self, layers: int, vocab: int, tokens: int) -> int:
        probe = dataclasses.replace(self.cfg, n_layer=layers, vocab_size=vocab, dropout=0.0,
                                    activation_checkpointing=False)
        return saved_bytes(probe, self.precision, 1, tokens, gpu=self.gpu)

    def bytes(self, micro_batch: int, block_size: int, vocab_size: int, checkpointing: bool) -> int:
        n = micro_batch * block_size
        vocab = (vocab_size - _PROBE_VOCAB) * (self.vocab_per_token * n + self.vocab_const)
        rest = self.rest_per_token * n + self.rest + vocab
        if not checkpointing:
            return int(self.cfg.n_layer * (self.per_token * n + self.per_layer) + rest)
        # each block keeps its input (fp32) for the recomputation; one block's worth is live at a time
        return int(self.cfg.n_layer * 4 * self.cfg.n_embd * n + self.per_token * n + self.per_layer + rest)


class CudaAutocast(TorchFunctionMode):
    """bf16 autocast as CUDA applies it, emulated on the CPU for the operations the model calls: the
    inputs of matmuls and attention cast to bf16, those of CUDA's fp32 list (pow, so square too,
    softmax, norms, losses) to fp32, everything else left in its dtype. A cast of a parameter is a new
    tensor, as autocast's cached copy is. Used without torch.autocast."""

    LOW = {F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.bmm,
           torch.addmm, torch.baddbmm, F.scaled_dot_product_attention}
    FP32 = {torch.pow, torch.Tensor.pow, torch.Tensor.__pow__, torch.square, torch.Tensor.square, torch.exp,
            torch.Tensor.exp, torch.rsqrt, torch.Tensor.rsqrt, F.softmax, F.log_softmax, torch.Tensor.softmax,
            torch.Tensor.log_softmax, F.layer_norm, F.rms_norm, F.cross_entropy, F.softplus, torch.logsumexp}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dtype = torch.bfloat16 if func in self.LOW else torch.float32 if func in self.FP32 else None
        if dtype is not None:
            cast = lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
            args, kwargs = [cast(a) for a in args], {k: cast(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


def saved_bytes(model_cfg: GPTConfig, precision: str, batch: int, tokens: int, gpu: bool = False) -> int:
    """Bytes of the tensors autograd saves in one training forward of a real model on the CPU (each
    storage once, parameters excluded): the measurement the estimate extrapolates from. `gpu` with
    bf16: under `CudaAutocast` instead of the CPU's autocast."""
    torch.manual_seed(0)
    model = GPT(model_cfg)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    idx = torch.randint(0, model_cfg.vocab_size, (batch, tokens))
    bf16 = precision == "bf16"
    autocast = (CudaAutocast() if gpu else torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        model(idx, idx)
    return sum(saved.values())


def dry_run_report(cfg, world: int, local_world: int, device_gib: float | None) -> str:
    """What `--dry-run` prints: the run's size and each layout's memory per rank, with and without
    activation checkpointing, and whether it fits `device_gib`. For the device the run would use
    (`--train.device=cuda` plans a GPU run from a machine without one)."""
    with torch.device("meta"):
        model = GPT(cfg.model)
    device = cfg.train.device if cfg.train.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if device == "cuda" else resolve_precision("auto", "cpu")
    probe = ActivationProbe(cfg.model, "fp32" if precision == "fp32" else "bf16", gpu=device == "cuda")
    tokens = cfg.train.global_batch * cfg.model.block_size
    lines = [f"dry run: preset {cfg.preset}, recipe {cfg.train.recipe}, {world} ranks ({local_world} per node), "
             f"{device}, {precision}",
             f"  {format_params(model)}, "
             f"{format_value(model.flops_per_token())} FLOP per token (training), {tokens:,} tokens per step "
             f"({cfg.train.micro_batch} micro x {cfg.train.grad_accum(world)} accum x {world} ranks x "
             f"{cfg.model.block_size})",
             ""]
    rows = [(f"{layout}{' +act.ckpt' if ckpt else ''}", estimate(cfg, layout, world, local_world, ckpt, probe))
            for layout in ("ddp", "fsdp", "hsdp") if world > 1 or layout == "ddp" for ckpt in (False, True)]
    unit, scale = ("GiB", GIB) if max(e.total for _, e in rows) >= GIB else ("MiB", 2**20)
    lines[-1] = (f"  per rank ({unit})          params    grads    optim  gathered  activations     total"
                 + (f"  fits {device_gib:g} GiB" if device_gib else ""))
    for name, e in rows:
        fits = ("  yes" if e.total <= device_gib * GIB else "  no") if device_gib else ""
        lines.append(f"  {name:<22} {e.params / scale:8.2f} {e.grads / scale:8.2f} {e.optimizer / scale:8.2f} "
                     f"{e.gathered / scale:9.2f} {e.activations / scale:12.2f} {e.total / scale:9.2f}{fits}")
    policy = " under CUDA's autocast policy (emulated)" if probe.gpu and probe.precision == "bf16" else ""
    lines.append(f"  (activations measured with the CPU's kernels{policy}; leave headroom for the allocator and the "
                 "communication buffers)")
    return "\n".join(lines)

"""Muon: torch.optim.Muon's update, each matrix orthogonalised whole by the process that owns it,
same-shape matrices orthogonalised together.

    opt = Muon(params, lr=0.02, momentum=0.95, weight_decay=0.0, ns_steps=5,
               ns_dtype=torch.float32,      # torch's Newton-Schulz runs in bf16 (the default here too)
               process_group=group)         # DDP: the group plain parameters are replicated across

The update of each 2-D parameter W (rows, cols) with gradient G is torch.optim.Muon's (torch 2.9-2.13,
torch/optim/_muon.py), operation for operation:

    B <- B.lerp(G, 1 - momentum)                     state["momentum_buffer"], same key as torch's
    U <- G.lerp(B, momentum)  (Nesterov) or  B
    O <- NS(U)                                       quintic Newton-Schulz (newton_schulz below), in ns_dtype
    W <- W * (1 - lr * weight_decay) - lr * sqrt(max(1, rows / cols)) * O

so a checkpoint written with torch.optim.Muon (same param groups, same state) resumes here, and in
one process the result is torch's bit for bit (in bf16; in fp32 it is the fp32 iteration dist_gpt
used before, which torch does not offer).

Where the work happens (dist_gpt.muon_layout): the momentum is elementwise, so every rank updates the
part of B it holds; NS needs the whole matrix. An FSDP2 parameter (a DTensor sharded on dim 0, on a
1-D mesh, or on the shard dim of an HSDP (replicate, shard) mesh) has its U gathered to the rank that
owns the matrix, orthogonalised there and sent back as shards. A replicated parameter (DDP: plain
tensors and `process_group`; HSDP's replicas) has its NS done by one rank of the group and the result
all-gathered, so each rank orthogonalises 1/world of the matrices and every rank applies identical
updates. Without a group it is plain single-process Muon. Owners are assigned by cost (greedy, largest
first), the same on every rank.

Every rank must step the same parameters (those with a gradient), as DDP and FSDP guarantee.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from dist_gpt.optim.muon_layout import layout_key, layout_of, local, orthogonalise_across

# torch.optim.Muon's defaults (from Keller Jordan's Muon), so param groups and checkpoints match it.
DEFAULT_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
DEFAULT_EPS = 1e-7
DEFAULT_NS_STEPS = 5
ADJUST_LR_FNS = (None, "original", "match_rms_adamw")
# Matrices narrower than this (the smaller side) are orthogonalised one by one: for some tiny sizes
# (under 8, 9, 11) torch 2.13's CPU bmm uses other kernels than mm and rounds differently; from 12
# on it gave every matrix mm's bits (checked for every size 12-69, random shapes up to 80 x 240, and
# the model widths), and batching gains nothing on matrices this small anyway.
BATCH_MIN_SIDE = 16


def newton_schulz(u: Tensor, coefficients: Sequence[float], steps: int, eps: float, dtype: torch.dtype) -> Tensor:
    """torch.optim.Muon's orthogonalisation of u, (rows, cols) or a stack (n, rows, cols) of same-shape
    matrices, computed and returned in `dtype`.

    The operations of torch's `_zeropower_via_newtonschulz` in its order: X = u / ||u||_F (transposed
    to (cols, rows) when rows > cols, so the Gram matrix is the smaller one), then `steps` times
    A = X X^T (m, m); X <- a X + (b A + c A A) X. A stack runs each product as one bmm/baddbmm (on CPU,
    for matrices of at least BATCH_MIN_SIDE rows and columns, each comes out with the bits it gets
    alone); with dtype bf16 a single matrix gives torch's result bit for bit.
    """
    a, b, c = coefficients
    x = u.to(dtype)
    tall = u.size(-2) > u.size(-1)
    if tall:
        x = x.mT
    if x.ndim == 2:
        x = x / x.norm().clamp(min=eps)  # spectral norm <= Frobenius norm = 1
        for _ in range(steps):
            gram = x @ x.T
            x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    else:
        x = x / torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp(min=eps)
        for _ in range(steps):
            gram = x @ x.mT  # (n, m, m)
            x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: Sequence[int]) -> float:
    """torch.optim.Muon's learning-rate scaling by the whole matrix's shape (rows, cols)."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1, rows / cols))
    return lr * (0.2 * math.sqrt(max(rows, cols)))  # match_rms_adamw, rounded as torch does


class Muon(torch.optim.Optimizer):
    """torch.optim.Muon's update and state (see the module docstring), orthogonalising whole matrices
    under FSDP2/HSDP, dividing the Newton-Schulz work among ranks, batching same-shape matrices.

    The first arguments and the param-group keys are torch.optim.Muon's. Then:
      ns_dtype       dtype of the Newton-Schulz iteration (torch's: bfloat16; float32 for fp32 runs)
      process_group  the group across which plain (non-DTensor) parameters are replicated, e.g. DDP's;
                     None: every process does all of its own work. DTensor parameters bring their mesh.
      batched        orthogonalise same-shape matrices with one batched iteration (False: one by one)
    """

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_coefficients: tuple[float, float, float] = DEFAULT_COEFFICIENTS,
                 eps: float = DEFAULT_EPS, ns_steps: int = DEFAULT_NS_STEPS, adjust_lr_fn: str | None = None,
                 *, ns_dtype: torch.dtype = torch.bfloat16, process_group=None, batched: bool = True):
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Learning rate should be >= 0 but is: {lr}")
        if not 0.0 <= momentum:
            raise ValueError(f"momentum should be >= 0 but is: {momentum}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"weight decay should be >= 0 but is: {weight_decay}")
        if adjust_lr_fn not in ADJUST_LR_FNS:
            raise ValueError(f"Adjust learning rate function {adjust_lr_fn} is not supported")
        if not 1 <= ns_steps < 100:
            raise ValueError(f"ns_steps should be in [1, 100) but is: {ns_steps}")
        if len(ns_coefficients) != 3:
            raise ValueError("Coefficients must be a tuple of exactly 3 values")
        defaults = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "nesterov": nesterov,
                    "ns_coefficients": ns_coefficients, "eps": eps, "ns_steps": ns_steps,
                    "adjust_lr_fn": adjust_lr_fn}
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon only supports 2D parameters whereas we found a parameter with size: {p.size()}")
        self.ns_dtype = ns_dtype
        self.process_group = process_group
        self.batched = batched

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params, groups, updates = [], [], []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if torch.is_complex(p):
                    raise RuntimeError("Muon does not support complex parameters")
                if p.grad.is_sparse:
                    raise RuntimeError("Muon does not support sparse gradients")
                state = self.state[p]
                if "momentum_buffer" not in state:  # a DTensor like the gradient under FSDP
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                grad, buf = local(p.grad), local(state["momentum_buffer"])
                buf.lerp_(grad, 1 - group["momentum"])
                update = grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                # NS starts by casting to ns_dtype: cast first, so bf16 runs move half the bytes.
                params.append(p)
                groups.append(group)
                updates.append(update.to(self.ns_dtype))
        for p, group, ortho in zip(params, groups, self._orthogonalise(params, groups, updates)):
            lr = group["lr"].item() if isinstance(group["lr"], Tensor) else group["lr"]
            weights = local(p)
            weights.mul_(1 - lr * group["weight_decay"])
            weights.add_(ortho, alpha=-adjusted_lr(lr, group["adjust_lr_fn"], p.shape))  # p.shape: the whole matrix
        return loss

    def _orthogonalise(self, params: list[Tensor], groups: list[dict], updates: list[Tensor]) -> list[Tensor]:
        """NS of every whole matrix, as the local part each rank holds; one exchange per layout (in
        the order the layouts first appear, the same on every rank)."""
        by_layout: dict = {}
        for i, p in enumerate(params):
            by_layout.setdefault(layout_key(p), []).append(i)
        out: list = [None] * len(params)
        for idx in by_layout.values():
            layout = layout_of(params[idx[0]], self.process_group)

            def ns(which: list[int], matrices: list[Tensor], idx=idx) -> list[Tensor]:
                return self._newton_schulz([groups[idx[k]] for k in which], matrices)

            results = orthogonalise_across(layout, [updates[i] for i in idx], [params[i].shape for i in idx], ns)
            for i, r in zip(idx, results):
                out[i] = r
        return out

    def _newton_schulz(self, groups: list[dict], matrices: list[Tensor]) -> list[Tensor]:
        """NS of whole matrices; with `batched`, one iteration per (shape, NS settings)."""
        out: list = [None] * len(matrices)
        batches: dict = {}
        for k, (group, m) in enumerate(zip(groups, matrices)):
            settings = (tuple(group["ns_coefficients"]), group["ns_steps"], group["eps"])
            key = (tuple(m.shape), settings) if self.batched and min(m.shape) >= BATCH_MIN_SIDE else k
            batches.setdefault(key, (settings, []))[1].append(k)
        for (coefficients, steps, eps), ks in batches.values():
            if len(ks) == 1:
                out[ks[0]] = newton_schulz(matrices[ks[0]], coefficients, steps, eps, self.ns_dtype)
                continue
            stacked = newton_schulz(torch.stack([matrices[k] for k in ks]), coefficients, steps, eps, self.ns_dtype)
            for k, result in zip(ks, stacked.unbind(0)):
                out[k] = result
        return out


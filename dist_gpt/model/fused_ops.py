"""The modern recipe's elementwise pieces with hand-written backwards: RMSNorm, rotary positions, ReLU².

Each computes the function the composite torch code computes (F.rms_norm in fp32, to rounding; the half-split
rotation of x1*cos - x2*sin, x2*cos + x1*sin in fp32; relu(x)**2) with fewer kernels and
temporaries. On CPU, torch 2.13's rms_norm is composite (pow, mean, add, rsqrt, mul, mul) with no
fused backward, and autograd differentiates every piece; at the `cpu` preset's shape these small
kernels, not the matmuls, made most of the modern step's extra cost over the classic one
(docs/PERFORMANCE.md, "The modern step, steady").

    y = rms_norm(x, weight, eps)      # x (..., D) any float dtype; weight broadcasts against x's last dims
    y = rotary(x, cos, sin)           # x (B, T, heads, D); cos, sin (T, 1, D) fp32 from rotary_tables
    y = norm_rotary(qk, weight, eps, (cos, sin), out_dtype)   # both in one pass (queries and keys)
    y = relu_squared(h)
"""

from __future__ import annotations

import torch


def _rms_forward(xf: torch.Tensor, weight: torch.Tensor, eps: float):
    """(xhat, rstd): xf (..., D) fp32 over sqrt(mean(xf², -1) + eps), and that reciprocal (..., 1).
    mean(xf²) as ||xf||² / D: one pass over xf instead of two (square, then mean)."""
    rstd = torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square_().div_(xf.size(-1)).add_(eps).rsqrt_()
    return xf * rstd, rstd


def _rms_backward(dyf: torch.Tensor, xhat: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor, weight_grad: bool):
    """(dx, dweight) of y = xhat * weight, in fp32: d/dx of x * rstd(x) is
    rstd * (g - xhat * mean(g * xhat)) with g = dy * weight, the mean over the normalised dim.
    The weight may be bf16 (FSDP's bf16 parameters on CUDA): it is taken in fp32 here (a no-op for fp32)."""
    weight = weight.float()
    t = dyf * xhat
    with torch.autocast(xhat.device.type, enabled=False):  # a matrix-vector product: keep it fp32
        gx = t @ weight if weight.ndim == 1 else (t * weight).sum(-1)  # sum(g * xhat, -1): (...)
    dx = torch.addcmul(dyf * weight, xhat, gx.unsqueeze(-1).div_(xhat.size(-1)), value=-1).mul_(rstd)
    dw = None
    if weight_grad:  # summed over the dims weight broadcasts along
        lead = xhat.ndim - weight.ndim
        dw = t.flatten(0, lead - 1).sum(0) if lead else t
    return dx, dw


class _RMSNorm(torch.autograd.Function):
    """x / sqrt(mean(x², -1) + eps) * weight, computed in fp32, returned in x's dtype.

    weight has x's last weight.ndim dims (a (D,) norm, or per-head weights (heads, D) for queries and
    keys normalised in one call); its gradient is summed over the leading dims."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xhat, rstd = _rms_forward(x.float(), weight, eps)
        ctx.save_for_backward(xhat, rstd, weight)
        ctx.in_dtype = x.dtype
        return (xhat * weight).to(x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        xhat, rstd, weight = ctx.saved_tensors
        dx, dw = _rms_backward(dy.float(), xhat, rstd, weight, ctx.needs_input_grad[1])
        return dx.to(ctx.in_dtype), None if dw is None else dw.to(weight.dtype), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _RMSNorm.apply(x, weight, eps)


def rotary_tables(pos: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each (T, 1, D) fp32, for x (B, T, heads, D): [cos | cos] and [-sin | sin] of the
    angles pos * base^(-2i/D), i < D/2, so that the rotation is x * cos + swap_halves(x) * sin.

    Computed per forward (T*D flops), not kept in buffers: they stay fp32 when the model is cast
    to bf16, and a model built on the meta device needs nothing re-initialised."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim)
    angles = pos.float()[:, None] * inv_freq[None, :]  # (T, D/2)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((cos, cos), -1)[:, None], torch.cat((-sin, sin), -1)[:, None]


def _swap_halves(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (x2, x1) along the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x2, x1), dim=-1)


class _Rotary(torch.autograd.Function):
    """x * cos + swap_halves(x) * sin in fp32, returned in x's dtype: channel pairs (i, i + D/2)
    rotated by their angle (the GPT-NeoX / LLaMA half-split layout). The rotation is orthogonal, so
    the gradient is the rotation by the opposite angle: g * cos + swap_halves(g * sin)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        ctx.save_for_backward(cos, sin)
        ctx.in_dtype = x.dtype
        return (xf * cos).add_(_swap_halves(xf).mul_(sin)).to(x.dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        cos, sin = ctx.saved_tensors
        gf = g.float()
        return (gf * cos).add_(_swap_halves(gf * sin)).to(ctx.in_dtype), None, None


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return _Rotary.apply(x, cos, sin)


class _NormRotary(torch.autograd.Function):
    """rotary(rms_norm(x, weight, eps), cos, sin) in one pass: x is cast to fp32 once and the result
    once, to out_dtype (fp32 where attention computes in fp32 anyway, the CPU's: no round trip
    through bf16 in between)."""

    @staticmethod
    def forward(ctx, x, weight, eps, rope, out_dtype):
        cos, sin = rope  # (T, 1, D) fp32 each, from rotary_tables: no gradient
        xhat, rstd = _rms_forward(x.float(), weight, eps)
        y = xhat * weight
        ctx.save_for_backward(xhat, rstd, weight, cos, sin)
        ctx.in_dtype = x.dtype
        return (y * cos).add_(_swap_halves(y).mul_(sin)).to(out_dtype)

    @staticmethod
    def backward(ctx, g):
        xhat, rstd, weight, cos, sin = ctx.saved_tensors
        gf = g.float()
        dy = (gf * cos).add_(_swap_halves(gf * sin))
        dx, dw = _rms_backward(dy, xhat, rstd, weight, ctx.needs_input_grad[1])
        return dx.to(ctx.in_dtype), None if dw is None else dw.to(weight.dtype), None, None, None


def norm_rotary(x: torch.Tensor, weight: torch.Tensor, eps: float, rope: tuple[torch.Tensor, torch.Tensor],
                out_dtype: torch.dtype) -> torch.Tensor:
    return _NormRotary.apply(x, weight, eps, tuple(rope), out_dtype)


class _ReluSquared(torch.autograd.Function):
    """relu(h)²; its gradient 2 * relu(h) * g is already zero where h <= 0 (one saved tensor, two
    kernels each way, instead of relu's and pow's backwards)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor) -> torch.Tensor:
        r = torch.relu(h)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (r,) = ctx.saved_tensors
        return (g * r).mul_(2)


def relu_squared(h: torch.Tensor) -> torch.Tensor:
    return _ReluSquared.apply(h)

"""The reference: a plain eager fp32 PyTorch GPT of the classic recipe, with its own simple loop.

    from bench.reference_gpt import ReferenceGPT, ReferenceTrainer
    model = ReferenceGPT(vocab_size=147, block_size=64, n_layer=4, n_head=4, n_embd=128)
    trainer = ReferenceTrainer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.99), warmup_steps=100,
                               total_steps=2000, min_lr_ratio=0.1, grad_clip=1.0)
    loss = trainer.step(micro)      # micro: [(x, y), ...] each (m, T) int64; returns a 0-d tensor
    # or, for a profile split: trainer.forward_backward(micro); trainer.optimizer_step()

What `bench/train_bench.py` measures dist_gpt against, so "faster than plain PyTorch" is a ratio,
not a claim. It is the GPT-2 recipe as nanoGPT writes it: learned positions, pre-norm LayerNorm
without bias, GELU MLP of width 4C, no biases, tied embeddings, scaled_dot_product_attention with
a causal mask, N(0, 0.02) init with the residual projections at 0.02 / sqrt(2 * n_layer); AdamW
with weight decay on the 2-D weights only (fused on CUDA, torch's default loop elsewhere), linear
warmup then a cosine to `min_lr_ratio`, global-norm clipping. No autocast, no torch.compile, no
tricks: what a careful person writes in an afternoon.

It shares no code with dist_gpt on purpose. `load_dist_gpt_weights` copies the initial weights of
a `dist_gpt.model.GPT` of the same shape, so a comparison of final losses starts from the same
point and sees only the numerics (precision, kernels), not the luck of the initialisation.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F


class SelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=False)  # q, k, v side by side
        self.c_proj = nn.Linear(n_embd, n_embd, bias=False)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # (B, T, C) each
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_drop(self.c_proj(y))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=False)
        self.attn = SelfAttention(n_embd, n_head, dropout)
        self.ln_2 = nn.LayerNorm(n_embd, bias=False)
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=False)
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=False)
        self.mlp_drop = nn.Dropout(dropout)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp_drop(self.c_proj(F.gelu(self.c_fc(self.ln_2(x)))))


class ReferenceGPT(nn.Module):
    def __init__(self, vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int,
                 dropout: float = 0.0):
        super().__init__()
        self.block_size = block_size
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.h = nn.ModuleList(Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=False)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx, targets):
        """idx, targets (B, T) int64 -> mean cross-entropy (0-d, fp32)."""
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    @torch.no_grad()
    def load_dist_gpt_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Copy a classic-recipe `dist_gpt.model.GPT` state dict of the same shape into this model."""
        names = {"tok_emb.weight": "wte.weight", "pos_emb.weight": "wpe.weight", "norm_f.weight": "ln_f.weight"}
        for i in range(len(self.h)):
            for theirs, ours in (("norm1", "ln_1"), ("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                                 ("norm2", "ln_2"), ("mlp.fc", "c_fc"), ("mlp.proj", "c_proj")):
                names[f"blocks.{i}.{theirs}.weight"] = f"h.{i}.{ours}.weight"
        mine = dict(self.named_parameters())  # `names` covers every one of them
        absent = sorted(set(names) - set(state))
        wrong = [k for k in names if k in state and state[k].shape != mine[names[k]].shape]
        if absent or wrong:
            raise ValueError(f"not a classic dist_gpt state dict of this shape: missing {absent[:3]}, "
                             f"other shapes {wrong[:3]}")
        for theirs, ours in names.items():
            mine[ours].copy_(state[theirs])


class ReferenceTrainer:
    """The loop body of the reference: forward/backward over micro-batches, clip, AdamW, zero."""

    def __init__(self, model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                 warmup_steps: int, total_steps: int, min_lr_ratio: float, grad_clip: float,
                 ddp: nn.Module | None = None):
        self.model, self.ddp = model, ddp
        self.lr, self.warmup_steps, self.total_steps = lr, warmup_steps, total_steps
        self.min_lr_ratio, self.grad_clip = min_lr_ratio, grad_clip
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        cuda = params[0].device.type == "cuda"
        self.optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True if cuda else None)
        self.step_count = 0

    def lr_at(self, step: int) -> float:
        """Linear warmup over `warmup_steps`, then half a cosine down to lr * min_lr_ratio at the last step."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - 1 - self.warmup_steps))
        low = self.min_lr_ratio
        return self.lr * (low + (1 - low) * 0.5 * (1 + math.cos(math.pi * progress)))

    def step(self, micro) -> torch.Tensor:
        """One optimizer step over this rank's micro-batches; returns the mean loss (0-d, no sync)."""
        loss = self.forward_backward(micro)
        self.optimizer_step()
        return loss

    def forward_backward(self, micro) -> torch.Tensor:
        net = self.ddp if self.ddp is not None else self.model
        total = 0.0
        for i, (x, y) in enumerate(micro):  # x, y: (m, T) int64
            # gradients are all-reduced on the last micro-batch only
            sync = nullcontext() if self.ddp is None or i == len(micro) - 1 else self.ddp.no_sync()
            with sync:
                loss = net(x, y) / len(micro)
                loss.backward()
            total = total + loss.detach()
        return total

    def optimizer_step(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step_count)
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1

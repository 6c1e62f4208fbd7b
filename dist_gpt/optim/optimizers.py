"""Optimizers, learning-rate schedules and gradient clipping (config section `optim`).

Two optimizer recipes, chosen with `--optim.name`:

* `adamw` (the classic GPT-2 recipe): one AdamW. Every matrix (embeddings, head, block weights) is
  decayed with `optim.weight_decay`; norms and biases (tensors with fewer than 2 dims) are not.
* `muon`: Muon (`dist_gpt.optim.muon`: torch.optim.Muon's update and state, correct under FSDP2 and with
  its Newton-Schulz work divided among ranks) for the 2-D weight matrices inside the blocks (names
  `blocks.*`, ndim == 2: fused QKV, attention output, MLP in/out), at `optim.muon_lr`; one AdamW
  for everything else (embeddings, head, norms, biases) at `optim.lr`/`embed_lr`/`head_lr`. Muon
  orthogonalises a whole matrix update, which is meaningless for embeddings (rows are looked up
  independently) and for vectors, hence the split.

Param groups are named so logs and tests can tell them apart:

| group      | holds                                       | lr                    | weight decay              |
|------------|---------------------------------------------|-----------------------|---------------------------|
| `embed`    | `tok_emb.*`, `pos_emb.*` (and a tied head)  | `embed_lr` or `lr`    | `weight_decay`            |
| `head`     | `head.*` when not tied to `tok_emb`         | `head_lr` or `lr`     | `weight_decay`            |
| `decay`    | other matrices (the block weights in adamw) | `lr`                  | `weight_decay`            |
| `no_decay` | norms and biases (ndim < 2)                 | `lr`                  | 0                         |
| `muon`     | 2-D block matrices (muon only)              | `muon_lr`             | `muon_weight_decay`       |

Every group carries `base_lr`; `LRSchedule.apply` sets `lr = base_lr * multiplier(step)` for all
groups of all optimizers, so one schedule shape drives both optimizers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from dist_gpt.errors import ConfigError
from dist_gpt.optim.muon import Muon

OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "constant", "wsd")
# Wrapper prefixes that DDP (`module.`) and torch.compile (`_orig_mod.`) add to parameter names.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class OptimConfig:
    """Section `optim`: the optimizer, its learning rates and the LR schedule."""

    name: str = field(default="adamw", metadata={"help": "optimizer: adamw | muon (Muon for the 2-D block matrices, AdamW for the rest)"})
    lr: float = field(default=6e-4, metadata={"help": "peak AdamW learning rate (block matrices under adamw; norms, biases and by default embeddings and head)"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final learning rate as a fraction of the peak (cosine and wsd end here)"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW decoupled weight decay for matrices; norms and biases are never decayed"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    beta2: float = field(default=0.95, metadata={"help": "AdamW beta2"})
    eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the global gradient norm to this value (0 = off; the norm is still logged)"})
    schedule: str = field(default="cosine", metadata={"help": "LR schedule after warmup: cosine (to min_lr_ratio) | constant | wsd (constant, then linear cooldown)"})
    warmup_steps: int = field(default=100, metadata={"help": "linear warmup from lr/warmup_steps to the peak over this many steps (0 = none)"})
    cooldown_fraction: float = field(default=0.2, metadata={"help": "wsd only: the final fraction of the run that decays linearly to min_lr_ratio"})
    muon_lr: float = field(default=0.02, metadata={"help": "Muon learning rate for the 2-D block matrices (scaled by sqrt(max(1, rows/cols)) per matrix, as torch.optim.Muon does)"})
    muon_momentum: float = field(default=0.95, metadata={"help": "Muon (Nesterov) momentum"})
    muon_ns_steps: int = field(default=5, metadata={"help": "Muon's Newton-Schulz iterations per update (torch's default 5; each costs ~3 matmuls per block matrix)"})
    muon_weight_decay: float = field(default=0.0, metadata={"help": "Muon decoupled weight decay"})
    embed_lr: float | None = field(default=None, metadata={"help": "AdamW learning rate of the token/position embeddings (and of a tied head); unset = optim.lr"})
    head_lr: float | None = field(default=None, metadata={"help": "AdamW learning rate of an untied output head; unset = optim.lr"})
    fused: bool | None = field(default=None, metadata={"help": "fused AdamW kernel; unset = fused on CUDA, the plain loop elsewhere"})

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ConfigError(f"optim.name={self.name!r} is not one of {' | '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"optim.schedule={self.schedule!r} is not one of {' | '.join(SCHEDULES)}")
        positive = {"lr": self.lr, "eps": self.eps, "muon_lr": self.muon_lr,
                    "embed_lr": self.embed_lr, "head_lr": self.head_lr}
        for key, value in positive.items():
            if value is not None and not value > 0:
                raise ConfigError(f"optim.{key}={value} must be > 0")
        non_negative = {"weight_decay": self.weight_decay, "grad_clip": self.grad_clip,
                        "warmup_steps": self.warmup_steps, "muon_weight_decay": self.muon_weight_decay}
        for key, value in non_negative.items():
            if value < 0:
                raise ConfigError(f"optim.{key}={value} must be >= 0")
        if not 1 <= self.muon_ns_steps < 100:
            raise ConfigError(f"optim.muon_ns_steps={self.muon_ns_steps} must be between 1 and 99")
        unit = {"beta1": self.beta1, "beta2": self.beta2, "muon_momentum": self.muon_momentum}
        for key, value in unit.items():
            if not 0 <= value < 1:
                raise ConfigError(f"optim.{key}={value} must be in [0, 1)")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if not 0 < self.cooldown_fraction <= 1:
            raise ConfigError(f"optim.cooldown_fraction={self.cooldown_fraction} must be in (0, 1]")


def _plain_name(name: str) -> str:
    """`module._orig_mod.blocks.0.mlp.fc.weight` -> `blocks.0.mlp.fc.weight`."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix):], True
    return name


def param_group_name(name: str, param: torch.Tensor, use_muon: bool) -> str:
    """The group a parameter belongs to (see the table in the module docstring)."""
    name = _plain_name(name)
    if param.ndim < 2:
        return "no_decay"
    if use_muon and name.startswith("blocks.") and param.ndim == 2:
        return "muon"
    if name.startswith(("tok_emb.", "pos_emb.")):
        return "embed"
    if name.startswith("head."):
        return "head"
    return "decay"


def split_params(model: torch.nn.Module, use_muon: bool) -> dict[str, list[torch.nn.Parameter]]:
    """Trainable params by group name, each exactly once: `named_parameters` yields a tied
    parameter (head.weight is tok_emb.weight) only under its first name, so it lands in `embed`."""
    groups: dict[str, list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault(param_group_name(name, param, use_muon), []).append(param)
    return groups


def _adamw_fused(cfg: OptimConfig, device: torch.device) -> bool | None:
    if cfg.fused is not None:
        return cfg.fused
    # The fused kernel is one launch for all params on CUDA; on CPU the default loop is kept
    # (bitwise reproducible and what the recorded CPU losses were made with).
    return True if device.type == "cuda" else None


def build_optimizers(model: torch.nn.Module, cfg: OptimConfig, device: torch.device | str,
                     exact: bool = False, process_group=None) -> list[torch.optim.Optimizer]:
    """[AdamW] for `adamw`, [AdamW, Muon] for `muon`. Pass the raw model (DDP/compile prefixes are
    stripped anyway; FSDP2-sharded parameters are fine). Every group carries `name` and `base_lr`;
    its `lr` starts at `base_lr`. `exact` (the run is in fp32) makes Muon orthogonalise in fp32
    instead of torch's bf16. `process_group`: the group the (plain, DDP) parameters are replicated
    across, among whose ranks Muon divides its Newton-Schulz work; FSDP2 parameters bring their mesh."""
    device = torch.device(device)
    use_muon = cfg.name == "muon"
    params = split_params(model, use_muon)
    adamw_settings = {  # group name -> (lr, weight decay)
        "embed": (cfg.embed_lr or cfg.lr, cfg.weight_decay),
        "head": (cfg.head_lr or cfg.lr, cfg.weight_decay),
        "decay": (cfg.lr, cfg.weight_decay),
        "no_decay": (cfg.lr, 0.0),
    }
    adamw_groups = [{"name": name, "params": params[name], "lr": lr, "base_lr": lr, "weight_decay": wd}
                    for name, (lr, wd) in adamw_settings.items() if params.get(name)]
    optimizers: list[torch.optim.Optimizer] = [
        torch.optim.AdamW(adamw_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                          fused=_adamw_fused(cfg, device))
    ]
    if use_muon and params.get("muon"):
        muon_group = {"name": "muon", "params": params["muon"], "lr": cfg.muon_lr, "base_lr": cfg.muon_lr}
        optimizers.append(Muon([muon_group], lr=cfg.muon_lr, momentum=cfg.muon_momentum,
                               weight_decay=cfg.muon_weight_decay, ns_steps=cfg.muon_ns_steps,
                               ns_dtype=torch.float32 if exact else torch.bfloat16, process_group=process_group))
    return optimizers


class LRSchedule:
    """LR multiplier as a pure function of the optimizer step (0-based): linear warmup, then

    * cosine:   half a cosine from 1 to `min_lr_ratio`, reached at the last step (total_steps - 1);
    * constant: 1;
    * wsd:      1 until the final `cooldown_fraction` of the run, then a straight line down that
                reaches `min_lr_ratio` at the last step.

    Steps past the end stay at the final value. Holding no counter, it has no state to checkpoint: a
    resumed run recomputes the LR from the step (raising train.steps on resume stretches the decay).
    """

    def __init__(self, cfg: OptimConfig, total_steps: int):
        if total_steps < 1:
            raise ConfigError(f"the run has {total_steps} steps; the LR schedule needs at least 1")
        self.schedule = cfg.schedule
        self.warmup_steps = cfg.warmup_steps
        self.min_lr_ratio = cfg.min_lr_ratio
        self.cooldown_fraction = cfg.cooldown_fraction
        self.total_steps = total_steps
        # wsd: the last `cooldown_steps` steps decay, so the line runs from cooldown_start to total-1.
        self.cooldown_steps = max(1, round(cfg.cooldown_fraction * total_steps))
        self.cooldown_start = total_steps - self.cooldown_steps

    def _after_warmup(self, step: int) -> float:
        low = self.min_lr_ratio
        if self.schedule == "constant":
            return 1.0
        if self.schedule == "cosine":
            span = max(1, self.total_steps - 1 - self.warmup_steps)
            progress = min(1.0, max(0.0, (step - self.warmup_steps) / span))
            return low + (1.0 - low) * 0.5 * (1.0 + math.cos(math.pi * progress))
        done = min(1.0, max(0.0, (step - self.cooldown_start + 1) / self.cooldown_steps))
        return 1.0 - (1.0 - low) * done

    def multiplier(self, step: int) -> float:
        warmup = (step + 1) / self.warmup_steps if step < self.warmup_steps else 1.0
        # min(), not a switch: a wsd cooldown that begins inside warmup never jumps above the ramp.
        return min(warmup, self._after_warmup(step))

    def apply(self, optimizers: list[torch.optim.Optimizer], step: int) -> float:
        """Set every group's lr for `step`; returns the multiplier (for logging)."""
        mult = self.multiplier(step)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * mult
        return mult


def grad_norm(params) -> torch.Tensor:
    """Global L2 norm of the gradients (a 0-dim tensor, no host sync). Under DDP every rank holds the
    same reduced grads, so the same norm; under FSDP each rank holds a shard (a DTensor) and the norm
    is reduced over the shards (a collective)."""
    total = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if hasattr(total, "full_tensor"):  # a DTensor: partial norms of the shards, summed over ranks
        total = total.full_tensor()
    return total


def clip_grad_norm(params, max_norm: float, total: torch.Tensor | None = None) -> torch.Tensor:
    """Scale the gradients down to global norm `max_norm` when it is > 0; returns their norm before
    clipping (`total` when the caller computed it with `grad_norm` already)."""
    params = [p for p in params if p.grad is not None]
    total = grad_norm(params) if total is None else total
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total

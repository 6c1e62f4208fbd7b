"""Out of memory in a step: one line that says what ran out and what would fit, and CUDA snapshots.

A `torch.OutOfMemoryError` raised while the run trains becomes `OutOfMemory` (exit status 5), one
line on the rank that ran out:

    rank 3 ran out of memory at step 120 (micro-batch 16 x 1024 tokens): allocated 71.2 GiB, reserved
    76.0 GiB, peak 77.9 GiB of 79.1 GiB; options that may fit (estimated per rank): --train.micro_batch=8
    (41.0 GiB), --model.activation_checkpointing=true (30.2 GiB), --parallel.data=fsdp (52.3 GiB);
    check them with: python -m dist_gpt.train ... --dry-run --dry-run-world=8 --dry-run-memory=79.1

The estimates are `dist_gpt.memory.estimate`'s, the same as `--dry-run` prints for each layout.
With `train.memory_snapshot=true` (CUDA only) the allocator records its history from the start and
each rank dumps it to `<run_dir>/memory/rank<r>-oom.pickle` when it runs out (and to
`rank<r>-step<S>.pickle` when the run ends otherwise); https://pytorch.org/memory_viz opens it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shlex
from pathlib import Path

import torch

from dist_gpt.errors import OutOfMemory
from dist_gpt.memory import GIB, ActivationProbe, estimate
from dist_gpt.metrics import peak_memory_gib


class MemoryWatch:
    """Turns an out-of-memory error of the training loop into `OutOfMemory`, and (train.memory_snapshot)
    records the CUDA allocator's history for a snapshot. Built before the model, so the history
    covers its allocation."""

    def __init__(self, cfg, env, argv: list[str]) -> None:
        self.cfg, self.env, self.argv = cfg, env, list(argv)
        self.cuda = env.device.type == "cuda"
        self.snapshots = cfg.train.memory_snapshot and self.cuda
        if self.snapshots:
            torch.cuda.memory._record_memory_history(max_entries=100_000)
        elif cfg.train.memory_snapshot and env.is_main:
            print(f"note: train.memory_snapshot needs CUDA; no snapshot on {env.device.type}", flush=True)

    @contextlib.contextmanager
    def watching(self, trainer):
        """Around the training loop of `trainer` (its state and precision name the step and the estimate)."""
        try:
            yield
        except torch.OutOfMemoryError:
            snapshot = self.dump("oom")
            raise OutOfMemory(self.describe(trainer.state.step, trainer.precision.name, snapshot)) from None
        self.dump(f"step{trainer.state.step}")

    def dump(self, name: str) -> Path | None:
        """Write the recorded allocator history to <run_dir>/memory/rank<r>-<name>.pickle."""
        if not self.snapshots:
            return None
        path = self.cfg.run_dir / "memory" / f"rank{self.env.rank}-{name}.pickle"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.cuda.memory._dump_snapshot(str(path))
        return path

    def describe(self, step: int, precision: str, snapshot: Path | None) -> str:
        tc, world = self.cfg.train, self.env.world_size
        line = (f"rank {self.env.rank} ran out of memory at step {step} (micro-batch {tc.micro_batch} x "
                f"{self.cfg.model.block_size} tokens): {self._usage()}")
        fits = ", ".join(f"{flag} ({_size(total)})" for flag, total in self._options(precision))
        if fits:
            line += f"; options that may fit (estimated per rank): {fits}"
        capacity = self._capacity_gib()
        command = shlex.join(["python", "-m", "dist_gpt.train", *self.argv, "--dry-run", f"--dry-run-world={world}"]
                             + ([f"--dry-run-memory={capacity:.1f}"] if capacity else []))
        line += f"; check them with: {command}"
        if snapshot is not None:
            line += f"; memory snapshot: {snapshot} (open it at https://pytorch.org/memory_viz)"
        return line

    def _usage(self) -> str:
        if not self.cuda:  # the test hook's path: a CPU has no allocator statistics
            return f"allocated n/a, reserved n/a, peak {peak_memory_gib('cpu'):.2f} GiB (resident set)"
        dev = self.env.device
        return (f"allocated {torch.cuda.memory_allocated(dev) / GIB:.1f} GiB, reserved "
                f"{torch.cuda.memory_reserved(dev) / GIB:.1f} GiB, peak {torch.cuda.max_memory_allocated(dev) / GIB:.1f} "
                f"GiB of {self._capacity_gib():.1f} GiB")

    def _capacity_gib(self) -> float | None:
        return torch.cuda.get_device_properties(self.env.device).total_memory / GIB if self.cuda else None

    def _options(self, precision: str) -> list[tuple[str, int]]:
        """(flag, estimated bytes per rank) of each single change that lowers memory: a smaller
        micro-batch (the global batch stays), activation checkpointing, fsdp; those that fit the
        device when its size is known."""
        cfg, world = self.cfg, self.env.world_size
        local = self.env.local_world_size
        changes = []
        smaller = [m for m in range(cfg.train.micro_batch // 2, 0, -1) if cfg.train.global_batch % (m * world) == 0]
        if smaller:
            changes.append((f"--train.micro_batch={smaller[0]}", _with(cfg, "train", micro_batch=smaller[0])))
        if not cfg.model.activation_checkpointing:
            changes.append(("--model.activation_checkpointing=true", _with(cfg, "model", activation_checkpointing=True)))
        if world > 1 and cfg.parallel.data == "ddp":
            changes.append(("--parallel.data=fsdp", _with(cfg, "parallel", data="fsdp")))
        probe = ActivationProbe(cfg.model, "fp32" if precision == "fp32" else "bf16", gpu=self.cuda)
        sized = [(flag, estimate(c, c.parallel.data, world, local, c.model.activation_checkpointing, probe).total)
                 for flag, c in changes]
        capacity = self._capacity_gib()
        return [(flag, total) for flag, total in sized if capacity is None or total <= capacity * GIB]


def _size(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def _with(cfg, section: str, **changes):
    """A copy of `cfg` with `changes` in `section`."""
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **changes)})

"""Which complete checkpoints to keep: the last K, every M-th step, and the best by validation loss."""

from __future__ import annotations

from pathlib import Path

from .layout import CheckpointInfo, list_checkpoints, remove_checkpoint


def steps_to_keep(checkpoints: list[CheckpointInfo], keep_last: int, keep_every: int, keep_best: bool) -> set[int]:
    """Steps of the complete checkpoints to keep; the newest one is always kept.

    keep_last=0 keeps everything. The best is the lowest finite val loss, the newest among equals.
    """
    done = sorted((c for c in checkpoints if c.complete), key=lambda c: c.step)
    if not done:
        return set()
    if keep_last == 0:
        return {c.step for c in done}
    keep = {c.step for c in done[-keep_last:]}
    if keep_every > 0:
        keep |= {c.step for c in done if c.step % keep_every == 0}
    scored = [c for c in done if c.val_loss is not None]
    if keep_best and scored:
        keep.add(min(scored, key=lambda c: (c.val_loss, -c.step)).step)
    return keep


def apply_retention(root: Path, keep_last: int, keep_every: int, keep_best: bool) -> list[Path]:
    """Delete the complete checkpoints under root that the policy does not keep (rank 0 only)."""
    found = list_checkpoints(root)
    keep = steps_to_keep(found, keep_last, keep_every, keep_best)
    removed = []
    for c in found:
        if c.complete and c.step not in keep:
            remove_checkpoint(c.path)
            removed.append(c.path)
    return removed

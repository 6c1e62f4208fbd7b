"""Which complete checkpoints to keep (the last K, every M-th step, the best by validation loss) and
which one a path names (its latest or its best)."""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError
from .layout import STEP_RE, DONE, CheckpointInfo, list_checkpoints, remove_checkpoint


def best_checkpoint(checkpoints: list[CheckpointInfo]) -> CheckpointInfo | None:
    """The complete checkpoint with the lowest finite validation loss, the newest among equals (None
    when no complete checkpoint has one): what keep_best keeps and `--best` / which="best" pick."""
    scored = [c for c in checkpoints if c.complete and c.val_loss is not None]
    return min(scored, key=lambda c: (c.val_loss, -c.step)) if scored else None


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
    best = best_checkpoint(done) if keep_best else None
    if best is not None:
        keep.add(best.step)
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


def resolve_checkpoint(path: str | Path, which: str = "latest") -> Path:
    """A checkpoint directory as given, or a run/checkpoints directory's latest (or best) complete one."""
    path = Path(path)
    if path.is_file():
        raise CheckpointError(f"{path} is a file, not a checkpoint: pass a run directory, a checkpoint directory "
                              "(runs/NAME/checkpoints/step_...) or an exported .safetensors file")
    if (path / DONE).exists() or STEP_RE.match(path.name):
        return path
    for root in (path / "checkpoints", path):
        found = [c for c in list_checkpoints(root) if c.complete]
        if not found:
            continue
        best = best_checkpoint(found) if which == "best" else None
        return (best or found[-1]).path
    if not path.exists():
        raise CheckpointError(f"{path} does not exist: pass a run directory, a checkpoint directory "
                              "(runs/NAME/checkpoints/step_...) or an exported .safetensors file")
    raise CheckpointError(f"{path} holds no complete checkpoint: pass a run directory with checkpoints, "
                          "a checkpoint directory (runs/NAME/checkpoints/step_...) or a .safetensors file")

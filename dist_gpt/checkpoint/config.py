"""The `checkpoint` section: when to save, what to keep, how to resume."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError

ASYNC_STAGING = ("reuse", "fresh")


@dataclass
class CheckpointConfig:
    """The `checkpoint` section, owned by `dist_gpt.checkpoint.Checkpointer`."""

    interval: int = field(default=0, metadata={"help": "save every this many steps (and always at the end); 0 = only at the end"})
    keep_last: int = field(default=3, metadata={"help": "keep the newest this many checkpoints (0 = keep all)"})
    keep_every: int = field(default=0, metadata={"help": "also keep every checkpoint whose step is a multiple of this (0 = off)"})
    keep_best: bool = field(default=True, metadata={"help": "also keep the checkpoint with the lowest validation loss"})
    async_save: bool = field(default=False, metadata={"help": "write checkpoints in a background thread (dcp.async_save): training blocks only while the state is copied"})
    async_staging: str = field(default="reuse", metadata={"help": "with async_save, where the copy of the state goes: reuse (host buffers allocated on the first save and reused by every later one; they keep a copy of the model and optimizer state in memory for the whole run) | fresh (a new copy per save, freed once written: no memory held between saves; each save allocates it again). Blocking times of both: docs/CHECKPOINTS.md"})
    resume: str = field(default="auto", metadata={"help": "auto (the latest complete checkpoint of the run directory, if any) | none (start fresh) | PATH of a checkpoint or run directory"})
    force: bool = field(default=False, metadata={"help": "with checkpoint.resume=none: start fresh in a run directory that already holds checkpoints (they are kept)"})
    take_lock: bool = field(default=False, metadata={"help": "take over the run directory's lock (lock.json) from a job that looks alive: only when you know that job is gone"})

    def __post_init__(self) -> None:
        for key in ("interval", "keep_last", "keep_every"):
            if getattr(self, key) < 0:
                raise ConfigError(f"checkpoint.{key} must be >= 0, got {getattr(self, key)}")
        if self.async_staging not in ASYNC_STAGING:
            raise ConfigError(f"checkpoint.async_staging must be {' or '.join(ASYNC_STAGING)}, got {self.async_staging!r}")
        if not self.resume:
            raise ConfigError("checkpoint.resume must be auto, none or a path, got an empty string")

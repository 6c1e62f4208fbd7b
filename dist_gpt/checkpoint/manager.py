"""Checkpointer: owns the run's stateful objects; saves (sync or async), restores, rolls back.

    ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint, env,
                        tensors={"model_optim": ModelOptimizerState(model, optimizers)},  # DCP
                        json_states={"config": ..., "run": state, "batches": batches},   # meta.json
                        val_loss=evaluator.loss_at)
    ckpt.restore()            # checkpoint.resume: auto | none | PATH (once, before the first step)
    ckpt.maybe_save(step)     # when checkpoint.interval says so (never the step it restored)
    ckpt.save(step)           # at the end, or on a stop signal
    ckpt.rollback()           # the NaN policy: reload the latest complete checkpoint
    ckpt.wait()               # before exit
    ckpt.close()              # wait, and free the async saves' staging buffers

Every object handed over has `state_dict()` / `load_state_dict()`. The tensor states go through DCP
(tensors only); the JSON states go into meta.json, one key per state, in the order given, which is
also the order they are loaded in (identity checks first). meta.json is read once, verified
against the CRC32 in DONE, before any of it is parsed.

A save, on every rank (it is collective):
  1. rank 0 clears a stale `.tmp_step_N/` and writes meta.json into it; barrier.
  2. every rank writes its share of the tensors with DCP into `.tmp_step_N/` (DCP spreads the
     replicated DDP tensors over the ranks), plus CRC32s of what it wrote; DCP then gathers the
     results and rank 0 writes `.metadata`, so by the time it returns every rank has finished.
  3. rank 0 commits: merges the checksums into the manifest, renames `.tmp_step_N/` to `step_N/`,
     writes DONE last (fsync'd), then applies retention; barrier.
With async_save, step 2 runs in a background thread after the state was copied (training blocks
only for the copy) and rank 0 commits as soon as it completes; `wait()` joins it. The copy goes
into host buffers made by the first async save and reused by every later one
(checkpoint.async_staging=reuse, staging.py); `close()` frees them.

Works in a world of 1 without any process group, and under torchrun on any number of ranks; a
checkpoint saved on W ranks loads on any other number (DDP state is replicated).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.profiler import record_function

from ..errors import CheckpointError, UserError
from .config import CheckpointConfig
from .layout import (
    META,
    META_FORMAT,
    SUMS_SUFFIX,
    build_manifest,
    clean_partials,
    fsync_dir,
    list_checkpoints,
    read_manifest,
    read_meta,
    remove_checkpoint,
    step_dir_name,
    tmp_dir_name,
    write_done,
)
from .loading import load_tensors, single_process_quiet, unwrap_dcp_error
from .planners import TensorOnlySavePlanner
from .retention import apply_retention, resolve_checkpoint
from .staging import ReusedStaging, reuse_supported
from .writer import ChecksummedFileSystemWriter, disk_full


@dataclass
class _Pending:
    """An async save in flight; rank 0 commits it once its future completes."""

    step: int
    tmp: Path
    final: Path
    val_loss: float | None
    future: Future
    lock: threading.Lock = field(default_factory=threading.Lock)
    committed: bool = False
    error: BaseException | None = None


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class Checkpointer:
    """The run's checkpoints: `tensors` through DCP, `json_states` into meta.json (see the module doc).

    `env` needs `.rank` and `.world_size`; `val_loss(step)` gives the validation loss measured at
    `step` (or None), recorded in DONE for keep_best.
    """

    def __init__(self, root: str | Path, cfg: CheckpointConfig, env, tensors: dict[str, Any],
                 json_states: dict[str, Any], val_loss=lambda step: None):
        self.root = Path(root)
        self.cfg = cfg
        self.rank, self.world_size = env.rank, env.world_size
        self.tensors, self.json_states, self.val_loss = tensors, json_states, val_loss
        self.restored_step = 0  # the step of the checkpoint loaded last (0: none)
        self._pending: _Pending | None = None
        self._async_group = None
        self._last_saved: tuple[int, Path] | None = None
        self.staging: ReusedStaging | None = None  # async saves' host buffers, made by the first one

    # -- when ---------------------------------------------------------------------------------
    def maybe_save(self, step: int) -> Path | None:
        """Save when checkpoint.interval asks for `step`, unless `step` is the one just restored."""
        if self.cfg.interval > 0 and step > self.restored_step and step % self.cfg.interval == 0:
            return self.save(step)
        return None

    # -- save ---------------------------------------------------------------------------------
    @record_function("checkpoint")  # the label of a train.profile trace
    def save(self, step: int) -> Path:
        """Write a checkpoint of every state at `step`; every rank calls it.

        Returns the checkpoint's final path (with async_save it is committed once the background
        write completes; `wait()` guarantees it). Saving the same step twice in one process is a no-op.
        """
        self.wait()
        if self._last_saved is not None and self._last_saved[0] == step:
            return self._last_saved[1]
        meta = {"meta_format": META_FORMAT, "step": step, "saved_at": time.time(),
                **{name: obj.state_dict() for name, obj in self.json_states.items()}}
        meta_text = json.dumps(meta, indent=1, sort_keys=True)  # every rank: a bad meta fails everywhere
        val_loss = self.val_loss(step)
        state = self.tensors
        tmp, final = self.root / tmp_dir_name(step), self.root / step_dir_name(step)
        self._agree(self._on_rank0(lambda: self._prepare(tmp, meta_text), f"could not create {tmp}"))
        writer = ChecksummedFileSystemWriter(tmp)
        writer.keep_last = self.cfg.keep_last
        writer.stager = self._reused_staging()
        no_dist = not _distributed()
        try:
            if self.cfg.async_save:
                with single_process_quiet():
                    future = dcp.async_save(state, storage_writer=writer, planner=TensorOnlySavePlanner(),
                                            process_group=self._async_process_group(), no_dist=no_dist)
                future = getattr(future, "upload_completion", future)
                pending = self._pending = _Pending(step, tmp, final, val_loss, future)
                if self.rank == 0:
                    future.add_done_callback(lambda _f: self._commit_pending(pending))
                self._last_saved = (step, final)
                return final
            with single_process_quiet():
                dcp.save(state, storage_writer=writer, planner=TensorOnlySavePlanner(), no_dist=no_dist)
        except CheckpointException as e:
            raise unwrap_dcp_error(e, f"writing checkpoint {tmp}") from None
        except OSError as e:
            raise CheckpointError(f"could not write checkpoint {tmp}: {e}; free space or fix permissions "
                                  f"under {self.root}") from None
        self._agree(self._on_rank0(lambda: self._commit(step, tmp, final, val_loss), f"could not commit {final}"))
        self._last_saved = (step, final)
        return final

    def wait(self) -> None:
        """Finish an in-flight async save (every rank calls it); raise its error on every rank."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            pending.future.result()  # DCP makes a failed write fail on every rank alike
        except CheckpointException as e:
            self._last_saved = None
            raise unwrap_dcp_error(e, f"writing checkpoint {pending.tmp}") from None
        except OSError as e:
            self._last_saved = None
            raise CheckpointError(f"could not write checkpoint {pending.tmp}: {e}") from None
        if self.rank == 0:
            self._commit_pending(pending)
        try:
            self._agree(str(pending.error) if pending.error is not None else None)
        except CheckpointError:
            self._last_saved = None
            raise

    def _on_rank0(self, work, what: str) -> str | None:
        """Run rank-0-only work; return its error message (None when it worked or on other ranks)."""
        if self.rank != 0:
            return None
        try:
            work()
        except OSError as e:
            full = disk_full(e, self.root, keep_last=self.cfg.keep_last)
            return str(full) if full else f"{what}: {e}; free space or fix permissions under {self.root}"
        return None

    def _agree(self, error: str | None) -> None:
        """Rank 0's outcome reaches every rank (a barrier too): all continue or all raise."""
        if _distributed():
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error is not None:
            raise CheckpointError(error)

    def _prepare(self, tmp: Path, meta_text: str) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # a crash left it: its step is being written again now
        tmp.mkdir()
        with open(tmp / META, "w") as f:
            f.write(meta_text)
            f.flush()
            os.fsync(f.fileno())

    def _commit(self, step: int, tmp: Path, final: Path, val_loss: float | None) -> None:
        """Rank 0, after every rank finished writing: rename, then DONE last, then retention."""
        manifest = build_manifest(tmp, step, val_loss, self.world_size)
        for sums in tmp.glob("*" + SUMS_SUFFIX):
            sums.unlink()
        if final.exists():
            # The same step from an earlier run (e.g. resumed from an older checkpoint): replaced.
            remove_checkpoint(final)
        os.rename(tmp, final)
        fsync_dir(self.root)
        write_done(final, manifest)
        fsync_dir(final)
        apply_retention(self.root, self.cfg.keep_last, self.cfg.keep_every, self.cfg.keep_best)

    def _commit_pending(self, pending: _Pending) -> None:
        """Rank 0: commit a finished async save (from its done-callback, or from wait())."""
        with pending.lock:
            if pending.committed or pending.error is not None or pending.future.exception() is not None:
                return
            try:
                self._commit(pending.step, pending.tmp, pending.final, pending.val_loss)
                pending.committed = True
            except OSError as e:
                pending.error = CheckpointError(f"could not commit {pending.final}: {e}")

    def _reused_staging(self) -> ReusedStaging | None:
        """The host buffers async saves copy into (checkpoint.async_staging=reuse), kept for the run.
        Reused only after the previous save's write has finished: save() waits for it first."""
        if not (self.cfg.async_save and self.cfg.async_staging == "reuse" and reuse_supported()):
            return None
        if self.staging is None:
            self.staging = ReusedStaging()
        return self.staging

    def close(self) -> None:
        """Finish an in-flight save and free the staging buffers (a later async save makes new ones)."""
        self.wait()
        if self.staging is not None:
            self.staging.close()
            self.staging = None

    def _async_process_group(self):
        """A gloo group of its own: the background thread's collectives must never interleave with
        the training loop's on the default group (and NCCL groups cannot carry DCP's CPU objects)."""
        if not _distributed():
            return None
        if self._async_group is None:
            self._async_group = dist.new_group(backend="gloo")
        return self._async_group

    # -- find ---------------------------------------------------------------------------------
    def latest(self) -> Path | None:
        """The newest complete checkpoint; rank 0 also removes what crashes left behind."""
        if self.rank == 0:
            pending = self._pending
            if pending is None:
                clean_partials(self.root)
            else:
                with pending.lock:  # never race the background commit's rename -> DONE
                    clean_partials(self.root, keep=(pending.tmp, pending.final))
        done = [c for c in list_checkpoints(self.root) if c.complete]
        return done[-1].path if done else None

    def has_checkpoints(self) -> bool:
        return any(c.complete for c in list_checkpoints(self.root))

    # -- load ---------------------------------------------------------------------------------
    def restore(self) -> Path | None:
        """Apply checkpoint.resume before the first step: auto (the latest here, if any), none (start
        fresh; with checkpoint.force an old checkpoints directory is moved aside) or PATH (a checkpoint
        or a run directory's latest). Returns the checkpoint loaded, or None."""
        resume = self.cfg.resume
        if resume == "none":
            if self.has_checkpoints():
                if not self.cfg.force:
                    raise CheckpointError(
                        f"{self.root} already holds checkpoints and --resume none would start over: pass --resume "
                        "auto to continue, --force to start fresh (the old checkpoints are moved aside, not "
                        "deleted), or another --train.run_dir")
                self._agree(self._on_rank0(self._move_aside, f"could not move {self.root} aside"))
            return None
        path = self.latest() if resume == "auto" else self._named(Path(resume))
        if path is not None:
            self.load(path)
        return path

    def _named(self, path: Path) -> Path:
        if not path.exists():
            raise CheckpointError(f"--resume {path}: no such checkpoint; pass a checkpoint directory, auto or none")
        if not path.is_dir():
            raise CheckpointError(f"--resume {path} is a file, not a checkpoint: pass a checkpoint directory "
                                  "(runs/NAME/checkpoints/step_...), a run directory, auto or none")
        try:
            return resolve_checkpoint(path)
        except CheckpointError:
            raise CheckpointError(f"--resume {path}: that directory holds no complete checkpoint") from None

    def _move_aside(self) -> None:
        aside = self.root.with_name(f"{self.root.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.move(str(self.root), str(aside))
        print(f"--force: moved the old checkpoints to {aside}")

    def rollback(self) -> Path | None:
        """Reload the latest complete checkpoint (the NaN policy); None when there is none."""
        self.wait()  # an in-flight async save must finish (and retention run) before choosing
        path = self.latest()
        if path is not None:
            self.load(path)
        return path

    def load(self, path: str | Path) -> None:
        """Load every state from the checkpoint at `path` (collective): meta.json verified and parsed
        once, the JSON states in order (identity checks first), then the tensors."""
        self.wait()
        path = Path(path)
        manifest = read_manifest(path)
        meta = read_meta(path, manifest)
        for name, obj in self.json_states.items():
            if name not in meta:
                raise CheckpointError(f"{path / META} has no {name!r} state: it was not written by this "
                                      "trainer; pass another checkpoint or --resume none")
            try:
                obj.load_state_dict(meta[name])
            except UserError as e:
                raise type(e)(f"{path}: {e}") from None
        load_tensors(path, manifest, self.tensors)
        self.restored_step = int(meta["step"])

"""Load a complete checkpoint into live state: checks first, then DCP with the safe reader.

Order: DONE present and readable -> meta.json matches its CRC32 -> `.metadata` matches its CRC32,
unpickles through the restricted unpickler and lists tensors only -> every data file has the size
DONE records -> keys and shapes match this run -> DCP reads each tensor, verifying its CRC32.
Every failure is a CheckpointError naming the file and the way out.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from ..errors import CheckpointError, UserError
from .planners import SafeLoadPlanner
from .safe_reader import SafeFileSystemReader, read_metadata


@contextlib.contextmanager
def single_process_quiet():
    """DCP warns on every call without a process group that it assumes one process: we know."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def unwrap_dcp_error(exc: CheckpointException, what: str) -> BaseException:
    """DCP gathers every rank's exception into one CheckpointException; pick the one worth showing.

    A UserError raised by our reader or planner on any rank is passed on as it is; a programming
    error (TypeError, ...) is passed on unchanged; anything else (an OSError, a torch error) becomes
    a CheckpointError that names `what`.
    """
    failures = sorted(exc.failures.items())
    for _, (err, _tb) in failures:
        if isinstance(err, UserError):
            return err
    for _, (err, _tb) in failures:
        if isinstance(err, (TypeError, AttributeError, KeyError, AssertionError, NotImplementedError)):
            return err
    rank, (err, _tb) = failures[0]
    return CheckpointError(f"{what} failed on rank {rank}: {type(err).__name__}: {err}")


def load_tensors(path: Path, manifest: dict, state: dict[str, Any], strict_prefixes: tuple[str, ...] | None = None,
                 no_dist: bool | None = None, metadata=None) -> None:
    """DCP-load `state` from the checkpoint at `path` whose DONE is `manifest` (and whose `.metadata`,
    read through the safe reader, is `metadata` when the caller already has it).

    strict_prefixes defaults to every top-level key of `state`: the checkpoint may hold nothing under
    them that this run lacks.
    """
    metadata = metadata if metadata is not None else read_metadata(path, manifest)
    if strict_prefixes is None:
        strict_prefixes = tuple(f"{k}." for k in state)
    if no_dist is None:
        no_dist = not (dist.is_available() and dist.is_initialized())
    try:
        with single_process_quiet():
            dcp.load(state, storage_reader=SafeFileSystemReader(path, metadata, manifest),
                     planner=SafeLoadPlanner(path, strict_prefixes), no_dist=no_dist)
    except CheckpointException as e:
        raise unwrap_dcp_error(e, f"loading checkpoint {path}") from None

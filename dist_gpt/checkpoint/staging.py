"""Host copies of the state for async saves, in buffers allocated on the first save and reused.

    staging = ReusedStaging()                  # one per Checkpointer, created on its first async save
    staged = staging.stage(state_dict)         # copies every tensor into its buffer; returns the copy

`dcp.async_save` needs a copy of the state that training cannot change while a background thread
writes it. Its default staging allocates that copy afresh on every save (1.4 GB for 124M parameters
with AdamW state), and fresh memory is page-faulted in and zero-filled by the kernel before the copy
can land, which is most of what a save used to block the loop for. torch's `DefaultStager`
(`torch.distributed.checkpoint.staging`, 2.9 and later) keeps a host buffer per source storage
(a weak reference to it) and copies into the same buffer on every later save, so after the first
save no memory is allocated. Buffers whose source is gone (the optimizer state replaced by a
rollback's load) are freed with it.

On CUDA the buffers are pinned (registered with the driver once, when allocated) and the
device-to-host copies are non-blocking, synchronised before `stage` returns. That path is written
for GPUs and not run here (no GPU in this project's CI).

Staging is synchronous on purpose: the loop continues only once every tensor is copied, because the
next optimizer step changes the parameters and optimizer state in place. The buffers are reused
only after the previous save's write has finished (`Checkpointer.save` waits for it first), so a
checkpoint holds exactly the state of its step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.checkpoint.metadata import STATE_DICT_TYPE

try:  # torch 2.9 has it (MIN_TORCH); an older or reorganised torch falls back to fresh copies
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
except ImportError:
    DefaultStager = StagingOptions = None


def reuse_supported() -> bool:
    """Whether this torch can stage into reused buffers (else each save stages fresh)."""
    return DefaultStager is not None


def _on_accelerator(state_dict: Any) -> bool:
    """Whether any tensor of the (nested) state dict lives off the CPU."""
    if isinstance(state_dict, torch.Tensor):
        return state_dict.device.type != "cpu"
    if isinstance(state_dict, dict):
        return any(_on_accelerator(v) for v in state_dict.values())
    if isinstance(state_dict, (list, tuple)):
        return any(_on_accelerator(v) for v in state_dict)
    return False


class ReusedStaging:
    """Stages a state dict into buffers it keeps (the writer's `stage` hands DCP's call to it)."""

    def __init__(self) -> None:
        self._stager = None
        self.staged: STATE_DICT_TYPE | None = None  # the last copy (its tensors are the buffers)

    def stage(self, state_dict: STATE_DICT_TYPE) -> STATE_DICT_TYPE:
        if self._stager is None:
            gpu = _on_accelerator(state_dict)  # pinned buffers and non-blocking copies need a device
            self._stager = DefaultStager(StagingOptions(use_pinned_memory=gpu, use_shared_memory=False,
                                                        use_async_staging=False, use_non_blocking_copy=gpu))
        self.staged = self._stager.stage(state_dict)
        return self.staged

    def close(self) -> None:
        """Free the buffers (a later `stage` allocates them again)."""
        if self._stager is not None:
            self._stager.close()
        self._stager, self.staged = None, None

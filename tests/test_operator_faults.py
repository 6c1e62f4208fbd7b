"""Faults an operator meets: a full disk during a save, two jobs on one run directory.

A root CI cannot fill a disk for real, so ENOSPC is raised at the write itself, the way the kernel
raises it there: inside torch's zip writer, which reports it as "unexpected pos" with the OSError in
its context (checked against a real full tmpfs when writing this test)."""

from __future__ import annotations

import errno
import io
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import filesystem as dcp_filesystem

from checkpoint_worker import build, flat_state
from dist_gpt.checkpoint import Checkpointer, CheckpointConfig, ModelOptimizerState, load_checkpoint
from dist_gpt.errors import CheckpointError


class FullDisk(io.RawIOBase):
    """The system calls of a file on a disk with `room` bytes left: a write takes what fits and returns
    the short count, the next one fails with ENOSPC (as the kernel does). Buffered like open(..., "wb")."""

    def __init__(self, raw, room: list[int]):
        self.raw, self.room = raw, room

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if self.room[0] == 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = self.raw.write(memoryview(data).cast("B")[: self.room[0]])
        self.room[0] -= n
        return n

    def seekable(self) -> bool:
        return True

    def seek(self, *args) -> int:
        return self.raw.seek(*args)

    def tell(self) -> int:
        return self.raw.tell()

    def fileno(self) -> int:
        return self.raw.fileno()

    def close(self) -> None:
        self.raw.close()
        super().close()


def fill_disk_after(monkeypatch, room_bytes: int) -> None:
    """Every file DCP writes from now on shares `room_bytes` of free space."""
    room = [room_bytes]

    @contextmanager
    def create_stream(self, path, mode):
        with io.BufferedWriter(FullDisk(open(path, "wb", buffering=0), room)) as f:
            yield f

    monkeypatch.setattr(dcp_filesystem.FileSystem, "create_stream", create_stream)


def _model():
    """A weight of 128 KB: bigger than a file's write buffer, so the disk fills inside torch's zip writer."""
    torch.manual_seed(0)
    model = torch.nn.Linear(128, 256)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _step(model, opt) -> None:
    model(torch.randn(4, 128)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("room", [600, 20_000])  # full at a file's first flush / inside a tensor's zip record
def test_full_disk_during_a_save_is_one_line_and_keeps_the_earlier_checkpoint(tmp_path, monkeypatch, room):
    model, opt = _model()
    state = {"model_optim": ModelOptimizerState(model, [opt])}
    ckpt = Checkpointer(tmp_path / "checkpoints", CheckpointConfig(keep_last=1), 0, 1)
    _step(model, opt)
    first = ckpt.save(1, state, {"step": 1})
    saved = flat_state(model, opt)
    _step(model, opt)

    fill_disk_after(monkeypatch, room)
    with pytest.raises(CheckpointError) as e:
        ckpt.save(2, state, {"step": 2})
    message = str(e.value)  # this rank writes the weights and AdamW's two moments: 3 x 128 KB, about
    assert message.startswith(f"no space left on device at {tmp_path / 'checkpoints' / '.tmp_step_0000002'} (")
    assert " MB free): free 1 MB or lower checkpoint.keep_last; the earlier checkpoints are intact" in message
    assert "inline_container" not in message and "\n" not in message
    monkeypatch.undo()

    assert ckpt.latest() == first  # the partial save is ignored (and cleaned), the earlier one intact
    fresh_model, fresh_opt = _model()
    load_checkpoint(first, {"model_optim": ModelOptimizerState(fresh_model, [fresh_opt])})
    restored = flat_state(fresh_model, fresh_opt)
    assert restored.keys() == saved.keys() and all(torch.equal(restored[k], saved[k]) for k in saved)


def test_full_disk_while_rank_0_writes_meta_is_the_same_message(tmp_path, monkeypatch):
    import dist_gpt.checkpoint.manager as manager

    model, opt = build()
    ckpt = Checkpointer(tmp_path / "checkpoints", CheckpointConfig(), 0, 1)

    def full_open(path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        if "w" in mode:
            f.close()
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return f

    monkeypatch.setattr(manager, "open", full_open, raising=False)
    with pytest.raises(CheckpointError, match=r"^no space left on device at .*checkpoints \(\d+ MB free\): free space "
                                              "or lower checkpoint.keep_last"):
        ckpt.save(1, {"model_optim": ModelOptimizerState(model, [opt])}, {"step": 1})
    assert not Path(tmp_path / "checkpoints" / "step_0000001").exists()

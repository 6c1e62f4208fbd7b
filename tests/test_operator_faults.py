"""Faults an operator meets: a full disk during a save, two jobs on one run directory.

A root CI cannot fill a disk for real, so ENOSPC is raised at the write itself, the way the kernel
raises it there: inside torch's zip writer, which reports it as "unexpected pos" with the OSError in
its context (checked against a real full tmpfs when writing this test)."""

from __future__ import annotations

import errno
import io
import re
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import filesystem as dcp_filesystem

from checkpoint_worker import build, flat_state, make_checkpointer
from dist_gpt.checkpoint import CheckpointConfig, ModelOptimizerState
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


MAKE_ROOM = {  # checkpoint.keep_last -> what the message offers besides freeing space
    1: " (checkpoint.keep_last=1 already keeps only the newest, which stays until the next one is complete), or "
       "move --train.run_dir to a larger filesystem",
    0: ", or keep fewer checkpoints: checkpoint.keep_last=0 keeps every one, --checkpoint.keep_last=N keeps the newest N",
    3: ", or lower checkpoint.keep_last (now 3)",
}


@pytest.mark.parametrize("room,keep_last", [(600, 1), (20_000, 0), (20_000, 3)])  # full at a file's first flush / inside a tensor's zip record
def test_full_disk_during_a_save_is_one_line_and_keeps_the_earlier_checkpoint(tmp_path, monkeypatch, room, keep_last):
    model, opt = _model()
    ckpt, _ = make_checkpointer(tmp_path / "checkpoints", CheckpointConfig(keep_last=keep_last),
                                {"model_optim": ModelOptimizerState(model, [opt])})
    _step(model, opt)
    first = ckpt.save(1)
    saved = flat_state(model, opt)
    _step(model, opt)

    fill_disk_after(monkeypatch, room)
    with pytest.raises(CheckpointError) as e:
        ckpt.save(2)
    message = str(e.value)  # this rank writes the weights and AdamW's two moments: 3 x 128 KB, about
    assert message.startswith(f"no space left on device at {tmp_path / 'checkpoints' / '.tmp_step_0000002'} (")
    assert (" MB free): the checkpoint needs 1 MB in all (every rank's part): free that much"
            f"{MAKE_ROOM[keep_last]}; the earlier checkpoints are intact") in message
    assert "inline_container" not in message and "\n" not in message
    monkeypatch.undo()

    assert ckpt.latest() == first  # the partial save is ignored (and cleaned), the earlier one intact
    fresh_model, fresh_opt = _model()
    fresh, _ = make_checkpointer(tmp_path / "checkpoints", CheckpointConfig(),
                                 {"model_optim": ModelOptimizerState(fresh_model, [fresh_opt])})
    fresh.load(first)
    restored = flat_state(fresh_model, fresh_opt)
    assert restored.keys() == saved.keys() and all(torch.equal(restored[k], saved[k]) for k in saved)


def test_full_disk_while_rank_0_writes_meta_is_the_same_message(tmp_path, monkeypatch):
    import dist_gpt.checkpoint.manager as manager

    model, opt = build()
    ckpt, _ = make_checkpointer(tmp_path / "checkpoints", CheckpointConfig(), {"model_optim": ModelOptimizerState(model, [opt])})

    def full_open(path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        if "w" in mode:
            f.close()
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return f

    monkeypatch.setattr(manager, "open", full_open, raising=False)
    with pytest.raises(CheckpointError, match=r"^no space left on device at .*checkpoints \(\d+ MB free\): free space, "
                                              "or lower checkpoint.keep_last \\(now 3\\)"):
        ckpt.save(1)
    assert not Path(tmp_path / "checkpoints" / "step_0000001").exists()


def test_a_full_disk_names_the_whole_checkpoints_size_not_one_ranks_part(tmp_path):
    """All ranks write to one filesystem: the coordinator's global plan gives every rank's plan the total
    (2 ranks here: 4,000 + 2,000 bytes), where the message used to give the failing rank's part only."""
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    from dist_gpt.checkpoint.writer import ChecksummedFileSystemWriter, planned_bytes

    plans = []
    for state in ({"a": torch.zeros(1000)}, {"b": torch.zeros(500)}):  # one rank's tensors each
        planner = DefaultSavePlanner()
        planner.set_up_planner(state, is_coordinator=True)
        plans.append(planner.create_local_plan())
    assert [planned_bytes(p) for p in plans] == [4000, 2000]
    writer = ChecksummedFileSystemWriter(tmp_path)
    for plan in writer.prepare_global_plan(plans):
        assert plan.storage_data.total_bytes == 6000


# ---------------------------------------------------------------------------------------------
# One job per run directory

def _holder(**changes) -> dict:
    from dataclasses import asdict

    from dist_gpt.training.runlock import Holder

    return {**asdict(Holder.this_process()), "pid_start": None, **changes}


def _lock_file(run: Path, **changes) -> dict:
    import json

    record = _holder(**changes)
    run.mkdir(parents=True, exist_ok=True)
    (run / "lock.json").write_text(json.dumps(record))
    return record


@pytest.fixture
def other_process():
    """A live process on this host that is not us (the holder of someone else's lock)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    yield proc
    proc.stdin.close()
    proc.wait(timeout=60)


def test_a_second_job_is_refused_naming_the_holder(tmp_path, monkeypatch, other_process):
    import json
    import socket
    import time

    from dist_gpt.errors import ConfigError
    from dist_gpt.processes import process_start
    from dist_gpt.training.runlock import RunLock

    for var in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(var, raising=False)
    run = tmp_path / "run"
    _lock_file(run, pid=other_process.pid, pid_start=process_start(other_process.pid), slurm_job_id="4242",
               heartbeat=time.time() - 12)
    with pytest.raises(ConfigError) as e:
        RunLock(run).acquire(heartbeat=False)
    assert str(e.value) == (f"run directory {run} is in use by another job (host {socket.gethostname()}, pid "
                            f"{other_process.pid}, SLURM job 4242, heartbeat 12 s ago; lock {run / 'lock.json'}): wait "
                            "for it to end, use another --train.run_dir, or pass --checkpoint.take_lock=true if that "
                            "job is gone")
    assert json.loads((run / "lock.json").read_text())["pid"] == other_process.pid  # untouched

    lock = RunLock(run).acquire(take_over=True, heartbeat=False)  # the user says it is gone
    assert lock.note.startswith(f"took over the lock {run / 'lock.json'} (--checkpoint.take_lock: host ")
    assert lock.holder().is_process(lock.me)
    lock.release()
    assert not (run / "lock.json").exists()


@pytest.mark.parametrize("case, expect", [
    ("dead", "its process {pid} on this host is gone"),
    ("reused pid", "its process {pid} on this host is gone"),   # a live process, but not the one that locked
    ("old heartbeat", r"host elsewhere, pid 1, heartbeat 3\d\d s ago, more than 300 s"),
    ("unreadable", "unreadable lock file"),
    ("requeued", r"SLURM job 77 was requeued \(restart 1\)"),    # even from another node, with a fresh heartbeat
    ("torchrun restart", r"torchrun restarted its workers \(restart 2\)"),
])
def test_a_stale_lock_is_taken_over(tmp_path, monkeypatch, other_process, case, expect):
    import subprocess
    import sys
    import time

    from dist_gpt.processes import process_start
    from dist_gpt.training.runlock import RunLock

    for var in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(var, raising=False)
    run = tmp_path / "run"
    pid = other_process.pid
    if case == "dead":
        gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        pid = int(gone.stdout)
        _lock_file(run, pid=pid)
    elif case == "reused pid":
        _lock_file(run, pid=pid, pid_start=process_start(pid) - 1)
    elif case == "old heartbeat":
        _lock_file(run, host="elsewhere", pid=1, heartbeat=time.time() - 301)
    elif case == "unreadable":
        run.mkdir()
        (run / "lock.json").write_text('{"host": "n1", "pi')
    elif case == "requeued":
        monkeypatch.setenv("SLURM_JOB_ID", "77")
        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
        _lock_file(run, host="n2", pid=1, slurm_job_id="77", slurm_restart=0)
    else:
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
        _lock_file(run, pid=pid, pid_start=process_start(pid), torchrun_run_id="abc", torchrun_restart=1)
    lock = RunLock(run).acquire(heartbeat=False)
    assert re.fullmatch(f"took over the lock {re.escape(str(run / 'lock.json'))} \\({expect.format(pid=pid)}\\)", lock.note), lock.note
    assert lock.holder().is_process(lock.me)


def test_the_same_slurm_job_twice_at_once_is_refused(tmp_path, monkeypatch):
    """Two steps of one SLURM job on one run directory: same job id, same restart count, both alive."""
    from dist_gpt.errors import ConfigError
    from dist_gpt.training.runlock import RunLock

    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    _lock_file(tmp_path, host="n2", pid=1, slurm_job_id="77", slurm_restart=0)
    with pytest.raises(ConfigError, match="in use by another job .host n2, pid 1, SLURM job 77, heartbeat 0 s ago"):
        RunLock(tmp_path).acquire(heartbeat=False)


def test_heartbeat_and_release_leave_a_lock_taken_over_by_another_job_alone(tmp_path):
    import json
    from dist_gpt.training.runlock import RunLock

    lock = RunLock(tmp_path).acquire()  # with its heartbeat thread
    lock.me.heartbeat = 0.0  # as if the last beat were long ago
    assert lock.refresh() and lock.holder().heartbeat > 0
    other = _lock_file(tmp_path, host="elsewhere", pid=1)  # someone took it over (take_lock)
    assert not lock.refresh()
    lock.release()  # stops the heartbeat; the other job's lock stays
    assert json.loads((tmp_path / "lock.json").read_text()) == other


def test_an_unwritable_run_directory_is_one_line(tmp_path):
    from dist_gpt.errors import ConfigError
    from dist_gpt.training.runlock import RunLock

    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(ConfigError, match=f"^cannot write the run directory {tmp_path / 'file' / 'run'} .*: pass a "
                                          "writable --train.run_dir"):
        RunLock(tmp_path / "file" / "run").acquire()


def test_two_trainers_on_one_run_directory(tiny_data, tmp_path):
    """The second job is refused before it touches a file; the first, held before its first step while
    the second tries, finishes and releases the lock."""
    import socket
    import subprocess
    import sys

    from conftest import EXACT, REPO, _env, final, pause_env, release, run_train, wait_paused

    run, hold = tmp_path / "run", tmp_path / "pause"
    args = [*EXACT, f"--data.path={tiny_data}", f"--train.run_dir={run}", "--train.steps=4"]
    first = subprocess.Popen([sys.executable, "-m", "dist_gpt.train", *args], env=_env(pause_env(hold, 0)), cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_paused(hold, 0, 1, lambda: first.poll() is None)
        files = sorted(p.name for p in run.iterdir())
        second = run_train(args, check=False)
        assert second.returncode == 2, second.stderr
        (line,) = second.stderr.splitlines()
        assert re.fullmatch(re.escape(f"error: run directory {run} is in use by another job (host {socket.gethostname()}, "
                                      f"pid {first.pid}, heartbeat ") + r"\d+" + re.escape(
            f" s ago; lock {run / 'lock.json'}): wait for it to end, use another --train.run_dir, or pass "
            "--checkpoint.take_lock=true if that job is gone"), line), line
        # Under torchrun, every rank learns the refusal; one prints it, and torchrun's summary quotes it.
        second = run_train(args, nproc=2, check=False)
        errors = [ln for ln in second.stderr.splitlines() if ln.startswith("error:")]
        assert second.returncode != 0 and len(errors) == 1, second.stderr[-3000:]
        assert errors[0].startswith(f"error: run directory {run} is in use by another job"), errors
        assert f"traceback : {errors[0]}" in second.stderr and "error_file: <N/A>" not in second.stderr
        assert sorted(p.name for p in run.iterdir()) == files  # nothing touched
        release(hold, 0)
        out, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err[-3000:]
    assert final(run)["step"] == 4 and not (run / "lock.json").exists()

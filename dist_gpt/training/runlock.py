"""One job per run directory: a lock file that names the job holding it.

    lock = RunLock(run_dir).acquire(take_over=cfg.checkpoint.take_lock)  # rank 0, before anything else
    lock.release()                                                       # at the end (a crash leaves it)
    with held(run_dir, env, take_over): ...  # the trainer's form: rank 0 holds it, every rank learns the outcome

`<run_dir>/lock.json` holds the holder's host, pid (and the pid's start time, so a reused pid is not
mistaken for it), SLURM job id and restart count, torchrun's run id and restart count, and a heartbeat
time that a background thread rewrites every `REFRESH_S` seconds (so a long save or evaluation never
makes a live job look gone). A second job on the same run directory is refused with a message that
names the holder, before it touches a file there: two jobs would remove each other's checkpoints in
flight. The lock is taken over, with a note saying why, when it is stale:
  * a later attempt of the same job: a requeued SLURM job (same job id, higher restart count; it may
    land on another node) or a torchrun restart (same run id, higher restart count);
  * the holder's process is gone (same host: no such pid, or another process under that pid);
  * its heartbeat is older than `STALE_S` (a holder on another host that died; hosts' clocks may
    differ by seconds, not minutes);
  * an unreadable lock file (a crash while it was written);
  * or `--checkpoint.take_lock=true` says so (the user checked that the holder is gone).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from dist_gpt.errors import ConfigError
from dist_gpt.parallel import dist
from dist_gpt.processes import pid_alive, process_start

from .run_files import make_run_dir


LOCK = "lock.json"
REFRESH_S = 30.0   # heartbeat period
STALE_S = 300.0    # a heartbeat older than this: the holder is gone (ten missed heartbeats)


@dataclass
class Holder:
    host: str
    pid: int
    pid_start: int | None
    slurm_job_id: str | None
    slurm_restart: int
    torchrun_run_id: str | None
    torchrun_restart: int
    started: float
    heartbeat: float

    @classmethod
    def this_process(cls) -> "Holder":
        env, now = os.environ, time.time()
        return cls(socket.gethostname(), os.getpid(), process_start(os.getpid()), env.get("SLURM_JOB_ID"),
                   int(env.get("SLURM_RESTART_COUNT", "0")), env.get("TORCHELASTIC_RUN_ID"),
                   int(env.get("TORCHELASTIC_RESTART_COUNT", "0")), now, now)

    def is_process(self, other: "Holder") -> bool:
        return (self.host, self.pid, self.pid_start) == (other.host, other.pid, other.pid_start)

    def later_attempt_of(self, other: "Holder") -> str | None:
        """Why this process is a later attempt of the job `other` ran (requeued, restarted), or None."""
        if self.slurm_job_id and self.slurm_job_id == other.slurm_job_id and self.slurm_restart > other.slurm_restart:
            return f"SLURM job {self.slurm_job_id} was requeued (restart {self.slurm_restart})"
        if (self.torchrun_run_id and self.torchrun_run_id == other.torchrun_run_id
                and self.torchrun_restart > other.torchrun_restart):
            return f"torchrun restarted its workers (restart {self.torchrun_restart})"
        return None

    def describe(self) -> str:
        job = f", SLURM job {self.slurm_job_id}" if self.slurm_job_id else ""
        age = time.time() - self.heartbeat
        return f"host {self.host}, pid {self.pid}{job}, heartbeat {age:.0f} s ago"


class RunLock:
    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK
        self.me = Holder.this_process()
        self.note: str | None = None  # why a stale lock was taken over, for the log
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def holder(self) -> Holder | None:
        """The lock's holder; None when there is no lock or it cannot be read (a crash while writing)."""
        try:
            return Holder(**json.loads(self.path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def acquire(self, take_over: bool = False, heartbeat: bool = True) -> "RunLock":
        """Take the lock (refused with a ConfigError naming the holder) and start the heartbeat."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._create()
        except FileExistsError:
            holder = self.holder()
            why = self._stale(holder, take_over)
            if why is None:
                raise ConfigError(
                    f"run directory {self.path.parent} is in use by another job ({holder.describe()}; lock "
                    f"{self.path}): wait for it to end, use another --train.run_dir, or pass "
                    "--checkpoint.take_lock=true if that job is gone") from None
            self.note = f"took over the lock {self.path} ({why})"
            self._write()
        except OSError as e:
            raise ConfigError(f"cannot write the run directory {self.path.parent} ({e.strerror or e}): pass a "
                              "writable --train.run_dir (on several nodes, a filesystem every node sees)") from None
        if heartbeat:
            self._thread = threading.Thread(target=self._beat, name="dist_gpt-runlock", daemon=True)
            self._thread.start()
        return self

    def _stale(self, holder: Holder | None, take_over: bool) -> str | None:
        """Why the lock may be taken over, or None when its holder looks alive."""
        if holder is None:
            return "unreadable lock file"
        if holder.is_process(self.me):
            return "held by this process"
        later = self.me.later_attempt_of(holder)
        if later:
            return later
        if holder.host == self.me.host and not pid_alive(holder.pid, holder.pid_start):
            return f"its process {holder.pid} on this host is gone"
        if time.time() - holder.heartbeat > STALE_S:
            return f"{holder.describe()}, more than {STALE_S:.0f} s"
        if take_over:
            return f"--checkpoint.take_lock: {holder.describe()}"
        return None

    def _create(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(self.me), f)
            f.flush()
            os.fsync(f.fileno())

    def _write(self) -> None:
        """Replace the lock file atomically with this process's record (a reader never sees half of it)."""
        tmp = self.path.with_name(f"{LOCK}.{self.me.pid}.tmp")
        tmp.write_text(json.dumps(asdict(self.me)))
        os.replace(tmp, self.path)

    def refresh(self) -> bool:
        """Rewrite the heartbeat; False (and nothing written) when another job has taken the lock over."""
        holder = self.holder()
        if holder is not None and not holder.is_process(self.me):
            return False
        self.me.heartbeat = time.time()
        self._write()
        return True

    def _beat(self) -> None:
        while not self._stop.wait(REFRESH_S):
            try:
                if not self.refresh():
                    print(f"warning: another job took over the lock {self.path} ({self.holder().describe()}); "
                          "this job no longer refreshes it", flush=True)
                    return
            except OSError:
                pass  # a full or briefly unreachable filesystem: the next beat tries again

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still this process's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        holder = self.holder()
        if holder is not None and holder.is_process(self.me):
            self.path.unlink(missing_ok=True)


@contextlib.contextmanager
def held(run_dir: str | Path, env, take_over: bool):
    """The trainer's form, around everything it does in the run directory: rank 0 creates the directory
    and takes its lock, every rank learns the outcome (all go on, or all raise the same one-line error),
    and rank 0 releases the lock at the end."""
    make_run_dir(Path(run_dir), env)
    lock, error = None, None
    if env.is_main:
        try:
            lock = RunLock(run_dir).acquire(take_over)
        except ConfigError as e:
            error = str(e)
    error = dist.from_rank0(error)
    if error is not None:
        raise ConfigError(error)
    if lock is not None and lock.note:
        print(f"note: {lock.note}", flush=True)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()

"""Faults: everything that can stop, skip or undo a training step, behind one object.

`FaultGuard` is asked twice per step, on every rank:

    guard.before_step(step)                 heartbeat; test-only injection (kill, hang, signal)
    verdict = guard.after_loss(loss, position, grad_norm)
                                            one all-reduce: stop signals, non-finite loss, the global
                                            loss and gradient norm (loss spikes)
                                            -> PROCEED | SKIP | ROLLED_BACK, or NonFiniteLoss / LossSpikes

Stop signals. SIGTERM, SIGUSR1 and SIGUSR2 (SLURM's warning before a time limit or preemption;
submitit's default is USR2) only set a flag in the handler. The per-step all-reduce makes every
rank see the same request at the same step boundary; the step still completes, then the loop
saves one checkpoint on every rank and rank 0 leaves `requeue.json` in the run directory. The
ranks then exit 0: torchrun turns a failed worker into a restart or exit status 1, so the request
to requeue must not ride on the exit status. The launchers (slurm/train.sh, launch/submit.py)
requeue the job when they find the marker. A run that completes (final.json written) removes the
marker an earlier stop left, whatever launched it.

Non-finite losses follow `train.nan_policy`: skip the step, roll back to the latest checkpoint and
skip the offending global batch from then on, or stop: every rank raises `NonFiniteLoss`, a
refusal (dist.refuse: one line, exit 3).

Finite loss spikes follow `train.spike_policy` (off | warn | skip | rollback; training/spikes.py):
the agreement carries the step's global loss and gradient norm, so every rank sees the same z-scores
before the optimizer step and takes the same action; a rollback skips the `train.spike_skip_batches`
global batches that end at the spike and counts against `train.nan_max_rollbacks`.

The heartbeat. Each rank records in the rendezvous store how far it got, (step, phase): one small
write before the step's forward/backward and one before the agreement, and a daemon thread counts a
beat up every 2 s (`BEAT_S`) with the rank's host beside it. When a collective fails or times out
(`train.timeout_s`), `named_collective_failures` turns the error into one line naming the rank(s)
whose beat stopped (a SIGSTOPped or frozen process: its record may equal the others'; reading the
beats twice costs 5 s), else the rank(s) furthest behind. If the store itself goes away (plain `torchrun` whose agent was killed by
a signal sent to its process group: torchrun starts every rank in a session of its own, so such a
signal reaches the agent only) the heartbeat stops writing instead of failing the run, and the ranks,
orphaned, see that their parent is no longer the agent that started them: that counts as a stop
request (AGENT_LOST), agreed and saved like a signal, since nothing would ever restart them.

Fault injection for the tests (the DIST_GPT_FAULT_* variables) lives in dist_gpt/hooks.py.
"""

from __future__ import annotations

import contextlib
import datetime
import enum
import os
import socket
import sys
import threading
import time
from pathlib import Path

import torch

from dist_gpt.errors import PeerLost, Refusal
from dist_gpt.hooks import FaultInjector
from dist_gpt.parallel import dist

from .signals import AGENT_LOST, CODE_TO_NAME, MARKER, StopSignals, write_marker
from .spikes import MAX_SKIPS_IN_A_ROW, Spike, SpikeDetector


class Verdict(enum.Enum):
    PROCEED = "proceed"          # take the optimizer step
    SKIP = "skip"                # drop this step's gradients (nan_policy=skip, spike_policy=skip)
    ROLLED_BACK = "rolled back"  # the state was reloaded from the latest checkpoint


class FaultGuard:
    """The heartbeat, the stop-signal agreement, the NaN and spike policies and the test-only fault injection.

    `rollback()` reloads the latest checkpoint into the run's state and returns its path (None when
    there is none): the checkpointer's, handed over once at build time.
    """

    def __init__(self, cfg, env, stop: StopSignals, state, rollback, log) -> None:
        self.policy, self.max_rollbacks = cfg.nan_policy, cfg.nan_max_rollbacks
        self.stop, self.state, self.rollback, self.log = stop, state, rollback, log
        self.is_main, self.world_size = env.is_main, env.world_size
        self.inject = FaultInjector(env.rank, stop)
        self.spikes = SpikeDetector(cfg, state)
        self.spike_skip_batches = cfg.spike_skip_batches
        self.skips_in_a_row = 0  # consecutive steps spike_policy=skip dropped
        self.loss_sum = float("nan")  # the last agreed step's loss summed over the ranks (float32)
        self.stopped_by: str | None = None  # the agreed stop signal's name, once one arrived
        # torchrun's workers are its children; an orphaned worker is re-parented (to init or a subreaper)
        self.agent_pid = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None
        self.heartbeat = Heartbeat(env, self.agent_pid).start_beating()

    def before_step(self, step: int) -> None:
        self.inject.before_step(step)
        self.heartbeat.beat(step, phase=0)

    def after_loss(self, loss, position: int, grad_norm=None) -> Verdict:
        """Agree with every rank on stop signals, a non-finite loss (of global batch `position`) and,
        with train.spike_policy on, a loss spike: one all-reduce (sum) of
        [one flag per stop code..., non-finite, loss, grad norm (rank 0's; the same on every rank)]."""
        loss = self.inject.corrupt_loss(loss, position)
        self.heartbeat.beat(self.state.step, phase=1)
        code = self.stop.code or (AGENT_LOST if self.agent_pid not in (None, os.getppid()) else 0)
        codes = [float(c == code) for c in CODE_TO_NAME]
        norm = grad_norm.float().reshape(1) if grad_norm is not None and self.is_main else loss.new_zeros(1)
        agreed = dist.all_reduce_sum(torch.cat([
            torch.tensor(codes, device=loss.device), (~torch.isfinite(loss)).float().reshape(1),
            loss.float().reshape(1), norm]))
        *flags, nonfinite, self.loss_sum, norm = agreed.tolist()  # the step's one host-device synchronisation
        code = max((c for c, flag in zip(CODE_TO_NAME, flags) if flag), default=0)
        self.stopped_by = CODE_TO_NAME[code] if code else self.stopped_by
        if code == AGENT_LOST:  # a rank whose beat above ran just before the agent exited learns it here:
            self.heartbeat.beat(self.state.step, phase=1)  # every rank says once that the agent is gone
        if nonfinite:
            return self._nonfinite(position)
        if self.spikes.on and grad_norm is not None:
            return self._spike(position, norm)
        return Verdict.PROCEED

    def global_loss(self) -> float:
        """The last agreed step's loss, mean over the ranks (float32 arithmetic, as logged before)."""
        return (torch.tensor(self.loss_sum, dtype=torch.float32) / self.world_size).item()

    def _nonfinite(self, position: int) -> Verdict:
        """Apply train.nan_policy to a NaN/inf loss of global batch `position` (every rank agrees)."""
        where = f"non-finite loss at step {self.state.step} (global batch {position})"
        if self.policy == "skip":
            self.state.skipped.append(position)
            self.log.print(f"{where}: step skipped (train.nan_policy=skip)")
            return Verdict.SKIP
        if self.policy == "stop":
            raise NonFiniteLoss(f"{where}; stopping (train.nan_policy=stop; try nan_policy=rollback or a lower optim.lr)")
        stop = NonFiniteLoss(f"{where}: {self.state.rollbacks} rollbacks already; stopping "
                             "(raise train.nan_max_rollbacks or lower optim.lr)")
        path = self._roll_back([position], stop)
        if path is None:
            raise NonFiniteLoss(f"{where}: no checkpoint to roll back to; stopping "
                                "(raise train.nan_max_rollbacks or lower optim.lr)")
        self.log.print(f"{where}: rolled back to {path.name}, skipping that batch (rollback {self.state.rollbacks})")
        return Verdict.ROLLED_BACK

    def _roll_back(self, positions: list[int], too_many: Refusal) -> Path | None:
        """Reload the latest checkpoint and skip the global batches `positions` from then on; raise
        `too_many` past train.nan_max_rollbacks. None (nothing changed) when there is no checkpoint."""
        if self.state.rollbacks >= self.max_rollbacks:
            raise too_many
        learnt = {"bad_positions": sorted(set(self.state.bad_positions) | set(positions)),
                  "rollbacks": self.state.rollbacks + 1, "spikes": self.state.spikes}
        path = self.rollback()  # reloads the run state too: what we learnt is put back below
        if path is not None:
            for key, value in learnt.items():
                setattr(self.state, key, value)
        return path

    def _spike(self, position: int, grad_norm: float) -> Verdict:
        """Apply train.spike_policy to this step's global loss and gradient norm (every rank agrees)."""
        spike = self.spikes.check(self.state.step, position, self.global_loss(), grad_norm)
        if spike is None:
            self.skips_in_a_row = 0
            return Verdict.PROCEED
        self.state.spikes += 1
        policy = self.spikes.policy
        if policy == "warn":
            return self._report(spike, "update taken (train.spike_policy=warn)", Verdict.PROCEED)
        if policy == "rollback":
            first = max(0, position - self.spike_skip_batches + 1)
            stop = LossSpikes(f"{spike.describe()}: {self.state.rollbacks} rollbacks already; stopping (raise "
                              "train.nan_max_rollbacks, lower optim.lr or raise train.spike_z)")
            path = self._roll_back(list(range(first, position + 1)), stop)
            if path is not None:
                return self._report(spike, f"rolled back to {path.name}, skipping global batches {first}..{position} "
                                    f"(rollback {self.state.rollbacks})", Verdict.ROLLED_BACK)
        self.skips_in_a_row += 1
        if self.skips_in_a_row > MAX_SKIPS_IN_A_ROW:
            raise LossSpikes(f"{spike.describe()}: {MAX_SKIPS_IN_A_ROW} steps in a row skipped; the loss has "
                             "shifted, not spiked: stopping (use train.spike_policy=rollback, lower optim.lr "
                             "or raise train.spike_z)")
        self.state.skipped.append(position)
        why = "no checkpoint to roll back to yet: " if policy == "rollback" else ""
        return self._report(spike, f"{why}update skipped (train.spike_policy={policy})", Verdict.SKIP)

    def _report(self, spike: Spike, action: str, verdict: Verdict) -> Verdict:
        """One spike on the console, TensorBoard (text, train/spikes, z-scores) and metrics.jsonl."""
        line = f"{spike.describe()}: {action}"
        self.log.print(line)
        self.log.text(spike.step, "train/spikes", line)
        self.log.scalars(spike.step, {"train/spikes": self.state.spikes, "train/spike_loss_z": spike.loss_z,
                                      "train/spike_grad_norm_z": spike.grad_norm_z})
        self.log.event(spike.step, "spike", {**vars(spike), "action": action})
        return verdict

    def leave_marker(self, run_dir: Path, step: int, checkpoint: Path | None) -> None:
        """After the stop save: rank 0 writes requeue.json for the launchers."""
        if not self.is_main:
            return
        write_marker(run_dir, self.stopped_by, step, checkpoint)
        if self.stopped_by == CODE_TO_NAME[AGENT_LOST]:
            self.log.print(f"torchrun's agent (pid {self.agent_pid}) is gone, killed by a signal it does not handle? "
                           f"saved {checkpoint} at step {step}; run the same command again to resume "
                           "(torchrun --signals-to-handle=...,SIGUSR1,SIGUSR2 forwards those signals instead)")
        else:
            self.log.print(f"{self.stopped_by}: saved {checkpoint} at step {step}; requeue marker written")


    def remove_marker(self, run_dir: Path) -> None:
        """After the run completed (final.json written): rank 0 removes a requeue.json left by an
        earlier stop of this run, on every launch path, so nothing requeues a finished run."""
        if self.is_main:
            (Path(run_dir) / MARKER).unlink(missing_ok=True)



# ---------------------------------------------------------------------------------------------
# A rank that stops answering

_KEY = "dist_gpt/heartbeat/{}"
_BEAT_KEY = "dist_gpt/beat/{}"
HOST_KEY = "dist_gpt/host/{}"
BEAT_S = 2.0  # a rank's beat advances this often while its process runs


class Heartbeat:
    """Each rank's (step, phase) in the rendezvous store; read back to name a rank that went silent.

    Phases of step S: 0 entered its forward/backward (whose backward all-reduces the gradients),
    1 entered the stop/NaN agreement.
    """

    PHASES = ("in the forward/backward (gradient all-reduce) of", "in the stop/NaN agreement of")

    def __init__(self, env, agent_pid: int | None = None) -> None:
        self.rank, self.world_size = env.rank, env.world_size
        self.store = dist.default_store() if env.distributed else None
        self.agent_pid = agent_pid  # torchrun's agent, which hosts the store (None: not under torchrun)

    def start_beating(self) -> "Heartbeat":
        """Record this rank's host, and count up in the store every BEAT_S seconds from a daemon thread
        while the process runs: a rank stopped (SIGSTOP, a frozen node) stops counting, even when its
        (step, phase) record equals the others'."""
        if self.store is not None:
            self.store.set(HOST_KEY.format(self.rank), socket.gethostname())
            threading.Thread(target=self._beat_forever, name="dist_gpt-heartbeat", daemon=True).start()
        return self

    def _beat_forever(self) -> None:
        count = 0
        while (store := self.store) is not None:
            if self.agent_pid is not None and os.getppid() != self.agent_pid:
                return  # the agent, and its store, is gone: beat() says so once, without the client's C++ stack
            count += 1
            try:
                store.set(_BEAT_KEY.format(self.rank), str(count))
            except Exception:  # the store's host is gone: beat() says so once
                return
            time.sleep(BEAT_S)

    def beat(self, step: int, phase: int) -> None:
        if self.store is None:
            return
        if self.agent_pid is not None and os.getppid() != self.agent_pid:
            # The agent, and the store with it, is gone (this rank was re-parented): writing would fail
            # anyway, and the store's client would print a 22-frame C++ stack before the error reached us.
            self.store = None
            print(f"warning: rank {self.rank}: torchrun's agent (pid {self.agent_pid}) is gone, and the rendezvous "
                  "store with it; the heartbeat is off for the rest of this run", file=sys.stderr)
            return
        try:
            self.store.set(_KEY.format(self.rank), f"{step} {phase}")
        except Exception as e:  # the store's host (torchrun's agent) is gone; the ranks are not
            self.store = None
            print(f"warning: rank {self.rank}: the rendezvous store stopped answering ({str(e)[:80]}); "
                  "the heartbeat is off for the rest of this run", file=sys.stderr)

    def records(self) -> dict[int, tuple[int, int]]:
        store, seen = dist.default_store(), {}
        try:
            store.set_timeout(datetime.timedelta(seconds=10))
            for rank in range(self.world_size):
                if store.check([_KEY.format(rank)]):
                    step, phase = store.get(_KEY.format(rank)).decode().split()
                    seen[rank] = (int(step), int(phase))
        except Exception:  # the store's host is gone too: say what we know
            pass
        return seen

    def _read(self, key: str) -> dict[int, str]:
        """{rank: value} of `key` for every rank that wrote it ({} when the store is gone)."""
        store, out = dist.default_store(), {}
        try:
            store.set_timeout(datetime.timedelta(seconds=10))
            for rank in range(self.world_size):
                if store.check([key.format(rank)]):
                    out[rank] = store.get(key.format(rank)).decode()
        except Exception:
            pass
        return out

    def stopped_beating(self) -> list[int]:
        """The other ranks whose beat did not advance over 2.5 beat periods (waits that long)."""
        before = self._read(_BEAT_KEY)
        time.sleep(2.5 * BEAT_S)
        after = self._read(_BEAT_KEY)
        return [r for r in sorted(before) if r != self.rank and after.get(r) == before[r]]

    def describe(self, error: BaseException, timeout_s: float) -> str:
        """One line naming the rank(s) that stopped answering, from the heartbeat records."""
        text = str(error).strip()
        cause = text.splitlines()[0][-160:] if text else type(error).__name__
        seen = self.records()
        missing = [r for r in range(self.world_size) if r not in seen]
        stopped = self.stopped_beating() if seen and not missing else []
        if stopped:
            hosts = self._read(HOST_KEY)
            detail = ", ".join(f"rank {r} on host {hosts.get(r, 'unknown')} (last heard {self.PHASES[seen[r][1]]} "
                               f"step {seen[r][0]})" for r in stopped)
            why = (f"the collective timed out after train.timeout_s={timeout_s:g} s"
                   if "timed out" in text.lower() else "a collective failed")
            return (f"rank {self.rank}: {detail} stopped beating: its process is alive but not running (stopped "
                    f"with SIGSTOP, a debugger, a frozen node?); {why} ({cause}). Check that rank's host; "
                    "restarted, the run resumes from its last checkpoint")
        if seen and not missing:
            lowest = min(seen.values())
            behind = [r for r, record in seen.items() if record == lowest]
            if len(behind) < self.world_size:
                # (no "how long ago": the records carry no time, since node clocks need not agree)
                detail = ", ".join(f"rank {r} (last heard {self.PHASES[seen[r][1]]} step {seen[r][0]})"
                                   for r in behind)
                why = (f"the collective timed out after train.timeout_s={timeout_s:g} s"
                       if "timed out" in text.lower() else "a collective failed")
                return (f"rank {self.rank}: {detail} stopped answering; {why} ({cause}). Check that "
                        "rank's host; restarted, the run resumes from its last checkpoint")
        if missing and seen:
            return (f"rank {self.rank}: rank(s) {', '.join(map(str, missing))} never reported and a "
                    f"collective failed ({cause}); check their hosts and the network between nodes")
        return (f"rank {self.rank}: a collective failed ({cause}); a peer may have died: check every "
                "rank's log")


class NonFiniteLoss(Refusal):
    """train.nan_policy stopped the run (exit status 3); every rank raises it at the same step."""

    exit_code = 3


class LossSpikes(Refusal):
    """train.spike_policy stopped the run (exit status 3): rollbacks used up, or a loss that kept
    spiking under skip; every rank raises it at the same step."""

    exit_code = 3


@contextlib.contextmanager
def named_collective_failures(env, timeout_s: float):
    """Turn a collective's timeout or a lost peer into PeerLost with one line naming the silent rank."""
    try:
        yield
    except RuntimeError as e:
        if not env.distributed or not dist.is_collective_failure(e):
            raise
        raise PeerLost(Heartbeat(env).describe(e, timeout_s)) from None

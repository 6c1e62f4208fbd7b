"""Stragglers: which rank is slow, measured without the collectives' waits.

In synchronous data parallel every rank's wall step time is the same, because the gradient
all-reduce waits for the slowest rank. So each rank measures its own compute time:

    CPU   the training thread's CPU time (`time.thread_time`) over the step's data, forward,
          backward and optimizer. A rank blocked in a gloo collective waits on a condition
          variable and burns no CPU time, so the wait for a slow peer does not count; and CPU time,
          unlike wall time, does not grow when other processes share the cores, so two ranks doing
          the same work measure the same time on a loaded machine (the no-straggler test relies on it).
    CUDA  the GPU time of the forward passes (CUDA events recorded by forward hooks, no host sync):
          the backward holds DDP's gradient all-reduce, whose wait for the slowest rank would make
          every rank look as slow as it.

and its data-wait time (wall seconds in `_next_batch`). Nothing is read back until a log step;
then one all-reduce of a (world, 2) tensor gathers every rank's mean compute ms per step and
data-wait share, and rank 0 logs `ranks/compute_ms_median`, `ranks/compute_ms_max`, `ranks/slowest`
and `perf/data_wait_share_max`. A rank whose compute time is at least `train.straggler_ratio` times
the median of the other ranks for `train.straggler_intervals` consecutive log intervals is named,
with its host, in a warning (repeated each further interval it stays slow). The median of the
*other* ranks, so that on 2 ranks a ratio of 1.3 means 1.3 x the other rank.

Cost per step on CPU: four `time.thread_time()` calls (a system call, 8 us each on the 2-core AMD
EPYC, timeit over 200,000 calls), 32 us against a debug-preset step of about 10 ms of CPU time.
A debug step's CPU time varies by up to 1.5x between equal ranks from one step to the next on a
loaded machine, so log intervals of several steps (log.interval) average it out: the five 5-step
intervals of a 2-rank debug run (the preset's settings, load average above 16) gave slowest/other
ratios of 1.00 to 1.13.
"""

from __future__ import annotations

import statistics
import time

import torch

from dist_gpt.parallel import dist
from .faults import HOST_KEY



class RankClock:
    """This rank's compute and data-wait time since the last log step, and the straggler verdict."""

    def __init__(self, env, model: torch.nn.Module, ratio: float, intervals: int, log) -> None:
        self.rank, self.world_size, self.device = env.rank, env.world_size, env.device
        self.ratio, self.intervals, self.log = ratio, intervals, log
        self.cuda = env.device.type == "cuda"
        self.store = dist.default_store() if env.distributed else None  # each rank's host (faults.Heartbeat)
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        if self.cuda:  # training forwards only: evaluation may run the same module
            model.register_forward_pre_hook(lambda m, _: self._event_start() if _training(m) else None)
            model.register_forward_hook(lambda m, _, __: self._event_end() if _training(m) else None)
        self._reset()
        self.streak = 0  # consecutive log intervals the same rank was slow
        self.slow_rank = -1

    def _reset(self) -> None:
        self.compute, self.data_wait, self.steps = 0.0, 0.0, 0
        self.since = time.perf_counter()
        self.events.clear()

    def _event_start(self) -> None:
        self.events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
        self.events[-1][0].record()

    def _event_end(self) -> None:
        self.events[-1][1].record()

    def begin(self) -> float:
        """A mark at the start of a compute region (CPU: the thread's CPU time so far)."""
        return time.thread_time()

    def end(self, mark: float) -> None:
        if not self.cuda:
            self.compute += time.thread_time() - mark

    def step_done(self, data_wait: float) -> None:
        self.steps += 1
        self.data_wait += data_wait

    def report(self) -> dict:
        """On a log step, every rank: gather the interval's measurements (one all-reduce); returns the
        scalars rank 0 logs (and warns about a straggler)."""
        if self.cuda:
            torch.cuda.current_stream().synchronize()  # the log step's loss read-back syncs anyway
            self.compute = sum(a.elapsed_time(b) for a, b in self.events) / 1000
        wall = time.perf_counter() - self.since
        table = torch.zeros(self.world_size, 2, device=self.device, dtype=torch.float64)
        table[self.rank, 0] = 1000 * self.compute / max(1, self.steps)
        table[self.rank, 1] = self.data_wait / wall if wall > 0 else 0.0
        table = dist.all_reduce_sum(table).cpu().tolist()
        self._reset()
        compute = [row[0] for row in table]
        slowest = max(range(self.world_size), key=lambda r: compute[r])
        self._check(compute, slowest)
        return {"ranks/compute_ms_median": statistics.median(compute), "ranks/compute_ms_max": compute[slowest],
                "ranks/slowest": slowest, "perf/data_wait_share_max": max(row[1] for row in table)}

    def _check(self, compute: list[float], slowest: int) -> None:
        if self.world_size < 2:
            return
        others = statistics.median(c for r, c in enumerate(compute) if r != slowest)
        slow = compute[slowest] >= self.ratio * others
        self.streak = self.streak + 1 if slow and slowest == self.slow_rank else int(slow)
        self.slow_rank = slowest if slow else -1
        if self.streak >= self.intervals:
            self.log.print(f"warning: straggler: rank {slowest} on host {self._host(slowest)} computed "
                           f"{compute[slowest]:.1f} ms per step, {compute[slowest] / others:.2f} x the other ranks' "
                           f"median {others:.1f} ms, for {self.streak} log intervals (train.straggler_ratio="
                           f"{self.ratio:g}); check that host (thermal throttling, a noisy neighbour, a slow disk "
                           "or network for its data)")

    def _host(self, rank: int) -> str:
        try:
            return self.store.get(HOST_KEY.format(rank)).decode()
        except Exception:  # the store's host is gone: the rank alone still helps
            return "unknown"


def _training(module: torch.nn.Module) -> bool:
    return module.training and torch.is_grad_enabled()

"""Every step's time of the classic and the modern recipe, side by side, and where the modern step goes.

    python -m bench.train_bench --modern-steady --steps 410 --warmup 10 --chunk 20
    taskset -c 0 python -m bench.train_bench --modern-steady --steps 410 --chunk 20      # pinned to core 0
    taskset -c 1 python -m dist_gpt.train --preset cpu --train.steps 100000 --train.run_dir /tmp/neigh  # a neighbour
    python -m bench.train_bench --modern-steady --precisions fp32 --steps 110             # one precision

(`python -m bench.step_steady ...` is the same.) At the `cpu` preset's model (4 x 4 x 128, vocab 256)
with context 64, batch 12 and ONE thread unless the command line says otherwise (any
`--section.key=value` of `python -m dist_gpt.train` applies to every side), it builds four trainers
with `dist_gpt.training.trainer.build`: classic and modern, each at every precision of `--precisions`
(default bf16 autocast and fp32, pinned, not `auto`). After `--warmup` steps each, it runs them in
rounds of `--chunk` steps per side, the order reversed every round, so a busy neighbour slows every
side alike, and records every step's wall time (`Trainer.step()`, as the training loop's
perf/step_time_ms measures it on a log step).

Per side it prints the median step, p90/median and p99/median (how steady), the minor page faults
and involuntary context switches per step (getrusage, per chunk), the median and p90/median of the
step's CPU time (the process's, all threads: time-slicing with other processes leaves it alone,
extra work raises it, so the two tell a busy machine from a slower step), the modern/classic ratio
(the median over rounds of the ratio of the chunks' medians; in wall and in CPU time) and a
histogram of step time over the median. Then every side's step in CPU time (on an idle machine and
one thread, the wall time), over `--breakdown` further steps with timers on: forward (the
model's forward hooks), backward (forward's end to the last gradient accumulated), Newton-Schulz
(Muon's orthogonalisation), the rest of the optimizers (AdamW, Muon's momentum and update), and the
rest of the step (data, the fault guard's agreement, clipping, zeroing the gradients); medians in ms.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

from bench.train_bench import DistGPTSide, describe_machine
from dist_gpt import config as config_mod
from dist_gpt.errors import ConfigError
from dist_gpt.parallel import dist
from dist_gpt.training.run_files import resolve_model_config
from dist_gpt.training.trainer import open_dataset

RECIPES = ("classic", "modern")
# The shape the numbers were measured at: the cpu preset's model, context 64, batch 12, one thread.
SHAPE = {"model.block_size": 64, "train.global_batch": 12, "train.micro_batch": 12, "train.threads": 1}
# Histogram bins of step time / the side's median (upper edges; the last bin is everything above).
BINS = (0.9, 1.0, 1.1, 1.2, 1.3, 1.5, 2.0)


@dataclass
class Track:
    """One side's record: every steady step's time, and the rusage counters per step of each chunk."""

    side: DistGPTSide
    recipe: str
    precision: str
    step_ms: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)  # the process's CPU time per step (time.process_time)
    chunk_cpu_median: list[float] = field(default_factory=list)
    chunk_median: list[float] = field(default_factory=list)
    faults: int = 0            # minor page faults during the steady chunks
    switches: int = 0          # involuntary context switches during the steady chunks

    def run_chunk(self, steps: int) -> None:
        before = resource.getrusage(resource.RUSAGE_SELF)
        times = []
        for _ in range(steps):
            t0, c0 = time.perf_counter(), time.process_time()
            self.side.step()
            times.append(1000 * (time.perf_counter() - t0))
            self.cpu_ms.append(1000 * (time.process_time() - c0))
        after = resource.getrusage(resource.RUSAGE_SELF)
        self.faults += after.ru_minflt - before.ru_minflt
        self.switches += after.ru_nivcsw - before.ru_nivcsw
        self.step_ms += times
        self.chunk_median.append(statistics.median(times))
        self.chunk_cpu_median.append(statistics.median(self.cpu_ms[-steps:]))


def parse_args(argv: list[str]):
    p = argparse.ArgumentParser(prog="python -m bench.train_bench --modern-steady", allow_abbrev=False,
                                description=__doc__.split("\n\n")[0],
                                epilog="Any other option is a dist_gpt.train option (--section.key=value), "
                                       "applied to every side after the fixed shape.")
    p.add_argument("--modern-steady", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=210, help="steps per side, warm-up included (default 210)")
    p.add_argument("--warmup", type=int, default=10, help="first steps of each side, not recorded (default 10)")
    p.add_argument("--chunk", type=int, default=20, help="steps per side per round (default 20)")
    p.add_argument("--breakdown", type=int, default=20,
                   help="steps of each side timed phase by phase afterwards (default 20; 0 = none)")
    p.add_argument("--precisions", default="bf16,fp32",
                   help="comma-separated train.precision values (default bf16,fp32)")
    args, rest = p.parse_known_args(argv)
    if args.steps < args.warmup + args.chunk or args.warmup < 1 or args.chunk < 1 or args.breakdown < 0:
        raise ConfigError(f"--steps={args.steps} must be at least --warmup={args.warmup} (>= 1) + --chunk={args.chunk} "
                          "(>= 1), and --breakdown >= 0")
    precisions = [p for p in args.precisions.split(",") if p]
    for prec in precisions:
        if prec not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"--precisions: {prec!r} is not one of fp32 | bf16 | fp16 (pinned, so not auto)")
    return args, precisions, config_mod.parse_argv(rest)


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by the nearest-rank method."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def histogram(step_ms: list[float]) -> str:
    """Counts of step time / median in BINS, as `<=0.9 3 | <=1.0 97 | ... | >2.0 0`."""
    med = statistics.median(step_ms)
    counts = [0] * (len(BINS) + 1)
    for t in step_ms:
        counts[next((i for i, edge in enumerate(BINS) if t / med <= edge), len(BINS))] += 1
    labels = [f"<={edge:g}" for edge in BINS] + [f">{BINS[-1]:g}"]
    return " | ".join(f"{label} {n}" for label, n in zip(labels, counts))


class PhaseTimer:
    """CPU time (time.process_time) of one trainer's step phases, from hooks (CPU: every kernel runs
    synchronously, so a phase's kernels run between its hooks; on a busy machine wall time would
    count the other processes' time slices too).

    forward: the trained model's forward hooks; backward: forward's end to the last gradient
    accumulated; optimizers: every optimizer's step hooks; newton_schulz: Muon's `_orthogonalise`
    (wrapped on the instance). Removed by `close()`, so the recorded steps run without them."""

    def __init__(self, trainer):
        self.marks: dict[str, float] = {}
        self.spent = {"optimizers": 0.0, "newton_schulz": 0.0}
        model = trainer.train_model
        self.handles = [model.register_forward_pre_hook(lambda m, a: self._mark("f0")),
                        model.register_forward_hook(lambda m, a, o: self._mark("f1"))]
        self.handles += [p.register_post_accumulate_grad_hook(lambda p: self._mark("b1")) for p in trainer.params]
        for opt in trainer.optimizers:
            self.handles += [opt.register_step_pre_hook(lambda o, a, k: self._mark("o0")),
                             opt.register_step_post_hook(lambda o, a, k: self._add("optimizers", "o0"))]
        self.muons = [opt for opt in trainer.optimizers if hasattr(opt, "_orthogonalise")]
        for opt in self.muons:
            opt._orthogonalise = self._timed(opt._orthogonalise)

    def _mark(self, name: str) -> None:
        self.marks[name] = time.process_time()

    def _add(self, key: str, start: str) -> None:
        self.spent[key] += time.process_time() - self.marks[start]

    def _timed(self, fn):
        def timed(*args, **kwargs):
            t0 = time.process_time()
            out = fn(*args, **kwargs)
            self.spent["newton_schulz"] += time.process_time() - t0
            return out
        return timed

    def step(self, side: DistGPTSide) -> dict[str, float]:
        """One timed step -> ms of forward, backward, newton_schulz, optimizer_rest, other."""
        self.marks.clear()
        self.spent = {"optimizers": 0.0, "newton_schulz": 0.0}
        t0 = time.process_time()
        side.step()
        total = time.process_time() - t0
        fwd, bwd = self.marks["f1"] - self.marks["f0"], self.marks["b1"] - self.marks["f1"]
        ns, opt = self.spent["newton_schulz"], self.spent["optimizers"]
        parts = {"forward": fwd, "backward": bwd, "newton_schulz": ns, "optimizer_rest": opt - ns,
                 "other": total - fwd - bwd - opt, "total": total}
        return {k: 1000 * v for k, v in parts.items()}

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        for opt in self.muons:
            del opt._orthogonalise  # the class's method again


def breakdown(track: Track, steps: int) -> dict[str, float]:
    """Median ms per phase of `steps` steps with timers on."""
    timer = PhaseTimer(track.side.trainer)
    try:
        rows = [timer.step(track.side) for _ in range(steps)]
    finally:
        timer.close()
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def build_tracks(cl, precisions, env, data, total_steps: int) -> list[Track]:
    tracks = []
    for prec in precisions:
        for recipe in RECIPES:
            overrides = {**SHAPE, **cl.overrides, "train.recipe": recipe, "train.precision": prec}
            cfg = config_mod.build(cl.preset or "cpu", cl.config_file, overrides)
            cfg.model = resolve_model_config(cfg.model, data)
            tracks.append(Track(DistGPTSide(recipe[0].upper() + prec, f"{recipe} {prec}", cfg, env, total_steps),
                                recipe, prec))
    return tracks


def measure(tracks: list[Track], args) -> None:
    for t in tracks:
        t.side.run(args.warmup, count_data=False)
    rounds = (args.steps - args.warmup) // args.chunk
    for r in range(rounds):
        for t in (tracks if r % 2 == 0 else tracks[::-1]):  # reversed every round: drift cancels
            t.run_chunk(args.chunk)


def report(tracks: list[Track], args, say) -> None:
    say(f"{'side':<14} {'steps':>6} {'median ms':>10} {'p90/median':>11} {'p99/median':>11} {'max/median':>11} "
        f"{'faults/step':>12} {'invol. cs/step':>15} {'CPU ms':>7} {'CPU p90/med':>11}")
    for t in tracks:
        med, n = statistics.median(t.step_ms), len(t.step_ms)
        say(f"{t.side.name:<14} {n:>6} {med:>10.2f} {percentile(t.step_ms, 0.9) / med:>11.3f} "
            f"{percentile(t.step_ms, 0.99) / med:>11.3f} {max(t.step_ms) / med:>11.3f} {t.faults / n:>12.1f} "
            f"{t.switches / n:>15.2f} {statistics.median(t.cpu_ms):>7.2f} "
            f"{percentile(t.cpu_ms, 0.9) / statistics.median(t.cpu_ms):>11.3f}")
    for prec in dict.fromkeys(t.precision for t in tracks):
        classic, modern = (next(t for t in tracks if t.precision == prec and t.recipe == r) for r in RECIPES)
        ratios = [m / c for m, c in zip(modern.chunk_median, classic.chunk_median)]
        cpu = [m / c for m, c in zip(modern.chunk_cpu_median, classic.chunk_cpu_median)]
        say(f"modern/classic {prec}: {statistics.median(ratios):.3f} (median of {len(ratios)} rounds' chunk-median "
            f"ratios; min {min(ratios):.3f}, max {max(ratios):.3f}); in CPU time {statistics.median(cpu):.3f}")
    say("(wall time; CPU ms: the process's CPU time per step, which time-slicing with other processes "
        "does not inflate and extra work, such as page faults or slow arithmetic, does)")
    say("step time / median (count of steps):")
    for t in tracks:
        say(f"  {t.side.name:<12} {histogram(t.step_ms)}")
    if args.breakdown:
        say(f"the step by phase, CPU ms (median of {args.breakdown} steps with timers on):")
        for t in tracks:
            parts = breakdown(t, args.breakdown)
            say(f"  {t.side.name:<12} " + " | ".join(f"{k} {v:.2f}" for k, v in parts.items()))


def run(argv: list[str]) -> int:
    args, precisions, cl = parse_args(argv)
    base = config_mod.build(cl.preset or "cpu", cl.config_file, {**SHAPE, **cl.overrides})
    env = dist.init(base.train.device, base.train.timeout_s, base.train.threads, base.parallel.data)
    say = print if env.is_main else (lambda *a, **k: None)
    data = open_dataset(base, env)
    base.model = resolve_model_config(base.model, data)
    total_steps = max(base.train.steps, args.steps + args.breakdown)
    tracks = build_tracks(cl, precisions, env, data, total_steps)
    say(describe_machine(env, base))
    rounds = (args.steps - args.warmup) // args.chunk
    say(f"sides: {', '.join(t.side.name for t in tracks)}; {args.warmup} warm-up steps each, then {rounds} rounds "
        f"of {args.chunk} steps per side, alternating (order reversed every round); LR schedule of {total_steps} steps")
    measure(tracks, args)
    report(tracks, args, say)
    return 0


def main() -> None:
    dist.run_main(run, sys.argv[1:])


if __name__ == "__main__":
    main()

"""What the long-run safeguards cost per step: the same trainer with and without each one, alternating.

    python -m bench.ops_bench                                  # cpu preset, classic, fp32, 1 thread
    python -m bench.ops_bench --steps 60 --chunk 10 --rounds 2 # a quick look
    python -m bench.ops_bench --recipe modern

Four sides are built from one config (`--preset cpu`, classic recipe, fp32, one thread, no
checkpoints, no evaluation; `--recipe` picks the recipe) and stepped with `Trainer.step()`:

    bare     the rank clock (training/stragglers.py) replaced by a clock that measures nothing,
             train.spike_policy=off: the step as it was before either existed
    clock    the rank clock as trained: four thread_time() reads per step
    spikes   bare + train.spike_policy=warn: the gradient norm before the agreement, three more
             floats on the agreement all-reduce, the z-scores on the host
    both     what a run with a spike policy trains

They run `--chunk` steps at a time in turn, the order rotating every round, so a neighbour's load
slows all alike; each prints its median ms/step over the chunks and the median over the rounds of
its per-round ratio to `bare`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from dist_gpt import config as config_mod
from dist_gpt.metrics import QuietLogger
from dist_gpt.parallel import dist
from dist_gpt.training.signals import StopSignals
from dist_gpt.training.trainer import build

SIDES = ("bare", "clock", "spikes", "both")


class NoClock:
    """A RankClock that measures nothing (the step before straggler detection existed)."""

    def begin(self):
        return None

    def end(self, mark) -> None:
        pass

    def step_done(self, data_time: float) -> None:
        pass

    def report(self):
        return None


def make_side(name: str, args, env):
    cfg = config_mod.build("cpu", None, {
        "train.recipe": args.recipe, "train.precision": "fp32", "checkpoint.interval": 0, "checkpoint.resume": "none",
        "train.steps": args.total, "eval.interval": 0, "eval.at_start": False,
        "train.spike_policy": "warn" if name in ("spikes", "both") else "off",
        "train.run_dir": f"/tmp/dist_gpt-ops_bench-{name}"})
    trainer = build(cfg, env, StopSignals(), log=QuietLogger(cfg.log, args.total))
    if name in ("bare", "spikes"):
        trainer.clock = NoClock()
    return trainer


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.ops_bench", allow_abbrev=False,
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", choices=("classic", "modern"), default="classic", help="train.recipe (default classic)")
    p.add_argument("--chunk", type=int, default=20, help="steps per timed chunk (default 20)")
    p.add_argument("--rounds", type=int, default=10, help="rounds of one chunk per side (default 10)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps per side first (default 10)")
    args = p.parse_args()
    args.total = args.warmup + args.chunk * args.rounds
    torch.set_num_threads(1)
    env = dist.init(device="cpu", threads=1)
    trainers = {name: make_side(name, args, env) for name in SIDES}
    for t in trainers.values():
        for _ in range(args.warmup):
            t.step()
    chunks: dict[str, list[float]] = {name: [] for name in SIDES}
    for r in range(args.rounds):
        order = SIDES[r % len(SIDES):] + SIDES[:r % len(SIDES)]
        for name in order:
            t0 = time.perf_counter()
            for _ in range(args.chunk):
                trainers[name].step()
            chunks[name].append(1000 * (time.perf_counter() - t0) / args.chunk)
        print(f"  round {r + 1}/{args.rounds}: " + "  ".join(f"{n} {chunks[n][-1]:.2f}" for n in SIDES), flush=True)
    print(f"\nops_bench: torch {torch.__version__}, cpu, 1 thread, {args.recipe} recipe, fp32, "
          f"{args.rounds} rounds x {args.chunk} steps per side, alternating")
    for name in SIDES:
        ratios = [c / b for c, b in zip(chunks[name], chunks["bare"])]
        print(f"{name:7s} median {statistics.median(chunks[name]):7.2f} ms/step   /bare {statistics.median(ratios):.4f}"
              f"   (rounds {min(ratios):.3f}..{max(ratios):.3f})")
    sys.stdout.flush()


if __name__ == "__main__":
    main()

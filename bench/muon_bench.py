"""Muon's cost at the CPU benchmark shape: Newton-Schulz time per step, and the modern/classic
step-time ratio, before (torch.optim.Muon, one matrix at a time) and after (dist_gpt.optim.muon, batched).

    python -m bench.muon_bench                                   # the cpu preset, 4 x 4 x 128, context 64, batch 12
    python -m bench.muon_bench --train.threads=1 --train.precision=bf16 --rounds 20
    python -m bench.muon_bench --optimizer-only                  # part 1 only (no training steps)
    torchrun --standalone --nproc_per_node=2 -m bench.muon_bench --train.micro_batch=6   # DDP: each rank's share

The shape is the CPU benchmark's (`--preset cpu --model.block_size=64 --train.global_batch=12
--train.micro_batch=12 --model.vocab_size=0`); any `--section.key=value` of `python -m
dist_gpt.train` overrides it. Threads, precision and `optim.muon_ns_steps` are the config's, the
same for every variant; in an fp32 run (`train.precision` fp32, or auto on a CPU without native
bf16) Newton-Schulz runs in fp32, as the trainer does, else in torch's bf16.

1. The Muon step alone, on the model's block matrices with fixed random gradients: `before` is
   torch.optim.Muon as dist_gpt ran it until dist_gpt.optim.muon (fp32 runs: with the fp32 iteration in
   place of torch's bf16 one), `one by one` is dist_gpt.optim.muon with batched=False, `batched` its
   default. Under torchrun, dist_gpt.optim.muon divides the work among the ranks (the DDP group) and
   `before` does all of it on every rank. Printed: ms per step in Newton-Schulz and in the whole
   step (medians over --rounds rounds of --steps steps, the variants' order rotating each round),
   and whether the variants' weights stayed bit for bit equal.
2. Training steps (bench/train_bench.py's sides, the trainer's own step functions): classic,
   modern with `before`, modern with dist_gpt.optim.muon, alternating --chunk steps at a time; printed:
   ms per step and the modern/classic ratio of each (medians of the per-round ratios).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial

import torch

from bench.train_bench import build_side, describe_machine
from dist_gpt import config as config_mod
from dist_gpt.parallel import dist
from dist_gpt.errors import ConfigError
from dist_gpt.model.gpt import GPT
from dist_gpt.optim.muon import Muon, newton_schulz
from dist_gpt.optim.optimizers import split_params
from dist_gpt.parallel.precision import Precision
from dist_gpt.training.run_files import resolve_model_config
from dist_gpt.training.trainer import open_dataset

SHAPE = ["--preset", "cpu", "--model.block_size=64", "--train.global_batch=12", "--train.micro_batch=12",
         "--model.vocab_size=0"]


class Timer:
    """Seconds spent inside the wrapped calls (CPU work is synchronous; on CUDA it synchronises)."""

    def __init__(self, device: torch.device):
        self.seconds, self.cuda = 0.0, device.type == "cuda"

    def wrap(self, fn):
        def timed(*args, **kwargs):
            if self.cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            if self.cuda:
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - t0
            return out
        return timed


class BeforeMuon(torch.optim.Muon if hasattr(torch.optim, "Muon") else torch.optim.Optimizer):
    """torch.optim.Muon as dist_gpt's trainer ran it before dist_gpt.optim.muon: in fp32 runs with torch's
    private Newton-Schulz swapped for the same iteration in fp32 (then called ExactMuon)."""

    def __init__(self, param_groups: list[dict], ns_dtype: torch.dtype, timer: Timer):
        super().__init__([dict(g) for g in param_groups])
        self.ns_dtype, self.timer = ns_dtype, timer

    def step(self, closure=None):
        import torch.optim._muon as muon_impl

        original = muon_impl._zeropower_via_newtonschulz
        if self.ns_dtype == torch.float32:
            def ns(grad, coefficients, steps, eps):
                return newton_schulz(grad, coefficients, steps, eps, torch.float32)  # a 2-D grad: the same ops
        else:
            ns = original
        muon_impl._zeropower_via_newtonschulz = self.timer.wrap(ns)
        try:
            return super().step(closure)
        finally:
            muon_impl._zeropower_via_newtonschulz = original


def timed_muon(muon: Muon, timer: Timer) -> Muon:
    muon._newton_schulz = timer.wrap(muon._newton_schulz)
    return muon


# ---------------------------------------------------------------------------------------------
# 1. The Muon step alone


def _variant(name: str, model: GPT, cfg, ns_dtype, group, grads: list[torch.Tensor], timer: Timer):
    """A fresh copy of the block matrices with the given gradients, and its Muon."""
    params = [torch.nn.Parameter(p.detach().clone()) for p in split_params(model, True)["muon"]]
    for p, g in zip(params, grads):
        p.grad = g
    settings = dict(lr=cfg.optim.muon_lr, momentum=cfg.optim.muon_momentum,
                    weight_decay=cfg.optim.muon_weight_decay, ns_steps=cfg.optim.muon_ns_steps)
    if name == "before":
        return params, BeforeMuon([{"params": params, **settings}], ns_dtype, timer)
    return params, timed_muon(Muon(params, **settings, ns_dtype=ns_dtype, process_group=group,
                                   batched=name == "batched"), timer)


def optimizer_only(cfg, env, ns_dtype, args, say) -> None:
    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model).to(env.device)
    g = torch.Generator(device=env.device).manual_seed(0)
    grads = [torch.randn(p.shape, generator=g, device=env.device) for p in split_params(model, True)["muon"]]
    group = torch.distributed.group.WORLD if env.distributed else None
    names = ["before", "one by one", "batched"] if hasattr(torch.optim, "Muon") else ["one by one", "batched"]
    timers = {name: Timer(env.device) for name in names}
    variants = {name: _variant(name, model, cfg, ns_dtype, group, grads, timers[name]) for name in names}
    ns_ms: dict[str, list[float]] = {name: [] for name in names}
    step_ms: dict[str, list[float]] = {name: [] for name in names}
    for name in names:  # warm-up: first-touch memory, allocator caches
        variants[name][1].step()
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            opt, timer = variants[name][1], timers[name]
            timer.seconds = 0.0
            t0 = time.perf_counter()
            for _ in range(args.steps):
                opt.step()
            step_ms[name].append(1000 * (time.perf_counter() - t0) / args.steps)
            ns_ms[name].append(1000 * timer.seconds / args.steps)
    matrices = len(grads)
    say(f"1. Muon step alone: {matrices} matrices ({', '.join(sorted({'x'.join(map(str, g.shape)) for g in grads}))}), "
        f"Newton-Schulz in {str(ns_dtype).removeprefix('torch.')}, {cfg.optim.muon_ns_steps} iterations, "
        f"{args.rounds} rounds of {args.steps} steps" + (f", this is rank {env.rank} of {env.world_size}" if env.distributed else ""))
    say(f"   {'variant':<12} {'NS ms/step':>11} {'(best)':>8} {'step ms':>9} {'(best)':>8}")
    for name in names:
        say(f"   {name:<12} {statistics.median(ns_ms[name]):>11.2f} {min(ns_ms[name]):>8.2f} "
            f"{statistics.median(step_ms[name]):>9.2f} {min(step_ms[name]):>8.2f}")
    first = names[0]
    for name in names[1:]:
        ratios = [a / b for a, b in zip(ns_ms[first], ns_ms[name])]
        say(f"   Newton-Schulz time, {first} / {name}: {statistics.median(ratios):.2f}x (median of the rounds' ratios)")
    same = all(torch.equal(a, b) for a, b in zip(variants[names[0]][0], variants[names[-1]][0]))
    say(f"   weights after {1 + args.rounds * args.steps} steps: {first} and batched bit for bit equal: {'yes' if same else 'no'}")


# ---------------------------------------------------------------------------------------------
# 2. Training steps


def training_steps(cl, env, ns_dtype, args, say) -> None:
    base = config_mod.build(cl.preset, cl.config_file, cl.overrides)
    data = open_dataset(base, env)
    total = max(base.train.steps, args.warmup + args.rounds * args.chunk)
    sides = {"classic": build_side("A", "train.recipe=classic", cl, env, data, total)}
    if hasattr(torch.optim, "Muon"):
        before = build_side("B", "train.recipe=modern", cl, env, data, total)
        optimizers = before.trainer.optimizers
        optimizers[1] = BeforeMuon(optimizers[1].param_groups, ns_dtype, Timer(env.device))
        sides["modern, before"] = before
    after = build_side("C", "train.recipe=modern", cl, env, data, total)
    if env.distributed:  # the DDP group, among which Muon divides its work
        after.trainer.optimizers[1].process_group = torch.distributed.group.WORLD
    sides["modern, dist_gpt.optim.muon"] = after
    names = list(sides)
    for side in sides.values():
        side.run(args.warmup, count_data=False)
    ms: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            ms[name].append(1000 * sides[name].run(args.chunk) / args.chunk)
    say(f"2. training steps: {args.warmup} warm-up, then {args.rounds} rounds of {args.chunk} steps per side, "
        f"alternating")
    say(f"   {'side':<24} {'ms/step':>8} {'(best)':>8} {'/ classic':>10}")
    for name in names:
        ratio = statistics.median(a / b for a, b in zip(ms[name], ms["classic"]))
        say(f"   {name:<24} {statistics.median(ms[name]):>8.2f} {min(ms[name]):>8.2f} {ratio:>9.2f}x")
    say("   (/ classic: median of the per-round ratios)")


def parse_args(argv: list[str]):
    p = argparse.ArgumentParser(prog="python -m bench.muon_bench", allow_abbrev=False,
                                description=__doc__.split("\n\n")[0],
                                epilog="Any other option is a dist_gpt.train option (--section.key=value); the "
                                       "defaults are the CPU benchmark shape: " + " ".join(SHAPE))
    p.add_argument("--rounds", type=int, default=10, help="rounds; each runs every variant/side once (default 10)")
    p.add_argument("--steps", type=int, default=5, help="part 1: optimizer steps per variant per round (default 5)")
    p.add_argument("--chunk", type=int, default=10, help="part 2: training steps per side per round (default 10)")
    p.add_argument("--warmup", type=int, default=5, help="part 2: first steps of each side, not timed (default 5)")
    p.add_argument("--optimizer-only", action="store_true", help="part 1 only")
    args, rest = p.parse_known_args(argv)
    if min(args.rounds, args.steps, args.chunk) < 1 or args.warmup < 0:
        raise ConfigError("--rounds, --steps and --chunk must be at least 1, --warmup at least 0")
    return args, config_mod.parse_argv(SHAPE + rest)


def run(argv: list[str]) -> int:
    args, cl = parse_args(argv)
    cfg = config_mod.build(cl.preset, cl.config_file, {**cl.overrides, "train.recipe": "modern"})
    env = dist.init(cfg.train.device, cfg.train.timeout_s, cfg.train.threads)
    say = partial(print, flush=True) if env.is_main else (lambda *a, **k: None)
    if cfg.model.vocab_size == 0:  # the dataset's; part 1 needs only a number
        cfg.model = resolve_model_config(cfg.model, open_dataset(cfg, env))
    precision = Precision(cfg.train.precision, env.device)
    ns_dtype = torch.float32 if precision.name == "fp32" else torch.bfloat16  # as build_optimizers(exact=...)
    say(describe_machine(env, cfg) + f"; precision {precision.name}")
    optimizer_only(cfg, env, ns_dtype, args, say)
    if not args.optimizer_only:
        training_steps(cl, env, ns_dtype, args, say)
    return 0


def main() -> None:
    dist.run_main(run, sys.argv[1:])


if __name__ == "__main__":
    main()

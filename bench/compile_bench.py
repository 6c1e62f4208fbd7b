"""What torch.compile costs and saves on a CPU, in CPU seconds, against the `train.compile=auto` rule.

    python -m bench.compile_bench --preset cpu                      # the default job's shape, modern
    python -m bench.compile_bench --preset cpu --recipe classic
    python -m bench.compile_bench --preset cpu --model.n_layer=8 --steps 40
    python -m bench.compile_bench --preset debug --steps 12 --chunk 2 --warmup 2   # seconds (the smoke test)

Two sides, eager (`train.compile=false`) and compiled (`train.compile=true`), each the trainer's own
`Trainer.step()` (bench/train_bench.py's DistGPTSide) on one thread (`--train.threads`, default 1),
in one process. It counts CPU time, not wall time, so that the other jobs of a shared machine
stretch the numbers as little as possible: the process's own CPU time plus that of the C++ compiler
processes inductor starts (RUSAGE_CHILDREN; inductor compiles in-process with
TORCHINDUCTOR_COMPILE_THREADS=1, so every g++ run is a reaped child). On an idle core, one thread's
CPU time is its wall time.

* compile: the compiled side's first `--warmup` steps beyond its steady pace, minus the same excess
  of the eager side (first-touch memory, caches): what compiling costs, C++ builds included. The
  inductor cache starts empty (a fresh TORCHINDUCTOR_CACHE_DIR) unless `--warm-cache DIR` names one.
* saved: eager minus compiled CPU ms per step, the median over alternating chunks (order flipped
  every round).
It prints both, the steps after which compiling has paid, and the rule's estimates for this shape
(dist_gpt/parallel/compile_rule.py).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile

from bench.train_bench import build_side, describe_machine
from dist_gpt import config as config_mod
from dist_gpt.errors import ConfigError
from dist_gpt.parallel import compile_rule, dist
from dist_gpt.training.compile_choice import compile_case
from dist_gpt.training.run_files import resolve_model_config
from dist_gpt.training.trainer import open_dataset


def cold_inductor(warm_cache: str | None) -> str:
    """Compile in this process (every g++ a reaped child, so its CPU time is counted), into a fresh
    cache directory unless `warm_cache` names one. Inductor reads both when it compiles."""
    from torch._inductor import config as inductor_config  # optional: only this benchmark tunes inductor

    inductor_config.compile_threads = 1
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = warm_cache or tempfile.mkdtemp(prefix="dist_gpt-inductor-")
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


def cpu_seconds() -> float:
    """This process's CPU time plus that of its reaped children (inductor's g++ runs)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def cpu_of(side, steps: int) -> float:
    t0 = cpu_seconds()
    for _ in range(steps):
        side.step()
    return cpu_seconds() - t0


def parse_args(argv: list[str]):
    p = argparse.ArgumentParser(prog="python -m bench.compile_bench", allow_abbrev=False,
                                description=__doc__.split("\n\n")[0],
                                epilog="Any other option is a dist_gpt.train option "
                                       "(--preset, --recipe, --section.key=value).")
    p.add_argument("--steps", type=int, default=60, help="steps per side, warm-up included (default 60)")
    p.add_argument("--warmup", type=int, default=10, help="first steps per side, the compile among them (default 10)")
    p.add_argument("--chunk", type=int, default=10, help="steps per alternating chunk (default 10)")
    p.add_argument("--warm-cache", metavar="DIR",
                   help="an inductor cache directory to reuse (default: a fresh, cold one)")
    args, rest = p.parse_known_args(argv)
    if args.steps < args.warmup + args.chunk or args.warmup < 1 or args.chunk < 1:
        raise ConfigError(f"--steps={args.steps} must be at least --warmup + --chunk ({args.warmup} + {args.chunk})")
    cl = config_mod.parse_argv(rest)
    if not any(k == "train.threads" for k in cl.overrides):
        cl.overrides["train.threads"] = 1
    return args, cl


def measure(sides, args) -> tuple[list[float], list[list[float]]]:
    """([warm-up CPU s per side], [per-chunk CPU ms per step, per side]), chunks alternating."""
    warm = [cpu_of(side, args.warmup) for side in sides]
    chunks: list[list[float]] = [[], []]
    for r in range((args.steps - args.warmup) // args.chunk):
        for i in ((0, 1) if r % 2 == 0 else (1, 0)):
            chunks[i].append(1000 * cpu_of(sides[i], args.chunk) / args.chunk)
    return warm, chunks


def run(argv: list[str]) -> int:
    args, cl = parse_args(argv)
    cache = cold_inductor(args.warm_cache)
    base = config_mod.build(cl.preset or "cpu", cl.config_file, cl.overrides)
    env = dist.init(base.train.device, base.train.timeout_s, base.train.threads, base.parallel.data)
    data = open_dataset(base, env)
    base.model = resolve_model_config(base.model, data)
    total = max(base.train.steps, args.steps)
    sides = [build_side(label, spec, cl, env, data, total)
             for label, spec in (("A", "train.compile=false"), ("B", "train.compile=true"))]
    print(describe_machine(env, base))
    print(f"inductor cache: {cache} ({'warm' if args.warm_cache else 'cold'}); "
          f"{args.warmup} warm-up steps, then alternating chunks of {args.chunk}; CPU time, not wall time")
    warm, chunks = measure(sides, args)
    eager, compiled = (statistics.median(c) for c in chunks)
    saved = statistics.median(a - b for a, b in zip(*chunks))
    excess = [w - args.warmup * statistics.median(c) / 1000 for w, c in zip(warm, chunks)]
    compile_s = excess[1] - excess[0]
    case = compile_case(base, env.world_size, "cpu", base.train.threads or 1)
    print(f"eager {eager:.1f} CPU ms/step, compiled {compiled:.1f} (saved {saved:.2f} ms/step = "
          f"{100 * saved / eager:.1f}%, median of {len(chunks[0])} rounds)")
    print(f"compile {compile_s:.1f} CPU s (warm-up excess: compiled {excess[1]:.1f} s, eager {excess[0]:.1f} s); "
          f"pays after {compile_s / (saved / 1000) if saved > 0 else float('inf'):,.0f} steps")
    print(f"rule's estimates: saved {compile_rule.saved_ms_per_step(case):.2f} ms/step, "
          f"compile {compile_rule.compile_seconds(case.n_layer):.1f} s "
          f"(width work {case.width_work:,.0f} per step, {case.n_layer} layers x {case.micro_steps} micro-batches)")
    if not args.warm_cache:
        shutil.rmtree(cache, ignore_errors=True)  # the cold cache this run made (a named one is the user's)
    return 0


def main() -> None:
    dist.run_main(run, sys.argv[1:])


if __name__ == "__main__":
    main()

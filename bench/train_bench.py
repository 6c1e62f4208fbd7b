"""Training throughput of dist_gpt's real step: tokens/s, ms/step, MFU, data wait, peak memory, A/B ratios.

    python -m bench.train_bench --preset debug                                  # a few steps, CI-sized
    python -m bench.train_bench --preset cpu --recipe classic --model.block_size=64 \\
        --train.global_batch=12 --train.micro_batch=12 --model.vocab_size=0 \\
        --data.path=data/nodejs_char --compare reference dist_gpt --steps 300 --chunk 20
    python -m bench.train_bench ... --compare train.precision=fp32 train.precision=bf16
    python -m bench.train_bench ... --compare train.compile=false train.compile=true --warmup 20
    python -m bench.train_bench ... --compare reference dist_gpt --steps 2000 --train.steps=2000 --eval-full
    python -m bench.train_bench ... --profile runs/profile     # then: tensorboard --logdir runs/profile
    torchrun --standalone --nproc_per_node=2 -m bench.train_bench --preset debug --compare reference dist_gpt
    python -m bench.train_bench --preset gpt2-124m --data.path=data/stdlib       # one GPU, any local tokens
    python -m bench.train_bench --modern-steady --steps 410 --chunk 20   # every step, classic vs modern (step_steady.py)

Every `--section.key=value`, `--preset`, `--recipe` and `--config` means what it means to
`python -m dist_gpt.train`; the rest are the benchmark's own (see --help). A dist_gpt side is the
trainer itself: `dist_gpt.training.trainer.build` makes its components (model, optimizers, schedule,
precision, batches over a real dataset, torch.compile, DDP, fault guard) and the benchmark calls
`Trainer.step()`, minus evaluation and checkpoints, which the training loop runs only every so many
steps, and with a quiet logger.

`--compare A B` builds two sides and runs them alternately, `--chunk` steps at a time (the order
flips every round), so a noisy shared machine slows both alike; it prints each side's medians and
the median of the per-round ratios B/A. A side is `dist_gpt` (the config as given), `reference`
(bench/reference_gpt.py: a plain eager fp32 PyTorch GPT of the classic recipe with the same
shape, the same initial weights where the architectures coincide, and the same batches), or
comma-separated overrides of the config (`train.precision=fp32,train.compile=true`).

The first `--warmup` steps of each side (compilation, allocator and cache warm-up) are timed
apart and reported as "warm-up": their time beyond the steady-state pace. MFU divides by the
device's dense peak from dist_gpt.metrics (n/a on CPUs). Peak memory is per side on CUDA and the
process's peak resident set on CPU (shared by both sides of a comparison).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch.profiler import record_function

from bench.reference_gpt import ReferenceGPT, ReferenceTrainer
from dist_gpt import config as config_mod
from dist_gpt.parallel import dist
from dist_gpt.training.signals import StopSignals
from dist_gpt.data import TrainBatches, ValBlocks
from dist_gpt.errors import ConfigError
from dist_gpt.training.evaluator import validation_loss
from dist_gpt.training.faults import Verdict
from dist_gpt.metrics import QuietLogger, mfu, peak_memory_gib, resolve_peak_flops
from dist_gpt.model.gpt import GPT
from dist_gpt.parallel.precision import Precision
from dist_gpt.training.run_files import resolve_model_config
from dist_gpt.parallel.dist import use_compile
from dist_gpt.training.trainer import build, open_dataset


def _no_label(name: str):
    return nullcontext()


def _batches(cfg, env, data) -> TrainBatches:
    return TrainBatches(data, block_size=cfg.model.block_size, global_batch=cfg.train.global_batch,
                        micro_batch=cfg.train.micro_batch, rank=env.rank, world_size=env.world_size,
                        seed=cfg.train.seed, device=env.device, prefetch=cfg.data.prefetch)


class Side:
    """One configuration under test: its own model, optimizer and batch stream, and its timings."""

    def __init__(self, label: str, name: str, cfg, env, precision: str):
        self.label, self.name, self.cfg, self.env = label, name, cfg, env
        self.precision = precision
        self.tokens_per_step = cfg.train.global_batch * cfg.model.block_size  # all ranks
        self.steps_done = 0
        self.data_time = 0.0         # seconds waiting in batches.next(), steady-state steps only
        self.warmup_s = 0.0          # the first --warmup steps, compilation included
        self.chunk_ms: list[float] = []  # ms per step of each steady-state chunk
        self.peak_mem: float | None = None
        with torch.device("meta"):  # the model's FLOPs per token, without allocating its weights
            self.flops_per_token = GPT(cfg.model).flops_per_token()

    def step(self, label=_no_label) -> None:
        raise NotImplementedError

    def run(self, steps: int, count_data: bool = True) -> float:
        """`steps` training steps; returns their wall time (seconds), device work included."""
        cuda = self.env.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.env.device)
        data_before = self.data_time
        t0 = time.perf_counter()
        with self.matmul_precision():
            for _ in range(steps):
                self.step()
        if cuda:
            torch.cuda.synchronize(self.env.device)
        elapsed = time.perf_counter() - t0
        if not count_data:
            self.data_time = data_before
        mem = peak_memory_gib(self.env.device)
        self.peak_mem = mem if self.peak_mem is None or mem is None else max(self.peak_mem, mem)
        return elapsed

    def matmul_precision(self):
        return nullcontext()

    def raw_model(self) -> torch.nn.Module:
        raise NotImplementedError


class DistGPTSide(Side):
    """dist_gpt exactly as `python -m dist_gpt.train` builds and steps it (`dist_gpt.training.trainer.build` and
    `Trainer.step`), with a quiet logger, a scratch run directory and no checkpoints; evaluation is
    left to --eval-full. A non-finite loss stops the benchmark (the trainer's default nan_policy)."""

    def __init__(self, label: str, name: str, cfg, env, total_steps: int):
        cfg.train.steps = total_steps  # the LR schedule of a run this long
        cfg.train.run_dir = dist.from_rank0(tempfile.mkdtemp(prefix="dist_gpt-bench-") if env.is_main else None)
        cfg.checkpoint.interval, cfg.checkpoint.resume = 0, "none"
        # never signalled here, but agreed on every step as in training
        self.trainer = build(cfg, env, StopSignals(), log=QuietLogger(cfg.log, total_steps))
        super().__init__(label, name, cfg, env, self.trainer.precision.name)

    def describe(self) -> str:
        c = self.cfg
        return (f"dist_gpt, recipe {c.train.recipe}, precision {self.precision}, compile "
                f"{'on' if use_compile(c.train.compile, self.env.device) else 'off'}, optim {c.optim.name}")

    def step(self, label=_no_label) -> None:
        """One `Trainer.step()` (its phases carry their own profiler labels)."""
        if self.trainer.step() is not Verdict.PROCEED:
            raise ConfigError(f"side {self.label} ({self.name}): non-finite loss at step {self.steps_done}; "
                              "lower --optim.lr or use --train.precision=fp32")
        self.data_time += self.trainer.data_time
        self.steps_done += 1

    def raw_model(self) -> torch.nn.Module:
        return self.trainer.model


class ReferenceSide(Side):
    """bench/reference_gpt.py with the classic-recipe settings of the same preset and shape."""

    def __init__(self, label: str, cfg, env, data, total_steps: int):
        super().__init__(label, "reference", cfg, env, "fp32")
        m, o = cfg.model, cfg.optim
        torch.manual_seed(cfg.train.seed)
        self.model = ReferenceGPT(m.vocab_size, m.block_size, m.n_layer, m.n_head, m.n_embd, m.dropout)
        self.same_init = _reference_compatible(m)
        if self.same_init:  # dist_gpt's initial weights of this seed: the runs differ only in numerics
            torch.manual_seed(cfg.train.seed)
            self.model.load_dist_gpt_weights(GPT(m).state_dict())
        self.model.to(env.device)
        ddp = None
        if env.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ddp = DDP(self.model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)
        self.trainer = ReferenceTrainer(self.model, o.lr, o.weight_decay, (o.beta1, o.beta2), o.warmup_steps,
                                        total_steps, o.min_lr_ratio, o.grad_clip, ddp)
        self.batches = _batches(cfg, env, data)

    def describe(self) -> str:
        init = "same initial weights" if self.same_init else "its own initial weights (architectures differ)"
        return f"reference: plain eager fp32 PyTorch GPT, classic recipe, same shape, {init}, same batches"

    def matmul_precision(self):
        return _fp32_matmuls()

    def step(self, label=_no_label) -> None:
        with label("data"):
            t0 = time.perf_counter()
            micro = self.batches.next()
            self.data_time += time.perf_counter() - t0
        with label("forward_backward"):
            self.trainer.forward_backward(micro)
        with label("optimizer"):
            self.trainer.optimizer_step()
        self.steps_done += 1

    def raw_model(self) -> torch.nn.Module:
        return self.model


@contextmanager
def _fp32_matmuls():
    """torch's default fp32 matmuls (no TF32), whatever a dist_gpt side set, restored afterwards."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


def _reference_compatible(m) -> bool:
    """Whether ReferenceGPT computes exactly the network of this dist_gpt model config."""
    return (m.norm, m.block, m.positions, m.mlp) == ("layernorm", "prenorm", "learned", "gelu") and \
        m.tie_embeddings and not (m.bias or m.qkv_bias or m.head_bias or m.qk_norm) and \
        m.logit_softcap is None and m.head_size * m.n_head == m.n_embd and m.hidden_size == 4 * m.n_embd and \
        m.kv_heads == m.n_head and m.eps == 1e-5


# ---------------------------------------------------------------------------------------------
# Building the sides from the command line


def parse_args(argv: list[str]):
    p = argparse.ArgumentParser(prog="python -m bench.train_bench", allow_abbrev=False,
                                description=__doc__.split("\n\n")[0],
                                epilog="Any other option is a dist_gpt.train option: --preset, --recipe, "
                                       "--config, --section.key=value.")
    p.add_argument("--steps", type=int, default=50, help="training steps per side, warm-up included (default 50)")
    p.add_argument("--warmup", type=int, default=10, help="first steps of each side timed apart (default 10)")
    p.add_argument("--chunk", type=int, default=10, help="steps per timed chunk; sides alternate by chunk (default 10)")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"),
                   help="two sides: reference | dist_gpt | section.key=value[,section.key=value...]")
    p.add_argument("--profile", metavar="DIR", help="write a torch.profiler trace of 3 steps per side to DIR")
    p.add_argument("--modern-steady", action="store_true",
                   help="instead: every step's time of classic and modern at the cpu shape, one thread, bf16 and "
                        "fp32, and the modern step by phase (bench/step_steady.py; its own --help)")
    p.add_argument("--eval-full", action="store_true",
                   help="after the steps, each side's loss over the whole validation split (fp32)")
    args, rest = p.parse_known_args(argv)
    if args.steps <= args.warmup or args.warmup < 1 or args.chunk < 1:
        raise ConfigError(f"--steps={args.steps} must exceed --warmup={args.warmup} (at least 1), and --chunk >= 1")
    return args, config_mod.parse_argv(rest)


def side_config(cl, spec: str):
    """The Config of one side: the command line's, plus the side's own `section.key=value` overrides."""
    extra = {}
    if spec not in ("dist_gpt", "reference"):
        extra = config_mod.parse_argv([f"--{kv}" for kv in spec.split(",") if kv]).overrides
    if spec == "reference":  # the classic recipe of the same preset and shape
        extra = {"train.recipe": "classic"}
    return config_mod.build(cl.preset or "cpu", cl.config_file, {**cl.overrides, **extra})


def build_side(label: str, spec: str, cl, env, data, total_steps: int) -> Side:
    cfg = side_config(cl, spec)
    if spec == "reference":
        cfg.model = resolve_model_config(cfg.model, data)
        return ReferenceSide(label, cfg, env, data, total_steps)
    return DistGPTSide(label, spec, cfg, env, total_steps)


# ---------------------------------------------------------------------------------------------
# Measuring


def _rounds(args) -> tuple[int, int]:
    """(rounds, steps per chunk) of the steady state after the warm-up."""
    n = min(args.chunk, args.steps - args.warmup)
    return (args.steps - args.warmup) // n, n


def measure(sides: list[Side], args) -> list[float]:
    """Warm every side up, then alternate chunks; returns the per-round ratios B/A (empty for one side)."""
    for side in sides:
        side.warmup_s = side.run(args.warmup, count_data=False)
    rounds, n = _rounds(args)
    ratios = []
    for r in range(rounds):
        order = sides if r % 2 == 0 else sides[::-1]  # flip the order: drift within a round cancels
        for side in order:
            side.chunk_ms.append(1000 * side.run(n) / n)
        if len(sides) == 2:
            a, b = (side.tokens_per_step / side.chunk_ms[-1] for side in sides)
            ratios.append(b / a)
    return ratios


def report(sides: list[Side], ratios: list[float], env, args, say) -> None:
    say(f"{'side':<34} {'tokens/s':>10} {'best':>10} {'ms/step':>9} {'MFU':>7} {'data wait':>9} {'warm-up':>9} "
        f"{'peak mem':>10}")
    for side in sides:
        ms = statistics.median(side.chunk_ms)
        tok_s = side.tokens_per_step / (ms / 1000)
        best = side.tokens_per_step / (min(side.chunk_ms) / 1000)  # the least disturbed chunk
        peak = resolve_peak_flops(side.cfg.log, env.device, side.precision)
        util = mfu(side.flops_per_token, tok_s, peak, env.world_size)
        steady_s = sum(side.chunk_ms) * _rounds(args)[1] / 1000
        wait = side.data_time / steady_s if steady_s else 0.0
        warm_extra = side.warmup_s - args.warmup * ms / 1000  # beyond the steady pace: compile, caches
        mem = "n/a" if side.peak_mem is None else f"{side.peak_mem:.2f} GiB"
        say(f"{side.label} {side.name[:31]:<32} {tok_s:>10,.0f} {best:>10,.0f} {ms:>9.2f} "
            f"{'n/a' if util is None else f'{100 * util:.1f}%':>7} {100 * wait:>8.2f}% {warm_extra:>8.1f}s {mem:>10}")
    say("(tokens/s and ms/step: medians over the chunks; best: the fastest chunk)")
    say(f"(warm-up: the first {args.warmup} steps' time beyond the steady pace: compilation, first-touch memory"
        + ("; peak mem: the process's peak resident set, shared by the sides)" if env.device.type == "cpu" else ")"))
    if ratios:
        say(f"ratio B/A (tokens/s): {statistics.median(ratios):.3f} median of {len(ratios)} alternating rounds "
            f"(min {min(ratios):.3f}, max {max(ratios):.3f}); of the fastest chunks: "
            f"{min(sides[0].chunk_ms) / min(sides[1].chunk_ms) * sides[1].tokens_per_step / sides[0].tokens_per_step:.3f}")


# ---------------------------------------------------------------------------------------------
# Profile: a torch.profiler trace per side, and the step's split between its phases


def profile(side: Side, out_dir: Path, say) -> None:
    """Trace 3 steps (after 1 skipped and 1 warm-up) into out_dir/<label>-<name> for TensorBoard,
    and print the time per step of each phase."""
    from torch.profiler import ProfilerActivity, schedule, tensorboard_trace_handler

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if side.env.device.type == "cuda" else [])
    trace_dir = out_dir / f"{side.label}-{side.name.replace('/', '_').replace(',', '+')}"
    active = 3
    with torch.profiler.profile(activities=activities, schedule=schedule(wait=1, warmup=1, active=active),
                                on_trace_ready=tensorboard_trace_handler(str(trace_dir),
                                                                         worker_name=f"rank{side.env.rank}")) as prof:
        with side.matmul_precision():
            for _ in range(2 + active):
                side.step(label=record_function)
                prof.step()
    say(f"profile {side.label} ({side.name}), ms per step over {active} steps; trace: {trace_dir}")
    say("  " + " | ".join(f"{k} {v:.2f}" for k, v in phase_split(prof, side.env.device.type == "cuda", active).items()))


def phase_split(prof, cuda: bool, steps: int) -> dict[str, float]:
    """ms per step of data, forward, backward, optimizer, the stop/NaN agreement and communication.

    Backward is the autograd engine's work (its `evaluate_function` ranges), forward the rest of the
    forward_backward range (for dist_gpt's trainer: of its forward and backward ranges together).
    Communication is the collectives' own time: DDP's gradient all-reduce runs in the background
    during backward, so it overlaps backward rather than adding to it.
    On CUDA the times are the kernels' (device) times, on CPU the ranges' wall times.
    """
    total = {}
    for ev in prof.key_averages():
        t = (ev.device_time_total if cuda else ev.cpu_time_total) / 1000 / steps
        total[ev.key] = total.get(ev.key, 0.0) + t
    backward = sum(t for k, t in total.items() if k.startswith("autograd::engine::evaluate_function"))
    comm = sum(t for k, t in total.items()
               if any(s in k.lower() for s in ("allreduce", "all_reduce", "nccl:", "gloo:")))
    # the reference labels one forward_backward range; dist_gpt's trainer labels forward and backward apart
    both = total.get("forward_backward", total.get("forward", 0.0) + total.get("backward", 0.0))
    return {"data": total.get("data", 0.0), "forward": both - backward,
            "backward": backward, "optimizer": total.get("optimizer", 0.0), "agree": total.get("agree", 0.0),
            "communication (overlapped)": comm}


# ---------------------------------------------------------------------------------------------


def eval_full(side: Side, env, data) -> float:
    """Loss (nats/token) over every block of the validation split, in fp32, split across ranks."""
    cfg = side.cfg
    val = ValBlocks(data, block_size=cfg.model.block_size, batch_size=cfg.eval.batch_size or cfg.train.micro_batch,
                    rank=env.rank, world_size=env.world_size, max_blocks=None, device=env.device)
    with _fp32_matmuls():
        loss, _ = validation_loss(side.raw_model(), val, Precision("fp32", env.device).autocast())
    return loss


def describe_machine(env, cfg) -> str:
    if env.device.type == "cuda":
        where = torch.cuda.get_device_name(env.device)
    else:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "cpu") if Path("/proc/cpuinfo").exists() else "cpu"
        where = f"{cpu}, {torch.get_num_threads()} threads/rank"
    load = f", load {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    m = cfg.model
    accum = cfg.train.global_batch // (cfg.train.micro_batch * env.world_size)
    return (f"train_bench: torch {torch.__version__}, {env.device.type} ({where}), world {env.world_size}{load}\n"
            f"shape: preset {cfg.preset}, {m.n_layer} layers x {m.n_head} heads x {m.n_embd}, context {m.block_size}, "
            f"vocab {m.vocab_size}; batch {cfg.train.global_batch} = {cfg.train.micro_batch} micro x {accum} accum "
            f"x {env.world_size} ranks = {cfg.train.global_batch * m.block_size:,} tokens/step")


def run(argv: list[str]) -> int:
    if "--modern-steady" in argv:
        from bench import step_steady  # start-up: step_steady builds on this module's sides

        return step_steady.run(argv)
    args, cl = parse_args(argv)
    base = config_mod.build(cl.preset or "cpu", cl.config_file, cl.overrides)
    env = dist.init(base.train.device, base.train.timeout_s, base.train.threads, base.parallel.data)
    say = print if env.is_main else (lambda *a, **k: None)
    data = open_dataset(base, env)
    base.model = resolve_model_config(base.model, data)
    total_steps = max(base.train.steps, args.steps)  # the LR schedule of a run this long (or longer)
    specs = args.compare or ["dist_gpt"]
    sides = [build_side(label, spec, cl, env, data, total_steps) for label, spec in zip("AB", specs)]
    say(describe_machine(env, base))
    for side in sides:
        say(f"{side.label}: {side.describe()}")
    rounds, n = _rounds(args)
    say(f"{args.warmup + rounds * n} steps per side: {args.warmup} warm-up, then {rounds} chunks of {n}"
        f"{', alternating' if len(sides) == 2 else ''}; LR schedule of {total_steps} steps")
    ratios = measure(sides, args)
    report(sides, ratios, env, args, say)
    if args.eval_full:
        losses = [eval_full(side, env, data) for side in sides]
        say("whole-validation-split loss (fp32): " + ", ".join(
            f"{s.label} {loss:.4f}" for s, loss in zip(sides, losses))
            + (f"; B - A = {losses[1] - losses[0]:+.4f}" if len(losses) == 2 else ""))
    if args.profile:
        for side in sides:
            profile(side, Path(args.profile), say)
    return 0


def main() -> None:
    dist.run_main(run, sys.argv[1:])


if __name__ == "__main__":
    main()

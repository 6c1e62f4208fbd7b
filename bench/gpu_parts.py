"""The parts of `python -m bench.gpu_check`, each run in a process of its own (see bench/gpu_check.py).

A part builds dist_gpt's real trainer (`dist_gpt.training.trainer.build`, as `python -m dist_gpt.train`
does, with a scratch run directory, no checkpoints and a logger that keeps the losses), takes real
steps on the synthetic word-chain dataset (bench/synthetic_data.py) and returns a dict of numbers
and an `ok` verdict. `Sizes` holds the GPU shapes and the tiny CPU ones.
"""

from __future__ import annotations

import math
import pickle
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dist_gpt import config as config_mod
from dist_gpt.parallel import dist
from dist_gpt.training.faults import Verdict
from dist_gpt.training.signals import StopSignals
from dist_gpt.metrics import QuietLogger, mfu, resolve_peak_flops

REPO = Path(__file__).resolve().parents[1]
QUIET = ["--log.tensorboard=false", "--eval.sample_tokens=0"]


@dataclass
class PartOptions:
    """What every part is handed: the device kind, the synthetic dataset and a scratch folder."""

    cpu: bool
    data: Path
    out: Path

    @property
    def device(self) -> str:
        return "cpu" if self.cpu else "cuda"


class LossLog(QuietLogger):
    """A quiet logger that asks for the loss at every step and keeps it (one host sync per step)."""

    def __init__(self, cfg, total_steps: int):
        super().__init__(cfg, total_steps)
        self.losses: list[float] = []

    def due(self, step: int) -> bool:
        return True

    def step(self, step: int, report) -> None:
        self.losses.append(report.loss)


def make_trainer(opts: PartOptions, name: str, argv: list[str], log_losses: bool = False):
    """(cfg, env, trainer) for `argv` on the synthetic data, exactly as `dist_gpt.train` builds it."""
    from dist_gpt.training.trainer import build

    argv = [*argv, f"--train.device={opts.device}", f"--data.path={opts.data}", *QUIET]
    cfg = config_mod.parse(argv, world=dist.launch_world())
    env = dist.init(cfg.train.device, cfg.train.timeout_s, cfg.train.threads, cfg.parallel.data)
    cfg.train.run_dir = str(opts.out / name)
    cfg.checkpoint.interval, cfg.checkpoint.resume = 0, "none"
    log = LossLog(cfg.log, cfg.train.steps) if log_losses else QuietLogger(cfg.log, cfg.train.steps)
    return cfg, env, build(cfg, env, StopSignals(), log=log)


def _sync(env) -> None:
    if env.device.type == "cuda":
        torch.cuda.synchronize(env.device)


def run_steps(trainer, steps: int) -> None:
    for _ in range(steps):
        if trainer.step() is not Verdict.PROCEED:
            raise RuntimeError(f"non-finite loss at step {trainer.state.step}")


def _timed(trainer, env, steps: int) -> float:
    """Wall seconds of `steps` training steps, the device's queued work included."""
    t0 = time.perf_counter()
    run_steps(trainer, steps)
    _sync(env)
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# Shapes: GPT-2 small and a 6 x 6 x 384 model on a GPU; the debug preset's 2 x 2 x 32 on a CPU.

GPT2 = ["--preset", "gpt2-124m", "--train.global_batch=12", "--train.micro_batch=12"]
SMALL_GPU = ["--preset", "cpu", "--model.n_layer=6", "--model.n_head=6", "--model.n_embd=384",
             "--model.vocab_size=256", "--model.block_size=256", "--model.dropout=0",
             "--train.global_batch=32", "--train.micro_batch=32", "--train.compile=false"]
TINY_CPU = ["--preset", "debug", "--model.dropout=0", "--train.compile=false", "--train.threads=1"]


def throughput(opts: PartOptions, fp8: bool = False) -> dict:
    """gpt2-124m (tiny on CPU) in bf16 with torch.compile: tokens/s and MFU over steady-state steps."""
    base = ["--preset", "debug", "--train.global_batch=8", "--train.threads=1"] if opts.cpu else GPT2
    argv = [*base, "--train.precision=bf16", "--train.compile=true", *(["--train.fp8=true"] if fp8 else [])]
    warmup, steps = (3, 10) if opts.cpu else (5, 20)
    argv.append(f"--train.steps={warmup + steps}")
    cfg, env, t = make_trainer(opts, "fp8" if fp8 else "bf16", argv)
    warm_s = _timed(t, env, warmup)
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(env.device)
    seconds = _timed(t, env, steps)
    tokens_per_s = t.tokens_per_step * steps / seconds
    util = mfu(t.model.flops_per_token(), tokens_per_s, resolve_peak_flops(cfg.log, env.device, "bf16"))
    return {"ok": True, "model": f"{cfg.model.n_layer}x{cfg.model.n_head}x{cfg.model.n_embd}",
            "tokens_per_step": t.tokens_per_step, "tokens_per_s": round(tokens_per_s, 1),
            "ms_per_step": round(1000 * seconds / steps, 2), "mfu": None if util is None else round(util, 4),
            "warmup_s": round(warm_s, 1), "precision": t.precision.name + ("+fp8" if fp8 else "")}


def throughput_fp8(opts: PartOptions) -> dict:
    return throughput(opts, fp8=True)


def init_world_of_one(opts: PartOptions, env) -> None:
    """A process group of one rank (nccl on a GPU, gloo on a CPU), through a file store: what
    torchrun would give, without a launcher, so collectives and FSDP have a group to run on."""
    backend = "nccl" if env.device.type == "cuda" else "gloo"
    store = opts.out / "pg_store"
    store.unlink(missing_ok=True)
    torch.distributed.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1,
                                         device_id=env.device if backend == "nccl" else None)


def fsdp(opts: PartOptions) -> dict:
    """FSDP2 (`fully_shard`, bf16 gathers on a GPU) on one device, against the same run unsharded.

    dist_gpt never shards a world of one (`dist.device_mesh` returns None there), so this part hands
    the trainer's own `build` a one-device mesh: the sharded model is built on the meta device,
    sharded, materialised and trained by the real step, which is what every rank of a large run does."""
    from torch.distributed.device_mesh import init_device_mesh

    argv = [*(TINY_CPU if opts.cpu else SMALL_GPU), "--train.steps=10",
            "--train.precision=" + ("fp32" if opts.cpu else "bf16")]
    _, env, plain = make_trainer(opts, "fsdp-plain", argv, log_losses=True)
    run_steps(plain, 10)
    init_world_of_one(opts, env)
    mesh = init_device_mesh(env.device.type, (1,), mesh_dim_names=("shard",))
    real_mesh = dist.device_mesh
    dist.device_mesh = lambda env, cfg: mesh if cfg.data != "ddp" else None
    try:
        _, _, sharded = make_trainer(opts, "fsdp-sharded", [*argv, "--parallel.data=fsdp"], log_losses=True)
    finally:
        dist.device_mesh = real_mesh
    run_steps(sharded, 10)
    a, b = plain.log.losses, sharded.log.losses
    worst = max(abs(x - y) / abs(x) for x, y in zip(a, b))
    tolerance = 1e-5 if opts.cpu else 3e-2  # bf16 gathers against bf16 autocast of fp32 weights
    return {"ok": dist.is_sharded(sharded.model) and worst <= tolerance, "sharded": dist.is_sharded(sharded.model),
            "steps": len(b), "loss_first": round(b[0], 4), "loss_last": round(b[-1], 4),
            "max_rel_diff_vs_unsharded": float(f"{worst:.3g}"), "tolerance": tolerance}


def doc_mask(opts: PartOptions) -> dict:
    """Training with `model.doc_mask=true` (FlexAttention on a GPU, the SDPA boolean mask on a CPU)
    against plain causal attention, same seed and batches: both must fall, the mask no worse."""
    from dist_gpt.doc_mask import flex_usable

    steps = 40 if opts.cpu else 60
    base = [*(TINY_CPU if opts.cpu else SMALL_GPU), f"--train.steps={steps}", "--train.precision=" +
            ("fp32" if opts.cpu else "bf16")]
    result = {}
    for name, flag in (("causal", "false"), ("doc_mask", "true")):
        cfg, env, t = make_trainer(opts, name, [*base, f"--model.doc_mask={flag}"], log_losses=True)
        seconds = _timed(t, env, steps)
        losses = t.log.losses
        result[name] = {"first": round(statistics.fmean(losses[:5]), 4), "last": round(statistics.fmean(losses[-5:]), 4),
                        "s": round(seconds, 1)}
    m = cfg.model
    result["attention"] = "flex" if flex_usable(env.device, m.dropout, m.n_embd // m.n_head) else "sdpa-mask"
    fell = all(r["last"] < r["first"] for r in (result["causal"], result["doc_mask"]))
    result["ok"] = fell and result["doc_mask"]["last"] <= 1.1 * result["causal"]["last"]
    return result


def memory(opts: PartOptions) -> dict:
    """Peak CUDA memory of gpt2-124m's bf16 steps against the estimate `--dry-run` prints."""
    from dist_gpt.memory import ActivationProbe, estimate

    cfg, env, t = make_trainer(opts, "memory", [*GPT2, "--train.precision=bf16", "--train.compile=false",
                                                "--train.steps=3"])
    torch.cuda.reset_peak_memory_stats(env.device)
    _timed(t, env, 3)
    peak = torch.cuda.max_memory_allocated(env.device)
    est = estimate(cfg, "ddp", 1, 1, cfg.model.activation_checkpointing,
                   ActivationProbe(cfg.model, "bf16", gpu=True)).total
    gib = 2**30
    return {"ok": peak <= 1.2 * est, "peak_gib": round(peak / gib, 2), "estimate_gib": round(est / gib, 2),
            "peak_over_estimate": round(peak / est, 3)}


def _dump_trace() -> tuple[str, dict]:
    """(the function used, its unpickled dump): torch's NCCL dump where this build has it, else the
    backend-neutral flight-recorder dump (torch 2.13 records gloo too)."""
    c10d = torch._C._distributed_c10d
    for name in ("_dump_nccl_trace", "_dump_fr_trace"):
        fn = getattr(c10d, name, None)
        if fn is not None and (name != "_dump_nccl_trace" or torch.cuda.is_available()):
            return name, pickle.loads(fn())
    raise RuntimeError(f"torch {torch.__version__} has no flight-recorder dump (_dump_nccl_trace, _dump_fr_trace)")


def flight_recorder(opts: PartOptions) -> dict:
    """The collective flight recorder (TORCH_FR_BUFFER_SIZE / TORCH_NCCL_TRACE_BUFFER_SIZE, set by
    gpu_check for this part): after real training steps in a process group, the dump names the
    collectives the steps ran, as a hung job's dump would."""
    _, env, t = make_trainer(opts, "flight", [*TINY_CPU, "--train.steps=3"])
    init_world_of_one(opts, env)
    run_steps(t, 3)
    _sync(env)
    how, trace = _dump_trace()
    path = opts.out / "flight_recorder_rank0.pkl"
    path.write_bytes(pickle.dumps(trace))
    ops = sorted({e.get("profiling_name", "?") for e in trace.get("entries", [])})
    return {"ok": len(trace.get("entries", [])) > 0 and any("all_reduce" in op for op in ops), "dump": how,
            "version": trace.get("version"), "entries": len(trace.get("entries", [])), "ops": ops, "file": str(path)}


def loss_curve(opts: PartOptions) -> dict:
    """200 steps of a 6 x 6 x 384 model (the debug preset's 2 x 2 x 32 on a CPU) on the word chain:
    the mean loss of the last 20 steps must be under 80% of the first 20's."""
    cfg, env, t = make_trainer(opts, "curve", [*(TINY_CPU if opts.cpu else SMALL_GPU), "--train.steps=200"],
                               log_losses=True)
    seconds = _timed(t, env, 200)
    losses = t.log.losses
    first, last = statistics.fmean(losses[:20]), statistics.fmean(losses[-20:])
    return {"ok": math.isfinite(last) and last < 0.8 * first,
            "model": f"{cfg.model.n_layer}x{cfg.model.n_head}x{cfg.model.n_embd}",
            "loss_first20": round(first, 4), "loss_last20": round(last, 4),
            "curve": [round(losses[i], 3) for i in (0, 49, 99, 149, 199)], "s": round(seconds, 1)}


def cuda_tests(opts: PartOptions) -> dict:
    """The test suite's CUDA-only tests (`pytest -m cuda`)."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "tests"],
                          cwd=REPO, capture_output=True, text=True)
    summary = next((line for line in reversed(proc.stdout.splitlines()) if " in " in line and "=" in line),
                   proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "")
    failed = [line.split(" ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("FAILED ")]
    return {"ok": proc.returncode == 0, "summary": summary.strip("= "), "failed": failed}


PARTS = {
    "cuda_tests": cuda_tests,
    "throughput_bf16": throughput,
    "throughput_fp8": throughput_fp8,
    "fsdp": fsdp,
    "doc_mask": doc_mask,
    "memory": memory,
    "flight_recorder": flight_recorder,
    "loss_curve": loss_curve,
}

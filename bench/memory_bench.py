"""Memory per rank under ddp and fsdp at 1, 2 and 4 ranks, counted from the tensors each rank holds.

    python -m bench.memory_bench                                  # ~110M-parameter GPT, ddp and fsdp at 1, 2, 4 ranks
    python -m bench.memory_bench --ranks 2 --layouts ddp fsdp --steps 4
    python -m bench.memory_bench -- --model.n_layer=6            # anything after -- goes to the trainer's config

Each (layout, ranks) pair is its own `torchrun --standalone` job running this file as a worker. A
worker builds the trainer exactly as `python -m dist_gpt.train` does (`dist_gpt.training.trainer.build`, a
scratch run directory, a quiet logger) and reports, for every rank:

    params, grads, optimizer   bytes of the tensors this rank holds (a DTensor's local shard), the
                               gradients after one forward/backward, the optimizer state after the steps
    activations                bytes autograd saved in that forward (saved-tensor hooks, each storage
                               once, parameters excluded); measured under ddp, where no gathered
                               parameter can pass for an activation, and the same under every layout
    peak RSS                   the process's peak resident set, whole (what `/usr/bin/time -v` reports
                               as its maximum resident set size)
    added                      that peak minus the resident set just before the trainer was built:
                               what the trainer added, without the imports and the process group
                               (about 300 MiB for torch, numpy and gloo here)
    tokens/s                   over the steps after the first

The model defaults to 12 x 12 x 768 with a 32,768-token vocabulary (110M parameters), classic
recipe (AdamW), fp32, context 256, one sequence per rank per micro-step, one micro-step per step
(so the gradients are sharded too under fsdp), on the stdlib corpus. The estimate of `--dry-run`
(`dist_gpt.memory`) is printed beside each count.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

MODEL = ["--preset", "cpu", "--recipe", "classic", "--model.n_layer=12", "--model.n_head=12", "--model.n_embd=768",
         "--model.vocab_size=32768", "--model.block_size=256", "--train.precision=fp32", "--train.micro_batch=1",
         "--data.path=data/stdlib", "--log.tensorboard=false", "--eval.sample_tokens=0"]


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _local_bytes(t) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def worker(out: Path, argv: list[str], steps: int) -> None:
    import torch

    from dist_gpt import config
    from dist_gpt.parallel import dist
    from dist_gpt.training.signals import StopSignals
    from dist_gpt.metrics import QuietLogger
    from dist_gpt.training.trainer import build, forward_backward, zero_grads

    cfg = config.parse(argv, world=dist.launch_world())
    env = dist.init(cfg.train.device, cfg.train.timeout_s, cfg.train.threads, cfg.parallel.data)
    cfg.train.run_dir = dist.from_rank0(tempfile.mkdtemp(prefix="dist_gpt-membench-") if env.is_main else None)
    cfg.checkpoint.interval, cfg.checkpoint.resume = 0, "none"
    baseline = _rss_bytes()
    t = build(cfg, env, StopSignals(), log=QuietLogger(cfg.log, cfg.train.steps))
    params = sum(_local_bytes(p) for p in t.model.parameters())

    saved: dict[int, int] = {}
    sharded = dist.is_sharded(t.model)
    storages = set() if sharded else {p.untyped_storage().data_ptr() for p in t.model.parameters()}

    def pack(x):
        s = x.untyped_storage()
        if not sharded and s.data_ptr() not in storages:  # fsdp: gathered weights would pass for activations
            saved[s.data_ptr()] = s.nbytes()
        return x

    micro = t.batches.next()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        forward_backward(t.train_model, micro, t.autocast, t.precision.scaler)
    grads = sum(_local_bytes(p.grad) for p in t.model.parameters() if p.grad is not None)
    zero_grads(t.optimizers)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        t.step()
        dist.barrier()
        times.append(time.perf_counter() - t0)
    optim = sum(_local_bytes(v) for opt in t.optimizers for st in opt.state.values()
                for v in st.values() if torch.is_tensor(v))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    tokens_per_s = t.tokens_per_step * (len(times) - 1) / sum(times[1:]) if len(times) > 1 else float("nan")
    record = {"rank": env.rank, "params": params, "grads": grads, "optimizer": optim,
              "activations": None if sharded else sum(saved.values()), "peak_rss": peak, "start_rss": baseline,
              "tokens_per_s": tokens_per_s}
    (out / f"rank{env.rank}.json").write_text(json.dumps(record))
    t.log.close()
    dist.shutdown(0)


def run_one(layout: str, ranks: int, argv: list[str], steps: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               "-m", "bench.memory_bench", "--worker", out, "--steps", str(steps), "--", *argv, f"--parallel.data={layout}",
               f"--train.global_batch={ranks}"]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{layout} on {ranks} ranks failed:\n{proc.stderr[-3000:]}")
        return [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(ranks)]


def estimate_row(argv: list[str], layout: str, ranks: int):
    from dist_gpt import config
    from dist_gpt.memory import ActivationProbe, estimate

    cfg = config.parse([*argv, f"--train.global_batch={ranks}"], world=(ranks, ranks))
    return estimate(cfg, layout, ranks, ranks, False, ActivationProbe(cfg.model, "fp32"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--layouts", nargs="+", default=["ddp", "fsdp"])
    p.add_argument("--steps", type=int, default=3, help="training steps per job after the counted forward/backward")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args, rest = p.parse_known_args()
    extra = rest[1:] if rest[:1] == ["--"] else rest
    if args.worker:
        worker(Path(args.worker), extra, args.steps)
        return
    argv = MODEL + extra
    mib = 2**20
    print(f"memory_bench: {' '.join(argv)}; rank 0's figures (MiB), estimate of --dry-run in brackets", flush=True)
    print(f"{'layout':<6} {'ranks':>5} {'params':>14} {'grads':>14} {'optimizer':>14} {'states':>8} "
          f"{'activations':>11} {'peak RSS':>9} {'added':>9} {'tokens/s':>9}", flush=True)
    states, activations = {}, None
    for ranks in args.ranks:
        for layout in args.layouts:
            r0 = run_one(layout, ranks, argv, args.steps)[0]
            activations = r0["activations"] if r0["activations"] is not None else activations
            r0["activations"] = activations if activations is not None else float("nan")
            e = estimate_row(argv, layout, ranks)
            added = r0["peak_rss"] - r0["start_rss"]
            states[(layout, ranks)] = (r0["params"] + r0["grads"] + r0["optimizer"], added, r0["tokens_per_s"])
            print(f"{layout:<6} {ranks:>5} {r0['params'] / mib:7.1f} [{e.params / mib:5.1f}] "
                  f"{r0['grads'] / mib:7.1f} [{e.grads / mib:5.1f}] {r0['optimizer'] / mib:7.1f} [{e.optimizer / mib:5.1f}] "
                  f"{states[(layout, ranks)][0] / mib:8.1f} {r0['activations'] / mib:11.1f} "
                  f"{r0['peak_rss'] / mib:9.1f} {added / mib:9.1f} {r0['tokens_per_s']:9.1f}", flush=True)
    for ranks in args.ranks:
        if ("ddp", ranks) in states and ("fsdp", ranks) in states and ranks > 1:
            (ds, dp, dt), (fs, fp, ft) = states[("ddp", ranks)], states[("fsdp", ranks)]
            print(f"{ranks} ranks: fsdp/ddp states {fs / ds:.3f}; peak RSS added saving {(dp - fp) / mib:.0f} MiB for "
                  f"{(ds - fs) / mib:.0f} MiB fewer state bytes ({(dp - fp) / (ds - fs):.2f}x); "
                  f"tokens/s fsdp/ddp {ft / dt:.3f}")


if __name__ == "__main__":
    main()

"""What a checkpoint costs the training loop: blocking time, time until committed, resume (load) time.

    python -m bench.checkpoint_bench                                  # 124M on 1 rank, 2 ranks ddp and fsdp; ~350M on 1 rank
    python -m bench.checkpoint_bench --configs 124m:1:ddp --modes sync async --saves 5 --rounds 3
    python -m bench.checkpoint_bench --before /tmp/main               # also another checkout's code, alternated
    python -m bench.checkpoint_bench --configs tiny:1:ddp --saves 2 --rounds 1   # CI-sized (tests/test_bench.py)

A configuration is SHAPE:RANKS:LAYOUT. SHAPE is `124m` (the gpt2-124m preset's model: 12 x 12 x 768,
50,304-token vocabulary), `350m` (gpt2-350m: 24 x 16 x 1024, 355M parameters) or `tiny` (the debug
preset's); all with the classic recipe (AdamW), fp32, no compile. RANKS processes (1: plain python;
more: `torchrun --standalone`, gloo) lay the model out as LAYOUT (ddp or fsdp) exactly as the trainer
does (`dist_gpt.training.trainer.build_model`, `build_optimizers`) and save through the trainer's
`Checkpointer` (DCP, CRC32s, atomic commit, DONE) into a scratch directory, keep_last 1.

Modes: `sync` (checkpoint.async_save=false), `async` (async_save with this code's default staging:
reused host buffers), `async-fresh` (async_save, checkpoint.async_staging=fresh: a new copy per save,
the behaviour before reused buffers). With `--before DIR`, each mode also runs on the dist_gpt
package of DIR (another checkout, e.g. `git archive main | tar -x -C DIR`), labelled `before:MODE`;
there `async` is whatever that code does.

Each (configuration, mode) is its own process (job), so the first save of a job is the first save of
a run. The jobs of a configuration run in rounds, the order of the modes reversed every round
(A B C, C B A, ...), so a shared machine's load falls on every mode alike. In a job, each of
`--saves` saves follows one real training step (forward, backward, AdamW; the parameters and the
optimizer state change in place, as in training), then:

    blocking   the time `Checkpointer.save(step)` takes: what the training loop waits for
    blockcpu   the CPU time the process spent in that call (all its threads): on a machine shared with
               other jobs, what the call costs without the waiting for a core
    total      from the same start until the checkpoint is committed (`wait()` returned: DONE written)
    load       `Checkpointer.load` of the last checkpoint (`--loads` times; files in the page cache)

Every figure is the slowest rank's (a step waits for every rank). The table gives the first save's
blocking apart (it allocates the staging buffers) and medians over the later saves of every round.
"peak RSS" is rank 0's peak resident set in the job (the model, its AdamW state, the gradients and,
for async saves, the staged copy).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dist_gpt import config
from dist_gpt.checkpoint import CheckpointConfig, Checkpointer, JsonState, ModelOptimizerState
from dist_gpt.optim.optimizers import build_optimizers
from dist_gpt.parallel import dist
from dist_gpt.training.trainer import build_model

REPO = Path(__file__).resolve().parents[1]
SHAPES = {
    "124m": ["--preset", "gpt2-124m"],
    "350m": ["--preset", "gpt2-350m"],
    "tiny": ["--preset", "debug"],
}
COMMON = ["--recipe", "classic", "--train.precision=fp32", "--train.compile=false", "--train.micro_batch=1"]
MODES = {"sync": {"async_save": False}, "async": {"async_save": True},
         "async-fresh": {"async_save": True, "async_staging": "fresh"}}
DEFAULT_CONFIGS = ["124m:1:ddp", "124m:2:ddp", "124m:2:fsdp", "350m:1:ddp"]
TOKENS = 32  # tokens per training step: the step only has to change every tensor, not to be realistic


def _checkpoint_config(mode: str, root: Path):
    """The mode's CheckpointConfig; an option the code under test does not have is left out
    (`--before` code may predate async_staging: its async is then its only async)."""
    known = {f.name for f in dataclasses.fields(CheckpointConfig)}
    options = {k: v for k, v in MODES[mode].items() if k in known}
    return CheckpointConfig(keep_last=1, keep_best=False, resume="none", **options)


class Job:
    """One (configuration, mode) in this process: the trainer's model, optimizer and Checkpointer."""

    def __init__(self, shape: str, layout: str, mode: str, root: Path):
        world = dist.launch_world()
        cfg = config.parse([*SHAPES[shape], *COMMON, f"--parallel.data={layout}", f"--train.global_batch={world[0]}"],
                           world=world)
        self.env = dist.init(cfg.train.device, cfg.train.timeout_s, cfg.train.threads, cfg.parallel.data)
        self.vocab = cfg.model.vocab_size
        torch.manual_seed(0)
        self.model, _, self.train_model = build_model(cfg, self.env, "fp32")
        self.optimizers = build_optimizers(self.model, cfg.optim, self.env.device, exact=True,
                                           process_group=dist.replica_group(self.env, cfg.parallel))
        self.params = sum(p.numel() for p in self.model.parameters())
        self.note = JsonState({"step": 0})
        self.ckpt = Checkpointer(root, _checkpoint_config(mode, root), self.env,
                                 tensors={"model_optim": ModelOptimizerState(self.model, self.optimizers)},
                                 json_states={"note": self.note})

    def train_step(self, step: int) -> None:
        """One real step: every parameter and every AdamW state tensor changes in place."""
        g = torch.Generator().manual_seed(step * 1000 + self.env.rank)
        x = torch.randint(0, self.vocab, (1, TOKENS), generator=g)
        self.train_model(x, x).backward()
        for opt in self.optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)

    def slowest(self, seconds: float) -> float:
        """The slowest rank's figure (every rank calls it)."""
        if not self.env.distributed:
            return seconds
        t = torch.tensor([seconds], dtype=torch.float64)
        return float(dist.all_reduce_max(t).item())

    def timed(self, work) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        work()
        return self.slowest(time.perf_counter() - t0)

    def save(self, step: int) -> tuple[float, float, float]:
        """(blocking, its CPU time, total) of one save at `step`."""
        self.note.value = {"step": step}
        dist.barrier()
        c0, t0 = time.process_time(), time.perf_counter()
        self.ckpt.save(step)
        blocking, cpu = time.perf_counter() - t0, time.process_time() - c0
        self.ckpt.wait()
        total = time.perf_counter() - t0
        return self.slowest(blocking), self.slowest(cpu), self.slowest(total)


def worker(shape: str, layout: str, mode: str, saves: int, loads: int, out: Path) -> None:
    root = Path(os.environ["CKPT_BENCH_DIR"])
    job = Job(shape, layout, mode, root)
    blocking, cpu, total = [], [], []
    for step in range(1, saves + 1):
        job.train_step(step)
        b, c, t = job.save(step)
        blocking.append(b)
        cpu.append(c)
        total.append(t)
    latest = job.ckpt.latest()
    load = [job.timed(lambda: job.ckpt.load(latest)) for _ in range(loads)]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    if job.env.is_main:
        out.write_text(json.dumps({"blocking": blocking, "blocking_cpu": cpu, "total": total, "load": load, "peak_rss": peak,
                                   "params": job.params, "threads": torch.get_num_threads()}))
    getattr(job.ckpt, "close", job.ckpt.wait)()  # --before code may predate close()
    dist.shutdown(0)


def run_job(config: str, mode: str, code: Path, args) -> dict:
    """One job in a fresh process tree on `code`'s dist_gpt; its rank 0's record."""
    shape, ranks, layout = config.split(":")
    with tempfile.TemporaryDirectory(prefix="dist_gpt-ckptbench-", dir=args.dir) as scratch:
        out = Path(scratch) / "result.json"
        me = [str(Path(__file__).resolve()), "--worker", shape, layout, mode, str(args.saves), str(args.loads), str(out)]
        launch = ([sys.executable] if ranks == "1" else
                  [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"])
        env = {**os.environ, "PYTHONPATH": str(code), "CKPT_BENCH_DIR": str(Path(scratch) / "checkpoints")}
        proc = subprocess.run([*launch, *me], cwd=scratch, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            raise SystemExit(f"{config} {mode} on {code} failed:\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return f"{model}, {os.cpu_count()} cores"


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def report(config: str, label: str, records: list[dict]) -> None:
    first = _median([r["blocking"][0] for r in records])
    steady = [b for r in records for b in r["blocking"][1:]]
    cpu = [c for r in records for c in r["blocking_cpu"][1:]]
    total = [t for r in records for t in r["total"][1:]] or [r["total"][0] for r in records]
    load = [x for r in records for x in r["load"]]
    peak = max(r["peak_rss"] for r in records) / 2**30
    print(f"{config:<12} {label:<20} {first:>8.3f} {_median(steady):>8.3f} {min(steady, default=float('nan')):>8.3f} "
          f"{_median(cpu):>8.3f} {len(steady):>4} {_median(total):>8.2f} {_median(load):>8.2f} {peak:>9.2f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="SHAPE:RANKS:LAYOUT (default: %(default)s)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--saves", type=int, default=4, help="saves per job (the first allocates; default %(default)s)")
    p.add_argument("--loads", type=int, default=2, help="loads of the last checkpoint per job (default %(default)s)")
    p.add_argument("--rounds", type=int, default=2, help="jobs per (configuration, mode), alternated (default %(default)s)")
    p.add_argument("--before", type=Path, help="also run every mode on this directory's dist_gpt (labelled before:MODE)")
    p.add_argument("--dir", help="where the scratch checkpoints go (default: the system's temporary directory)")
    p.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        shape, layout, mode, saves, loads, out = args.worker
        worker(shape, layout, mode, int(saves), int(loads), Path(out))
        return
    sides = [(m, REPO, m) for m in args.modes]
    if args.before:
        sides += [(f"before:{m}", args.before.resolve(), m) for m in args.modes if m != "async-fresh"]
    print(f"checkpoint_bench: {machine()}; load average {load_average()} at the start; {args.saves} saves "
          f"and {args.loads} loads per job, {args.rounds} rounds; seconds, the slowest rank's", flush=True)
    print(f"{'config':<12} {'mode':<20} {'block1st':>8} {'blockmed':>8} {'blockmin':>8} {'blockcpu':>8} {'n':>4} {'total':>8} "
          f"{'load':>8} {'peak GiB':>9}", flush=True)
    for config in args.configs:
        records: dict[str, list[dict]] = {label: [] for label, _, _ in sides}
        for r in range(args.rounds):
            for label, code, mode in (sides if r % 2 == 0 else sides[::-1]):
                records[label].append(run_job(config, mode, code, args))
                rec = records[label][-1]
                print(f"# {config} {label} round {r + 1}: blocking {' '.join(f'{b:.3f}' for b in rec['blocking'])}; "
                      f"CPU {' '.join(f'{c:.3f}' for c in rec['blocking_cpu'])}; "
                      f"total {' '.join(f'{t:.2f}' for t in rec['total'])}; load {' '.join(f'{x:.2f}' for x in rec['load'])}; "
                      f"load average {load_average()}", file=sys.stderr, flush=True)
        for label, _, _ in sides:
            report(config, label, records[label])
    print(f"load average {load_average()} at the end", flush=True)


if __name__ == "__main__":
    main()

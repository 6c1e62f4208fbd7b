"""Train a GPT. The same code runs on a laptop CPU, one GPU, a node of 8 GPUs and a SLURM cluster.

    python -m dist_gpt.train                                        # one process, the `cpu` preset
    torchrun --standalone --nproc_per_node=2 -m dist_gpt.train      # 2 CPU processes (gloo)
    torchrun --standalone --nproc_per_node=8 -m dist_gpt.train --preset gpt2-124m --data.path data/fineweb
    sbatch slurm/train.sh --preset gpt2-124m                        # SLURM, one torchrun per node
    python -m dist_gpt.train --help                                 # every option, default and meaning

With no arguments it prepares the embedded default dataset (the Python standard library's own
source, byte level) if it is missing, trains the `cpu` preset, evaluates, samples, writes
TensorBoard logs to runs/cpu/ and resumes from that run's latest checkpoint when run again.
"""

from __future__ import annotations

from .training.signals import StopSignals

# Stop handlers before anything heavy: a signal that arrives while torch imports must not kill a rank.
EARLY_STOP = StopSignals().install() if __name__ == "__main__" else None

import sys  # noqa: E402  (after the handlers, on purpose)

from . import config as config_mod  # noqa: E402
from .convert.weights import InitFrom  # noqa: E402
from .parallel import dist  # noqa: E402
from .parallel import fp8  # noqa: E402
from .parallel.precision import resolve_precision  # noqa: E402
from .training import runlock  # noqa: E402
from .training.faults import named_collective_failures  # noqa: E402
from .training.oom import MemoryWatch  # noqa: E402
from .training.run_files import describe_run, write_final  # noqa: E402
from .training.trainer import Trainer, build  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    stop = EARLY_STOP or StopSignals().install()
    dist.run_main(lambda args: run(args, stop), sys.argv[1:] if argv is None else argv)


def run(argv: list[str], stop: StopSignals) -> int:
    """Parse, start the process group, build, train. Returns the exit status: 0 done (or stopped by a
    signal, with a checkpoint and a requeue marker); a refusal raises (faults.NonFiniteLoss: the NaN
    policy stopped the run, exit 3; UserError: 2; OutOfMemory: 5; see dist.refuse)."""
    cfg = config_mod.parse(argv, world=dist.launch_world())
    if cfg is None:  # --help
        return 0
    if cfg.train.fp8:  # refused before the process group starts: one line from rank 0, not one per rank
        device = dist.launch_device(cfg.train.device)
        fp8.check(device, resolve_precision(cfg.train.precision, device))
    env = dist.init(cfg.train.device, cfg.train.timeout_s, cfg.train.threads, cfg.parallel.data,
                    flight_dir=cfg.run_dir / "flight")
    init = InitFrom(cfg.train.init_from, cfg.train.init_from_unchecked_ids) if cfg.train.init_from else None
    with named_collective_failures(env, cfg.train.timeout_s), \
            runlock.held(cfg.run_dir, env, cfg.checkpoint.take_lock):  # one job per run directory
        memory = MemoryWatch(cfg, env, argv)  # out of memory: one line; CUDA snapshots
        trainer = build(cfg, env, stop, init=init)
        if env.distributed:
            (cfg.run_dir / "flight").mkdir(exist_ok=True)  # where NCCL's flight recorder dumps on a timeout
        try:
            describe_run(cfg, env, trainer.model, trainer.batches.ds, trainer.log)
            with memory.watching(trainer):
                return train(trainer, cfg.run_dir)
        finally:
            trainer.watchdog.close()
            trainer.profiler.close()  # a window the run did not reach the end of: what it recorded
            trainer.log.close()  # TensorBoard's writer flushed before the process group goes


def train(t: Trainer, run_dir) -> int:
    """The training loop: evaluate and checkpoint when they are due, step, until the last step or a stop."""
    while t.state.step < t.total_steps and not t.guard.stopped_by:
        t.profiler.at(t.state.step)  # starts or ends the train.profile window
        # 1. evaluate and checkpoint when due (both collective: every rank takes part)
        with t.watchdog.paused():  # long by nature: the hang watchdog times steps only
            t.evaluator.maybe_run(t.state.step)
            t.checkpointer.maybe_save(t.state.step)
        # 2. one optimizer step; the fault guard may skip it, roll it back or stop the run
        t.watchdog.started(t.state.step)
        t.step()  # train.nan_policy=stop (or too many rollbacks) raises faults.NonFiniteLoss: exit 3
        t.watchdog.ended()

    t.watchdog.close()
    # 3. a stop signal: every rank saves, rank 0 leaves the requeue marker for the launchers
    if t.guard.stopped_by:
        path = t.checkpointer.save(t.state.step)
        t.checkpointer.close()  # waits for the write; frees the async saves' staging buffers
        t.guard.leave_marker(run_dir, t.state.step, path)
        return 0

    # 4. the end: final evaluation, checkpoint, summary; a requeue marker left by an earlier stop is
    #    for the run now finished, so it goes (a launcher that finds one would resubmit a finished job)
    t.evaluator.maybe_run(t.state.step, final=True)
    path = t.checkpointer.save(t.state.step)
    t.checkpointer.close()  # waits for the write; frees the async saves' staging buffers
    write_final(run_dir, t, path)
    t.guard.remove_marker(run_dir)
    return 0


if __name__ == "__main__":
    main()

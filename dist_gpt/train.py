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
from .training import runlock  # noqa: E402
from .training.faults import Verdict, named_collective_failures  # noqa: E402
from .training.run_files import describe_run, write_final  # noqa: E402
from .training.trainer import Trainer, build  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    stop = EARLY_STOP or StopSignals().install()
    dist.run_main(lambda args: run(args, stop), sys.argv[1:] if argv is None else argv)


def run(argv: list[str], stop: StopSignals) -> int:
    """Parse, start the process group, build, train. Returns the exit status: 0 done (or stopped by a
    signal, with a checkpoint and a requeue marker), 3 stopped by the NaN policy."""
    cfg = config_mod.parse(argv, world=dist.launch_world())
    if cfg is None:  # --help
        return 0
    env = dist.init(cfg.train.device, cfg.train.timeout_s, cfg.train.threads, cfg.parallel.data)
    with named_collective_failures(env, cfg.train.timeout_s), \
            runlock.held(cfg.run_dir, env, cfg.checkpoint.take_lock):  # one job per run directory
        trainer = build(cfg, env, stop, init=InitFrom(cfg.train.init_from) if cfg.train.init_from else None)
        try:
            describe_run(cfg, env, trainer.model, trainer.batches.ds, trainer.log)
            return train(trainer, cfg.run_dir)
        finally:
            trainer.log.close()  # TensorBoard's writer flushed before the process group goes


def train(t: Trainer, run_dir) -> int:
    """The training loop: evaluate and checkpoint when they are due, step, until the last step or a stop."""
    while t.state.step < t.total_steps and not t.guard.stopped_by:
        # 1. evaluate and checkpoint when due (both collective: every rank takes part)
        t.evaluator.maybe_run(t.state.step)
        t.checkpointer.maybe_save(t.state.step)
        # 2. one optimizer step; the fault guard may skip it, roll it back or stop the run
        if t.step() is Verdict.STOP:
            return 3

    # 3. a stop signal: every rank saves, rank 0 leaves the requeue marker for the launchers
    if t.guard.stopped_by:
        path = t.checkpointer.save(t.state.step)
        t.checkpointer.wait()
        t.guard.leave_marker(run_dir, t.state.step, path)
        return 0

    # 4. the end: final evaluation, checkpoint, summary
    t.evaluator.maybe_run(t.state.step, final=True)
    path = t.checkpointer.save(t.state.step)
    t.checkpointer.wait()
    write_final(run_dir, t.state, t.evaluator, path, t.train_loss, t.log)
    return 0


if __name__ == "__main__":
    main()

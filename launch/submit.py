"""Submit dist_gpt training to SLURM with submitit (or run it on this machine with --local).

    python -m launch.submit --nodes 2 --gpus-per-node 8 --partition gpu --time 1440 -- --preset gpt2-124m
    python -m launch.submit --nodes 2 --gpus-per-node 0 --cpus-per-task 1 --wait -- --preset debug   # CPU nodes
    python -m launch.submit --local --tasks-per-node 2 --wait -- --preset debug                       # no SLURM

Everything after `--` goes to `python -m dist_gpt.train`. Run it from the repository root: jobs start in
the directory you submit from. The job's logs are logs/submitit/<job id>_<rank>_log.{out,err}; the run
(checkpoints, TensorBoard, final.json) is the trainer's run directory (--train.run_dir, by default
runs/<train.name>), resolved here at submission, so submitting the same command again resumes it.
`--wait` blocks until the job is done and prints its final metrics (final.json) as one JSON line.

submitit starts one task per rank (srun, no torchrun) and `TorchDistributedEnvironment().export()` turns
the SLURM task variables into RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT. Each task runs the trainer as a
child process: the trainer ends through `os._exit` (gloo's exit-time abort), so it cannot run inside
the submitit process, which must stay alive to hand back the result or requeue the job.

Who owns which signal (the warning is USR2, SLURM's `--signal=USR2@<signal_delay_s>`):
  * dist_gpt.train owns SIGUSR1, SIGUSR2 and SIGTERM in the trainer process. Every rank receives the
    warning (SLURM signals every process of the step), the ranks agree on the next step boundary, save
    one checkpoint, rank 0 writes <run_dir>/requeue.json and the trainer exits 0.
  * This launcher replaces submitit's handlers in the task process: it only forwards those signals to
    the trainer (the local executor signals the task process alone; on SLURM the trainer also gets the
    signal directly, and a second delivery changes nothing). So submitit never checkpoints on its own
    while the trainer is still saving. The trainer starts with USR1/USR2 ignored until its handlers are
    in place (once it wrote run.json); a warning that comes earlier is held and passed on then.
  * When the trainer has exited, global rank 0 looks for the marker. If it names SIGUSR1/SIGUSR2, rank 0
    consumes it and hands over to submitit's own preemption handler: it calls `TrainJob.checkpoint()`
    (the same job: the trainer resumes from the run directory's latest checkpoint) and requeues the job
    (`scontrol requeue`; the local executor re-runs it), counting time-outs against --max-requeues.
    A marker left by SIGTERM is consumed without a requeue (a cancelled job stays cancelled; preemption
    is requeued by SLURM itself). A node failure is requeued by SLURM (--requeue) like any job.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import cloudpickle
import submitit

from dist_gpt.errors import UserError

MARKER = "requeue.json"
WARNINGS = (signal.SIGUSR1, signal.SIGUSR2)
FORWARDED = (*WARNINGS, signal.SIGTERM)
REQUEUE_SIGNALS = tuple(s.name for s in WARNINGS)


def resolve_run_dir(train_args: list[str]) -> Path:
    """The run directory the trainer will use (preset, --config TOML, command line), made absolute.

    Parsing here also rejects a bad option at submission instead of after the wait in the queue.
    """
    from dist_gpt import config

    cfg = config.parse(train_args)
    if cfg is None:  # --help was printed
        raise SystemExit(0)
    return cfg.run_dir.resolve()


class TrainJob(submitit.helpers.Checkpointable):
    """The submitted callable: one per task (rank). Holds only what a requeue must resubmit."""

    def __init__(self, train_args: list[str], run_dir: Path, workdir: str) -> None:
        self.train_args = [*train_args, f"--train.run_dir={run_dir}"]
        self.run_dir = Path(run_dir)
        self.workdir = workdir

    def __call__(self) -> dict | None:
        job = submitit.JobEnvironment()
        # set_cuda_visible_devices=False: dist_gpt selects cuda:LOCAL_RANK itself, which needs every GPU visible.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        marker = self.run_dir / MARKER
        if job.global_rank == 0:
            marker.unlink(missing_ok=True)  # left by a run whose task was killed: must not requeue this one

        submitit_preempt = signal.getsignal(_preempt_signal())
        code = _run_trainer(self.train_args, self.workdir, self.run_dir)

        if job.global_rank != 0:
            if code != 0:
                raise RuntimeError(f"dist_gpt.train exited with status {code} on rank {job.global_rank}")
            return None
        if marker.exists():
            stop = json.loads(marker.read_text())
            marker.unlink()
            print(f"[launch.submit] requeue marker: {stop}", flush=True)
            if stop.get("signal") in REQUEUE_SIGNALS and callable(submitit_preempt):
                # submitit's own path: checkpoint() -> dump the resubmission -> requeue -> exit.
                submitit_preempt(_preempt_signal(), None)
            raise RuntimeError(f"training stopped by {stop.get('signal')} at step {stop.get('step')} and was not "
                               f"requeued; resubmit the same command to resume from {stop.get('checkpoint')}")
        if code != 0:
            raise RuntimeError(f"dist_gpt.train exited with status {code}; see this job's log")
        final = json.loads((self.run_dir / "final.json").read_text())
        return {**final, "run_dir": str(self.run_dir)}


def _preempt_signal() -> signal.Signals:
    """The signal submitit treats as preemption/time-out (its SUBMITIT_PREEMPT_SIGNAL, USR2 by default)."""
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))


def _run_json_id(run_dir: Path) -> tuple[int, int] | None:
    """Rank 0 writes run.json (a new file each time) once every rank installed its stop handlers and
    joined the process group; a run.json other than the one there at the start means the trainer is up.
    Compared by identity, not by clock: the nodes' clocks may differ."""
    try:
        st = (run_dir / "run.json").stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def _run_trainer(args: list[str], workdir: str, run_dir: Path) -> int:
    """Run `python -m dist_gpt.train ARGS` to the end, passing stop signals on to it; return its status.

    The trainer starts with USR1/USR2 ignored (an ignored signal stays ignored across exec) until its own
    handlers replace that: one arriving while it still imports torch would kill it. A warning that comes
    before the trainer is up is held here and passed on once it is; SIGTERM is passed on at once.
    """
    before = _run_json_id(run_dir)
    held: list[int] = []

    def trainer_up() -> bool:
        now = _run_json_id(run_dir)
        return now is not None and now != before

    for sig in WARNINGS:
        signal.signal(sig, signal.SIG_IGN)
    child = subprocess.Popen([sys.executable, "-m", "dist_gpt.train", *args], cwd=workdir)

    def forward(signum, frame) -> None:
        if signum in WARNINGS and not trainer_up():
            held.append(signum)
        elif child.poll() is None:
            child.send_signal(signum)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    while True:
        try:
            return child.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass
        if held and trainer_up():
            for signum in held:
                child.send_signal(signum)
            held.clear()


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    argv = sys.argv[1:] if argv is None else list(argv)
    train_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, train_args = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(prog="python -m launch.submit", description=__doc__.split("\n")[0],
                                epilog="Arguments after -- go to python -m dist_gpt.train.")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8, help="0 for CPU nodes (gloo)")
    p.add_argument("--tasks-per-node", type=int, default=None,
                   help="ranks per node (default: --gpus-per-node, or 1 on CPU nodes)")
    p.add_argument("--cpus-per-task", type=int, default=None)
    p.add_argument("--mem-gb", type=float, default=None)
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--time", type=int, default=24 * 60, help="time limit in minutes per (re)run")
    p.add_argument("--signal-delay", type=int, default=120,
                   help="seconds before the time limit that USR2 asks the trainer to checkpoint")
    p.add_argument("--max-requeues", type=int, default=10, help="time-outs after which the job is not requeued")
    p.add_argument("--name", default="dist_gpt", help="job name")
    p.add_argument("--folder", default="logs/submitit", help="submitit's folder for pickles and logs")
    p.add_argument("--local", action="store_true", help="run here with submitit's local executor")
    p.add_argument("--wait", action="store_true", help="wait for the job and print its final metrics")
    return p.parse_args(argv), train_args


def make_executor(a: argparse.Namespace) -> submitit.core.core.Executor:
    tasks = a.tasks_per_node or max(a.gpus_per_node, 1)
    if a.local:
        if a.nodes != 1:
            raise SystemExit("error: --local runs on this machine only: use --nodes 1")
        executor = submitit.LocalExecutor(folder=a.folder, max_num_timeout=a.max_requeues)
        executor.update_parameters(tasks_per_node=tasks, gpus_per_node=a.gpus_per_node, timeout_min=a.time,
                                   signal_delay_s=a.signal_delay)
        return executor
    executor = submitit.SlurmExecutor(folder=a.folder, max_num_timeout=a.max_requeues)
    params = dict(job_name=a.name, nodes=a.nodes, ntasks_per_node=tasks, time=a.time,
                  signal_delay_s=a.signal_delay, additional_parameters={"requeue": True})
    optional = dict(gpus_per_node=a.gpus_per_node, cpus_per_task=a.cpus_per_task, partition=a.partition,
                    account=a.account, mem=f"{a.mem_gb}GB" if a.mem_gb else None)
    params.update({k: v for k, v in optional.items() if v})
    executor.update_parameters(**params)
    return executor


def main(argv: list[str] | None = None) -> int:
    a, train_args = parse_args(argv)
    try:
        run_dir = resolve_run_dir(train_args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # Pickle TrainJob by value: the job then needs only submitit and dist_gpt, not this checkout on its path.
    if TrainJob.__module__ != "__main__":  # (__main__ is pickled by value anyway)
        cloudpickle.register_pickle_by_value(sys.modules[TrainJob.__module__])
    job = make_executor(a).submit(TrainJob(train_args, run_dir, os.getcwd()))
    print(f"submitted job {job.job_id}; logs: {job.paths.stdout}; run: {run_dir}", flush=True)
    if not a.wait:
        return 0
    print(json.dumps(job.results()[0]), flush=True)  # rank 0 returns the metrics
    return 0


if __name__ == "__main__":
    sys.exit(main())

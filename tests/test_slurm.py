"""slurm/train.sh and launch/submit.py against a real two-node SLURM on this machine.

    sudo bash slurm/cluster/up.sh && python -m pytest tests/test_slurm.py -q     # ~5-8 minutes on 2 cores

The cluster (slurm/cluster/up.sh: slurmctld + nodes n1, n2 of one CPU each) is started by the
`cluster` fixture when the tests run as root, and stopped at the end of the session if the fixture
started it (`DIST_GPT_SLURM_KEEP=1` keeps it running); elsewhere they skip with the reason, except
under CI=true, where a cluster that does not start fails the run. Every job trains the same fp32 `debug`
configuration with one rank per node, so its losses can be compared with the uninterrupted two-node
run (computed once per session) and with a single-process run of the same global batch.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import EXACT, REPO, _env, final, losses, pause_env, run_train, wait_paused

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

STEPS = 200      # ~9 s of training on two idle cores
INTERVAL = 50    # checkpoint every 50 steps: the jobs that are interrupted wait for it before step 50
RTOL = 1e-5


def train_args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    """The debug preset in fp32, with the classic recipe and a global batch of 64.

    1 and 2 ranks add gradients in a different order (~1e-7 apart); training amplifies that. Largest
    relative loss difference, 1 vs 2 ranks, measured here: classic recipe (AdamW) at a global batch of
    64, 1.1e-6 over 200 steps; at the preset's batch of 8, 2.3e-5 by step 200; the modern recipe
    (Muon), 8e-4 by step 50 at a batch of 64 and 1e-2 by step 100 at 8. One thread per rank: both
    "nodes" share this machine's cores.
    """
    return [*EXACT, "--recipe=classic", "--train.global_batch=64", "--train.micro_batch=16",
            f"--data.path={data}", f"--train.steps={STEPS}", f"--checkpoint.interval={INTERVAL}",
            "--checkpoint.keep_last=0", "--train.threads=1", f"--train.run_dir={run_dir}", *extra]


# ---------------------------------------------------------------------------------------------
# The cluster and its jobs

def unavailable(reason: str) -> None:
    """Skip with the reason; under CI=true a cluster that cannot start fails the run instead."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI=true: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def cluster():
    """The local cluster, started for this session if it is not running; stopped at the end when this
    session started it (a cluster that was already up, e.g. started by .ci/run, stays up), unless
    DIST_GPT_SLURM_KEEP=1 asks to keep it for the next session."""
    if os.geteuid() != 0:
        unavailable("the local SLURM cluster needs root to start (sudo bash slurm/cluster/up.sh)")
    out = subprocess.run(["bash", str(REPO / "slurm/cluster/up.sh")], capture_output=True, text=True, timeout=900)
    started = re.search(r"^\[slurm-cluster\] started ", out.stdout, flags=re.MULTILINE) is not None
    try:
        if out.returncode != 0:
            unavailable(f"slurm/cluster/up.sh failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
        yield
    finally:
        if started and os.environ.get("DIST_GPT_SLURM_KEEP", "") not in ("1", "true", "yes"):
            subprocess.run(["bash", str(REPO / "slurm/cluster/down.sh"), "--quiet"], capture_output=True, timeout=120)


def sbatch(workdir: Path, args: list[str], *sbatch_flags: str, nodes: int = 2, per_node: int = 1,
           env: dict | None = None) -> str:
    """Submit slurm/train.sh from `workdir` on CPU nodes, `per_node` ranks per node; returns the job id."""
    (workdir / "logs/slurm").mkdir(parents=True, exist_ok=True)
    cmd = ["sbatch", "--parsable", f"--nodes={nodes}", "--gpus-per-node=0", "--cpus-per-task=1",
           f"--chdir={workdir}", *sbatch_flags, str(REPO / "slurm/train.sh"), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                         env=_env({"NPROC_PER_NODE": str(per_node), **(env or {})}))
    return out.stdout.strip().split(";")[0]


def job_info(job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    # One line of Key=Value pairs; the job's command line (train.sh's arguments) is left out.
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv and not kv.startswith("-"))


def job_log(workdir: Path, job: str) -> str:
    path = workdir / f"logs/slurm/dist_gpt-{job}.out"
    return path.read_text() if path.exists() else f"(no log at {path})"


def wait_done(job: str, timeout: float, log: Path | None = None) -> dict[str, str]:
    """Wait until the job left the queue for good (a requeued job comes back as PENDING)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(job)
        if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return info
        time.sleep(1)
    subprocess.run(["scancel", job])
    tail = log.read_text()[-4000:] if log and log.exists() else ""
    raise AssertionError(f"job {job} still not done after {timeout:.0f} s: {job_info(job)}\n{tail}")


def running(job: str) -> Callable[[], bool]:
    """Whether the job is still queued or running (for `wait_paused`)."""
    return lambda: job_info(job).get("JobState") in ("PENDING", "CONFIGURING", "RUNNING", "REQUEUED")


def assert_same_run(run_dir: Path, reference: Path, rtol: float, steps: range | None = None) -> None:
    """Every logged step's training loss and the final validation loss agree with the reference.

    rtol=0 (bitwise) where the world size is the same as the reference's: an interrupted and resumed
    run must be the uninterrupted one exactly.
    """
    got, ref = losses(run_dir), losses(reference)
    steps = steps or range(1, STEPS + 1)
    assert set(steps) <= set(got), f"steps missing from {run_dir}: {sorted(set(steps) - set(got))}"
    worst = max(abs(got[s] - ref[s]) / abs(ref[s]) for s in steps)
    print(f"{run_dir.parent.name}: largest relative loss difference {worst:.2e} over steps {steps}")
    assert worst <= rtol, f"largest relative loss difference {worst:.2e} over steps {steps}"
    fin, fin_ref = final(run_dir), final(reference)
    assert fin["step"] == fin_ref["step"] == STEPS
    assert abs(fin["val_loss"] - fin_ref["val_loss"]) <= rtol * abs(fin_ref["val_loss"]), (fin, fin_ref)


def resumed_at(log: str) -> list[int]:
    """The step each later run of a requeued job resumed from, as its rank 0 said in the job's log
    (every run of a requeued job appends to the same log)."""
    return [int(step) for step in re.findall(r"^resumed from \S+ at step (\d+)", log, flags=re.MULTILINE)]


# ---------------------------------------------------------------------------------------------
# Reference runs, once per session

@pytest.fixture(scope="session")
def single_process_run(tiny_data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("single") / "run"
    run_train(train_args(tiny_data, run))
    return run


@dataclass
class Reference:
    work: Path        # the directory it was submitted from
    run: Path         # its run directory
    job: str
    submitted: float  # time.time() at sbatch


@pytest.fixture(scope="session")
def two_node_run(cluster, tiny_data, tmp_path_factory) -> Reference:
    """The uninterrupted `sbatch -N 2 slurm/train.sh`, the reference of every other job."""
    work = tmp_path_factory.mktemp("two_node")
    run = work / "run"
    submitted = time.time()
    job = sbatch(work, train_args(tiny_data, run, "--log.tensorboard=true"))
    info = wait_done(job, 300, work / f"logs/slurm/dist_gpt-{job}.out")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, job_log(work, job))
    return Reference(work, run, job, submitted)


# ---------------------------------------------------------------------------------------------
# a. two nodes, to completion

def test_two_node_job_trains_to_completion_like_one_process(two_node_run, single_process_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    work, run, job = two_node_run.work, two_node_run.run, two_node_run.job
    log = job_log(work, job)
    # One torchrun per node: both nodes, one rendezvous on the first, a world of 2.
    assert job_info(job)["NodeList"] == "n[1-2]"
    assert "2 node(s) (n[1-2]) x 1 worker(s), rendezvous n1:" in log, log[-3000:]
    assert json.loads((run / "run.json").read_text())["world_size"] == 2
    assert_same_run(run, single_process_run, RTOL)
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("step_*") if (p / "DONE").exists())
    assert ckpts == [f"step_{s:07d}" for s in range(INTERVAL, STEPS + 1, INTERVAL)]
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, STEPS + 1))
    assert acc.Scalars("val/loss")[-1].step == STEPS


# ---------------------------------------------------------------------------------------------
# b. a real time limit: warned, checkpointed, requeued, finished

def next_time_limit_check(tmp: Path) -> float:
    """The wall-clock time of slurmctld's next time-limit pass.

    slurmctld enforces time limits and sends `--signal` warnings in one pass every 30 s, and sends a
    warning up to 30 s early, so a warning lands anywhere in a 30 s window unless the job is started
    at a known phase of that pass. A probe job whose warning is due at once shows the phase.
    """
    stamp = tmp / "probe_warned_at"
    script = f"trap 'date +%s.%N > {stamp}; exit 0' USR2; sleep 120 & wait"
    job = subprocess.run(["sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0", "--time=1", "--signal=USR2@59",
                          "--output=/dev/null", f"--wrap=srun bash -c \"{script}\""],
                         capture_output=True, text=True, check=True).stdout.strip()
    deadline = time.monotonic() + 60
    while not (stamp.exists() and stamp.read_text().strip()):
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job])
            raise AssertionError(f"probe job {job} was not warned within 60 s: {job_info(job)}")
        time.sleep(0.2)
    passed = float(stamp.read_text())
    wait_done(job, 60)
    return passed + 30 * math.ceil((time.time() - passed) / 30)


def startup_seconds(ref: Reference) -> float:
    """Seconds from sbatch to the first training step, as the reference job went."""
    first = next(json.loads(line)["time"] for line in (ref.run / "metrics.jsonl").read_text().splitlines()
                 if "train/loss" in line)
    return first - ref.submitted


def test_time_limit_warns_checkpoints_requeues_and_finishes(cluster, tiny_data, tmp_path, two_node_run):
    run = tmp_path / "run"
    # --time=1 with the warning due at once (@59): it comes at slurmctld's first pass after the start.
    # Submitted `delay` s before a pass, it reaches the batch script about half way through start-up
    # (held until the trainer is up) or early in training: either way well before the end, with
    # seconds of slack on both sides for a pass that comes early or late.
    delay = startup_seconds(two_node_run) / 2
    check = next_time_limit_check(tmp_path)
    while check - delay < time.time() + 0.5:
        check += 30
    time.sleep(check - delay - time.time())
    job = sbatch(tmp_path, train_args(tiny_data, run), "--time=1", "--signal=B:USR2@59")
    # Each run of the job is warned at its first pass; once it was requeued, give it the time to finish
    # (root may raise a time limit), or on a loaded machine it would start, warn and requeue for minutes.
    deadline = time.monotonic() + 180
    while int(job_info(job).get("Restarts", 0)) == 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    subprocess.run(["scontrol", "update", f"jobid={job}", "TimeLimit=10"], check=True)
    info = wait_done(job, 300, tmp_path / f"logs/slurm/dist_gpt-{job}.out")
    log = job_log(tmp_path, job)
    assert info["JobState"] == "COMPLETED", (info, log[-4000:])
    assert "warning SIGUSR2: passing it to the job step" in log, log[-4000:]
    assert int(info["Restarts"]) >= 1 and 'requeue marker: {"signal":"SIGUSR2"' in log and "requeueing job" in log, log[-4000:]
    assert resumed_at(log) == [int(step) for step in re.findall(r'requeue marker: \{"signal":"SIGUSR2","step":(\d+)', log)]
    assert_same_run(run, two_node_run.run, 0.0)


# ---------------------------------------------------------------------------------------------
# c. a lost node: SLURM requeues, the job finishes; its checkpoint carries on on one node

def test_lost_node_is_requeued_and_its_checkpoint_continues_on_one_node(cluster, tiny_data, tmp_path, two_node_run):
    run, hold = tmp_path / "run", tmp_path / "pause"
    # both ranks wait before step INTERVAL, its checkpoint complete, until the node is gone (first run only)
    job = sbatch(tmp_path, train_args(tiny_data, run), "--requeue", env=pause_env(hold, INTERVAL))
    try:
        wait_paused(hold, INTERVAL, 2, running(job))
        assert (run / "checkpoints" / f"step_{INTERVAL:07d}" / "DONE").exists()
        subprocess.run(["scontrol", "update", "nodename=n2", "state=down", "reason=dist_gpt-lost-node-test"],
                       check=True)
        info = wait_done(job, 300, tmp_path / f"logs/slurm/dist_gpt-{job}.out")
    finally:
        # ReturnToService=2 brings n2 back by itself; make sure of it for the tests that follow.
        subprocess.run(["scontrol", "update", "nodename=n2", "state=resume"], capture_output=True)
    log = job_log(tmp_path, job)
    assert info["JobState"] == "COMPLETED", (info, log[-4000:])
    assert int(info["Restarts"]) >= 1 and "NODE FAILURE" in log, log[-4000:]
    assert resumed_at(log) and resumed_at(log)[0] >= INTERVAL, f"not resumed from a checkpoint: {resumed_at(log)}"
    assert_same_run(run, two_node_run.run, 0.0)

    # The two-rank checkpoint of step 50, resumed on one node by one rank: the identical global
    # data stream, so the same losses from step 51 on (within fp32 reduction-order noise).
    one = tmp_path / "one_node"
    job1 = sbatch(tmp_path, train_args(tiny_data, one, f"--resume={run / 'checkpoints' / f'step_{INTERVAL:07d}'}"),
                  nodes=1)
    info1 = wait_done(job1, 300, tmp_path / f"logs/slurm/dist_gpt-{job1}.out")
    assert info1["JobState"] == "COMPLETED", (info1, job_log(tmp_path, job1)[-4000:])
    assert "1 node(s)" in job_log(tmp_path, job1)
    assert min(losses(one)) == INTERVAL + 1, "the one-node run did not start from the checkpoint"
    assert_same_run(one, two_node_run.run, RTOL, range(INTERVAL + 1, STEPS + 1))


# ---------------------------------------------------------------------------------------------
# e. hsdp across the nodes: replicated across them, sharded within each; resumed on one node

def test_hsdp_on_two_nodes_matches_and_its_checkpoint_continues_on_one_node(cluster, tiny_data, tmp_path,
                                                                            two_node_run):
    run = tmp_path / "run"
    job = sbatch(tmp_path, train_args(tiny_data, run, "--parallel.data=hsdp"), per_node=2)
    info = wait_done(job, 600, tmp_path / f"logs/slurm/dist_gpt-{job}.out")
    log = job_log(tmp_path, job)
    assert info["JobState"] == "COMPLETED", (info, log[-4000:])
    assert "2 node(s) (n[1-2]) x 2 worker(s)" in log, log[-3000:]
    assert json.loads((run / "run.json").read_text())["layout"] == "hsdp 2 × 2 (replicas × shard)"
    assert_same_run(run, two_node_run.run, RTOL)

    one = tmp_path / "one_node"  # the sharded checkpoint of step 50, as ddp on one node, one rank
    job1 = sbatch(tmp_path, train_args(tiny_data, one, f"--resume={run / 'checkpoints' / f'step_{INTERVAL:07d}'}"),
                  nodes=1)
    info1 = wait_done(job1, 300, tmp_path / f"logs/slurm/dist_gpt-{job1}.out")
    assert info1["JobState"] == "COMPLETED", (info1, job_log(tmp_path, job1)[-4000:])
    assert min(losses(one)) == INTERVAL + 1, "the one-node run did not start from the checkpoint"
    assert_same_run(one, two_node_run.run, RTOL, range(INTERVAL + 1, STEPS + 1))


# ---------------------------------------------------------------------------------------------
# d. submitit on the same cluster: warned, requeued through submitit, final metrics returned

def test_submitit_job_is_warned_requeued_and_returns_final_metrics(cluster, tiny_data, tmp_path, two_node_run):
    run, hold = tmp_path / "run", tmp_path / "pause"
    cmd = [sys.executable, "-m", "launch.submit", "--nodes", "2", "--gpus-per-node", "0", "--cpus-per-task", "1",
           "--time", "10", "--folder", str(tmp_path / "submitit"), "--wait", "--", *train_args(tiny_data, run)]
    # both ranks wait before step INTERVAL, its checkpoint complete, until the warning reaches them
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(pause_env(hold, INTERVAL)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()
        assert first.startswith("submitted job "), first + proc.stderr.read()
        job = first.split()[2].rstrip(";")
        wait_paused(hold, INTERVAL, 2, running(job))
        subprocess.run(["scancel", "--signal=USR2", job], check=True)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-4000:]
    metrics = json.loads(out.strip().splitlines()[-1])
    assert Path(metrics["run_dir"]) == run
    rank0_log = "".join((tmp_path / "submitit" / f"{job}_0_log.{ext}").read_text() for ext in ("out", "err"))
    assert "Requeued job" in rank0_log, rank0_log[-3000:]
    assert resumed_at(rank0_log) == [INTERVAL + 1], resumed_at(rank0_log)  # the warning came at step INTERVAL
    assert_same_run(run, two_node_run.run, 0.0)
    for key in ("step", "val_loss", "val_bpb"):
        assert metrics[key] == final(run)[key]

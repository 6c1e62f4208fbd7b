"""launch/submit.py with submitit's local executor (no SLURM needed; the cluster path is in test_slurm.py).

    python -m pytest tests/test_submit.py -q        # ~1 minute on 2 cores
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import EXACT, REPO, _env, final, losses

STEPS, INTERVAL = 120, 40


def submit_cmd(folder: Path, run_dir: Path, data: Path) -> list[str]:
    return [sys.executable, "-m", "launch.submit", "--local", "--gpus-per-node", "0", "--tasks-per-node", "2",
            "--time", "10", "--folder", str(folder), "--wait", "--",
            *EXACT, "--recipe=classic", "--train.global_batch=64", "--train.micro_batch=16", f"--data.path={data}",
            f"--train.steps={STEPS}", f"--checkpoint.interval={INTERVAL}", "--train.threads=1",
            f"--train.run_dir={run_dir}"]


def last_json_line(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_bad_option_fails_at_submission(tmp_path):
    out = subprocess.run([sys.executable, "-m", "launch.submit", "--local", "--folder", str(tmp_path / "f"),
                          "--", "--preset", "debug", "--train.stepz=3"],
                         capture_output=True, text=True, cwd=REPO, env=_env(), timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("error: unknown option --train.stepz")
    assert not (tmp_path / "f").exists(), "nothing may be submitted when the options are wrong"


@pytest.fixture(scope="module")
def local_run(tiny_data, tmp_path_factory) -> tuple[Path, dict]:
    work = tmp_path_factory.mktemp("local")
    run = work / "run"
    out = subprocess.run(submit_cmd(work / "submitit", run, tiny_data), capture_output=True, text=True,
                         cwd=work, env=_env(), timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return run, last_json_line(out.stdout)


@pytest.mark.slow
def test_local_job_trains_two_ranks_and_returns_final_metrics(local_run):
    run, metrics = local_run
    assert metrics == {**final(run), "run_dir": str(run)}
    assert metrics["step"] == STEPS
    assert json.loads((run / "run.json").read_text())["world_size"] == 2


def task_pids(folder: Path) -> list[int]:
    """The submitit task processes of the job whose files are in `folder` (what the local executor signals)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if b"submitit.core._submit" in cmd and str(folder).encode() in cmd:
            pids.append(int(proc.name))
    return pids


@pytest.mark.slow
def test_local_job_warned_by_usr2_is_requeued_and_matches_the_uninterrupted_run(local_run, tiny_data, tmp_path):
    run = tmp_path / "run"
    folder = tmp_path / "submitit"
    proc = subprocess.Popen(submit_cmd(folder, run, tiny_data), cwd=tmp_path, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        done = run / "checkpoints" / f"step_{INTERVAL:07d}" / "DONE"
        deadline = time.monotonic() + 300
        while not done.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint while the job runs"
            time.sleep(0.2)
        # What the local executor does before its time limit: USR2 to each task process, which
        # forwards it to its trainer.
        pids = task_pids(folder)
        assert len(pids) == 2, pids
        for pid in pids:
            os.kill(pid, signal.SIGUSR2)
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-4000:]
    log = (folder / next(p.name for p in folder.glob("*_0_log.out"))).read_text()
    assert "requeue marker" in log and "Requeued job" in log, log[-3000:]
    assert last_json_line(out)["val_loss"] == local_run[1]["val_loss"]
    assert losses(run) == losses(local_run[0])

"""launch/submit.py with submitit's local executor (no SLURM needed; the cluster path is in test_slurm.py).

    python -m pytest tests/test_submit.py -q        # ~1 minute on 2 cores
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import EXACT, REPO, _env, final, losses, pause_env, release, wait_paused

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


def pids_with(*parts: str) -> list[int]:
    """Processes whose command line contains every one of `parts`."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
        except (OSError, ValueError):
            continue
        if proc.name.isdigit() and all(p.encode() in cmd for p in parts):
            pids.append(int(proc.name))
    return pids


@pytest.mark.slow
def test_local_job_warned_during_startup_is_requeued_and_matches_the_uninterrupted_run(local_run, tiny_data,
                                                                                       tmp_path):
    run = tmp_path / "run"
    folder = tmp_path / "submitit"
    hold = tmp_path / "pause"
    # Both trainers are held once their stop handlers are in (dist_gpt.hooks.pause), before they are up.
    # Then what the local executor does before its time limit: USR2 to each task process. The tasks must
    # hold it until the trainers can take it, then pass it on; the trainers wait for it before step
    # 0, so the run cannot end first.
    proc = subprocess.Popen(submit_cmd(folder, run, tiny_data), cwd=tmp_path, env=_env(pause_env(hold, "start", 0)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_paused(hold, "start", 2, lambda: proc.poll() is None)
        assert not (run / "run.json").exists()
        tasks = pids_with("submitit.core._submit", str(folder))
        assert len(tasks) == 2, tasks
        for pid in tasks:
            os.kill(pid, signal.SIGUSR2)
        release(hold, "start")
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-4000:]
    log = next(folder.glob("*_0_log.out")).read_text()
    assert "requeue marker" in log and "Requeued job" in log, log[-3000:]
    assert "'step': 1," in log, log[-3000:]  # stopped at the first step boundary, where it waited for the warning
    assert last_json_line(out)["val_loss"] == local_run[1]["val_loss"]
    assert losses(run) == losses(local_run[0])

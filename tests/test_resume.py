"""Exact resume, resume on another world size, crashes, signals and the NaN policies (fp32, gloo)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from conftest import EXACT, final, losses, run_train

STEPS = 20


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    """One uninterrupted 2-rank run, computed once for every comparison in this module."""
    run = tmp_path_factory.mktemp("ref") / "run"
    run_train([*EXACT, f"--data.path={tiny_data}", f"--train.run_dir={run}"], nproc=2)
    return losses(run)


def _args(tiny_data, run, *extra):
    return [*EXACT, f"--data.path={tiny_data}", f"--train.run_dir={run}", *extra]


def _crash_at_13(tiny_data, run, nproc=2):
    """A 20-step run with checkpoints every 5 steps whose rank 0 is SIGKILLed before step 13 (no restarts):
    the job fails, its last complete checkpoint is step 10."""
    out = run_train(_args(tiny_data, run, "--checkpoint.interval=5"), nproc=nproc,
                    env={"DIST_GPT_FAULT_KILL_AT": "13:0"}, check=False)
    assert out.returncode != 0
    assert (run / "checkpoints" / "step_0000010" / "DONE").exists()
    assert not (run / "final.json").exists()


def test_resume_after_a_crash_is_bitwise_exact_on_the_same_world_size(tiny_data, tmp_path, reference):
    run = tmp_path / "run"
    _crash_at_13(tiny_data, run)
    run_train(_args(tiny_data, run, "--checkpoint.interval=5"), nproc=2)  # --resume auto (the default)
    got = losses(run)
    assert [got[s] for s in range(1, STEPS + 1)] == [reference[s] for s in range(1, STEPS + 1)]


def test_two_rank_checkpoint_continues_on_one_rank(tiny_data, tmp_path, reference):
    run = tmp_path / "run"
    _crash_at_13(tiny_data, run)
    run_train(_args(tiny_data, run, "--train.micro_batch=4"), nproc=1)
    got = losses(run)
    worst = max(abs(got[s] - reference[s]) / reference[s] for s in range(11, STEPS + 1))
    print(f"2 -> 1 rank resume: largest relative loss difference {worst:.2e}")
    assert worst < 1e-5
    # The identical data stream: the sampler continued where the 2-rank run's checkpoint left it.
    meta = json.loads((run / "checkpoints" / f"step_{STEPS:07d}" / "meta.json").read_text())
    assert meta["batches"]["position"] == STEPS


def test_sigkilled_rank_restarted_by_torchrun_gives_identical_losses(tiny_data, tmp_path, reference):
    run = tmp_path / "run"
    out = run_train(_args(tiny_data, run, "--checkpoint.interval=5"), nproc=2, max_restarts=1,
                    env={"DIST_GPT_FAULT_KILL_AT": "13:1"})
    got = losses(run)
    assert [got[s] for s in range(1, STEPS + 1)] == [reference[s] for s in range(1, STEPS + 1)]
    assert final(run)["step"] == STEPS
    assert "restart" in (out.stdout + out.stderr).lower() or "SIGKILL" in out.stderr


@pytest.mark.parametrize("sig", ["SIGUSR1", "SIGUSR2", "SIGTERM"])
def test_stop_signals_checkpoint_and_leave_the_requeue_marker(tiny_data, tmp_path, sig, reference):
    run = tmp_path / "run"
    run_train(_args(tiny_data, run), nproc=2, env={"DIST_GPT_FAULT_SIGNAL_AT": f"7:{sig}"})
    marker = json.loads((run / "requeue.json").read_text())
    assert marker["signal"] == sig and marker["step"] == 8
    assert (run / "checkpoints" / "step_0000008" / "DONE").exists()
    assert not (run / "final.json").exists()
    # The requeued job (same command) finishes with the uninterrupted run's losses.
    run_train(_args(tiny_data, run), nproc=2)
    got = losses(run)
    assert [got[s] for s in range(1, STEPS + 1)] == [reference[s] for s in range(1, STEPS + 1)]
    # The run is finished: its marker must not make a launcher resubmit it (plain torchrun path).
    assert (run / "final.json").exists() and not (run / "requeue.json").exists()


def test_resume_none_refuses_a_used_run_directory(tiny_data, tmp_path):
    run = tmp_path / "run"
    run_train(_args(tiny_data, run, "--train.steps=3"))
    out = run_train(_args(tiny_data, run, "--train.steps=3", "--resume", "none"), check=False)
    assert out.returncode == 2 and "--force" in out.stderr and "Traceback" not in out.stderr
    run_train(_args(tiny_data, run, "--train.steps=3", "--resume", "none", "--force"))
    assert list(run.glob("checkpoints.old-*")), "the old checkpoints are moved aside, not deleted"


def test_changed_model_shape_is_a_clear_message(tiny_data, tmp_path):
    run = tmp_path / "run"
    run_train(_args(tiny_data, run, "--train.steps=3"))
    out = run_train(_args(tiny_data, run, "--train.steps=6", "--model.n_layer=3"), check=False)
    assert out.returncode == 2 and "model.n_layer=2 there but 3 here" in out.stderr
    out = run_train(_args(tiny_data, run, "--train.steps=6", "--train.global_batch=16"), check=False)
    assert out.returncode == 2 and "train.global_batch" in out.stderr


def test_nan_policy_skip_drops_the_step(tiny_data, tmp_path):
    run = tmp_path / "run"
    out = run_train(_args(tiny_data, run, "--train.steps=6", "--train.nan_policy=skip"),
                    env={"DIST_GPT_FAULT_NAN_AT": "3"})
    assert "step skipped" in out.stdout
    assert final(run)["step"] == 6
    meta = json.loads((run / "checkpoints" / "step_0000006" / "meta.json").read_text())
    assert meta["run"]["skipped"] == [3] and meta["batches"]["position"] == 7


def test_nan_policy_rollback_reloads_and_skips_the_batch(tiny_data, tmp_path):
    run = tmp_path / "run"
    out = run_train(_args(tiny_data, run, "--train.steps=8", "--train.nan_policy=rollback",
                          "--checkpoint.interval=2"), env={"DIST_GPT_FAULT_NAN_AT": "5"})
    assert "rolled back to step_0000004" in out.stdout
    meta = json.loads((run / "checkpoints" / "step_0000008" / "meta.json").read_text())
    assert meta["run"]["bad_positions"] == [5] and meta["run"]["rollbacks"] == 1
    assert meta["batches"]["position"] == 9  # batches 0..8 with 5 skipped


def test_nan_policy_stop_is_a_clear_error(tiny_data, tmp_path):
    run = tmp_path / "run"
    out = run_train(_args(tiny_data, run, "--train.steps=6"), env={"DIST_GPT_FAULT_NAN_AT": "2"}, check=False)
    assert out.returncode == 3
    assert "non-finite loss at step 2" in out.stdout + out.stderr


def test_a_rank_that_stops_answering_fails_the_job_naming_it(tiny_data, tmp_path):
    run = tmp_path / "run"
    out = run_train(_args(tiny_data, run, "--train.timeout_s=5"), nproc=2, check=False, timeout=120,
                    env={"DIST_GPT_FAULT_HANG_AT": "6:1"})
    assert out.returncode != 0
    line = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert line and "rank 1 (last heard in the stop/NaN agreement of step 5" in line[0] and "stopped answering" in line[0], out.stderr[-3000:]
    assert "train.timeout_s=5" in line[0]


def test_resume_with_dropout_draws_the_same_masks(tiny_data, tmp_path):
    """Dropout masks are seeded per (seed, step, rank), so a crashed run with dropout resumes bitwise."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    args = ["--model.dropout=0.1", "--checkpoint.interval=5"]
    run_train([*_args(tiny_data, ref), *args])
    out = run_train([*_args(tiny_data, run), *args], env={"DIST_GPT_FAULT_KILL_AT": "13:0"}, check=False)
    assert out.returncode != 0
    run_train([*_args(tiny_data, run), *args])
    a, b = losses(ref), losses(run)
    assert [a[s] for s in range(1, STEPS + 1)] == [b[s] for s in range(1, STEPS + 1)]


def test_a_warning_during_start_up_is_kept_not_fatal(tiny_data, tmp_path):
    """SIGUSR2 while torch is still importing: the rank survives, stops at the first step boundary,
    saves and leaves the requeue marker."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from conftest import REPO, _env, pause_env, wait_paused

    run, hold = tmp_path / "run", tmp_path / "pause"
    # held once its stop handlers are in, before torch is imported; the signal itself releases it
    proc = subprocess.Popen([sys.executable, "-m", "dist_gpt.train", *_args(tiny_data, run)],
                            env=_env(pause_env(hold, "start")), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_paused(hold, "start", 1, lambda: proc.poll() is None)
    assert "libtorch" not in (Path("/proc") / str(proc.pid) / "maps").read_text()  # torch not loaded yet
    proc.send_signal(signal.SIGUSR2)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert json.loads((run / "requeue.json").read_text())["signal"] == "SIGUSR2"


def _last_checkpoint(run):
    return sorted((run / "checkpoints").glob("step_*"))[-1]


def test_a_damaged_meta_json_is_named_before_it_is_parsed(tiny_data, tmp_path):
    """A flipped byte in meta.json is caught by its CRC32 in DONE before anything is parsed: not a
    UnicodeDecodeError, a KeyError or a false 'config mismatch'."""
    run = tmp_path / "run"
    run_train(_args(tiny_data, run, "--train.steps=3"))
    meta = _last_checkpoint(run) / "meta.json"
    raw = bytearray(meta.read_bytes())
    for where, value in ((0, 0xFF), (raw.index(b'"seed"') + 2, ord("z")), (raw.index(b'"global_batch": ') + 16, ord("9"))):
        damaged = bytearray(raw)
        damaged[where] = value  # an invalid UTF-8 byte; a renamed key; a changed value
        meta.write_bytes(bytes(damaged))
        out = run_train(_args(tiny_data, run, "--train.steps=6"), check=False)
        errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
        assert out.returncode == 2 and len(errors) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
        assert f"{meta} is corrupt or truncated" in errors[0]
    meta.write_bytes(bytes(raw))
    run_train(_args(tiny_data, run, "--train.steps=4"))


def test_an_unknown_meta_format_is_one_line_naming_the_version(tiny_data, tmp_path):
    from dist_gpt.checkpoint.layout import check_small_file, read_manifest, read_meta, write_done
    from dist_gpt.errors import CheckpointError

    run = tmp_path / "run"
    run_train(_args(tiny_data, run, "--train.steps=2"))
    path = _last_checkpoint(run)
    meta = json.loads((path / "meta.json").read_text())
    assert meta["meta_format"] == 1
    (path / "meta.json").write_text(json.dumps({**meta, "meta_format": 7}))
    done = read_manifest(path)
    raw = (path / "meta.json").read_bytes()
    import zlib
    done["files"]["meta.json"] = {"size": len(raw), "crc32": zlib.crc32(raw)}
    write_done(path, done)
    check_small_file(path, done, "meta.json")  # intact, as far as the checksum goes
    with pytest.raises(CheckpointError, match="has meta format 7; this dist_gpt reads format 1"):
        read_meta(path)


def test_a_config_error_is_printed_once_not_once_per_rank(tiny_data, tmp_path):
    out = run_train(_args(tiny_data, tmp_path / "run", "--train.global_batch=6", "--train.micro_batch=2"),
                    nproc=2, check=False)
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert out.returncode != 0 and len(errors) == 1, out.stderr[-3000:]
    assert "train.global_batch=6 must be a multiple of train.micro_batch × world size = 2 × 2 on 2 ranks" in errors[0]
    # torchrun's own summary names it as the root cause, from each rank's error file
    assert f"traceback : {errors[0]}" in out.stderr and "error_file: <N/A>" not in out.stderr
    out = run_train(_args(tiny_data, tmp_path / "run", "--train.stepz=3"), nproc=2, check=False)
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert errors == ["error: unknown option --train.stepz (did you mean --train.steps?) (see --help)"], out.stderr[-3000:]
    assert f"traceback : {errors[0]}" in out.stderr and "error_file: <N/A>" not in out.stderr


def test_an_unwritable_run_directory_is_one_line_once(tiny_data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the run directory's parent should be")
    out = run_train(_args(tiny_data, blocker / "run"), nproc=2, check=False)
    # Every rank hits it; one prints it (torchrun prints its own failure report, which quotes it, once
    # a rank exits: look everywhere).
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    ranks = out.stderr.split("Traceback (most recent call last):")[0]
    assert out.returncode != 0 and not any(ln.startswith("[rank") for ln in ranks.splitlines()), out.stderr[-3000:]
    assert len(errors) == 1 and f"cannot write the run directory {blocker / 'run'}" in errors[0], errors
    assert f"traceback : {errors[0]}" in out.stderr
    assert not any("peer may have died" in ln for ln in out.stderr.splitlines())


def test_usr1_to_the_process_group_of_plain_torchrun_saves_when_its_agent_dies(tiny_data, tmp_path):
    """SIGUSR1 to the process group of `torchrun --standalone ...` (no --signals-to-handle) reaches only
    the agent (torchrun starts each rank in a session of its own) and kills it, and the rendezvous store
    with it. The orphaned ranks must notice, agree, save and leave a marker, not train on unwatched."""
    import signal
    import subprocess
    import sys

    from conftest import REPO, _env

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "dist_gpt.train",
           *_args(tiny_data, run, "--train.steps=1000000", "--eval.interval=0", "--log.interval=1000",
                  "--train.compile=false")]  # auto would compile a run this long (compile_rule.py): not tested here
    proc = subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    # run.json is written by rank 0 once every rank joined the process group.
    while not (run / "run.json").exists():
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGUSR1)
    # The ranks inherited the agent's stdout/stderr: the pipes close when the last rank exits.
    out, err = proc.communicate(timeout=300)
    marker = json.loads((run / "requeue.json").read_text())
    assert marker["signal"] == "AGENT_LOST", err[-3000:]
    assert (Path(marker["checkpoint"]) / "DONE").exists()
    assert "run the same command again to resume" in out, out[-3000:]
    assert "error:" not in err, err[-3000:]
    # dist_gpt's lines only: no C++ stack from the store's client ("TCPStore.cpp ... sendBytes failed",
    # 22 frames per rank), since a rank whose agent is gone no longer writes to the agent's store
    assert "frame #" not in err and "TCPStore" not in err, err[-3000:]
    assert err.count("torchrun's agent") == 2, err[-3000:]  # one warning per rank


@pytest.mark.slow
def test_resume_is_bitwise_exact_on_three_ranks(tiny_data, tmp_path):
    """On 3 ranks gloo's ring all-reduce sums each element in an order set by its place in DDP's
    gradient bucket, and DDP lays its buckets out anew after a process's first step: a resumed process
    must reduce its first step with the layout the uninterrupted run had by then (on 2 ranks a + b =
    b + a hides any difference). Before dist.settle_buckets, step 12 differed by 2.4e-7 here."""
    shape = ["--train.global_batch=18", "--train.steps=12", "--checkpoint.interval=4", "--eval.interval=0"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    run_train(_args(tiny_data, ref, *shape), nproc=3)
    out = run_train(_args(tiny_data, run, *shape), nproc=3, env={"DIST_GPT_FAULT_KILL_AT": "6:0"}, check=False)
    assert out.returncode != 0 and (run / "checkpoints" / "step_0000004" / "DONE").exists()
    run_train(_args(tiny_data, run, *shape), nproc=3)
    want, got = losses(ref), losses(run)
    assert [got[s] for s in range(1, 13)] == [want[s] for s in range(1, 13)]

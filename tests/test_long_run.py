"""Operating a long run: profiles of a window of steps, out-of-memory reports and snapshots, Weights &
Biases in offline mode (#26)."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, EXACT, _env, final, pause_env, release, require, run_train, wait_paused
from dist_gpt import config
from dist_gpt.parallel.dist import FLIGHT_RECORDER, DistEnv, set_flight_recorder_env
from dist_gpt.errors import ConfigError
from dist_gpt.training.signals import StopSignals
from dist_gpt.train import train
from dist_gpt.training.trainer import build
from dist_gpt.wandb_sink import run_id

LABELS = {"data", "forward", "backward", "agree", "optimizer", "evaluate", "checkpoint"}


def _cfg(tiny_data, run_dir, *extra: str):
    return config.parse(["--preset", "debug", "--train.precision=fp32", "--log.tensorboard=false",
                         "--eval.sample_tokens=0", f"--data.path={tiny_data}", f"--train.run_dir={run_dir}",
                         "--eval.at_start=false", *extra])


def test_a_profile_window_traces_every_phase_and_nothing_outside_it(tiny_data, tmp_path):
    cfg = _cfg(tiny_data, tmp_path, "--train.steps=4", "--train.profile=1:3", "--eval.interval=2",
               "--checkpoint.interval=2")
    t = build(cfg, DistEnv(), StopSignals())
    profiling = {}  # step -> whether a profiler was recording during it
    step = t.step

    def watched():
        profiling[t.state.step] = torch.autograd.profiler._is_profiler_enabled
        return step()

    t.step = watched
    try:
        assert train(t, tmp_path) == 0
    finally:
        t.profiler.close()
        t.log.close()
    assert profiling == {0: False, 1: True, 2: True, 3: False}
    (trace,) = (tmp_path / "profile" / "steps1-3").iterdir()
    assert trace.name == "rank0.pt.trace.json"
    events = json.loads(trace.read_text())["traceEvents"]
    labels = {e["name"] for e in events if e.get("cat") == "user_annotation"}
    # torch's optimizers label their own step and zero_grad ("Optimizer.step#AdamW.step"): not ours
    assert {name for name in labels if not name.startswith("Optimizer.")} == LABELS
    # one step's worth of each step phase per recorded step (debug preset: one micro-batch per step)
    assert sum(e["name"] == "optimizer" for e in events if e.get("cat") == "user_annotation") == 2


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_profile_holds_the_memory_timeline(tiny_data, tmp_path):
    run_train(_train_args(tiny_data, tmp_path, "--train.steps=2", "--train.device=cuda", "--train.profile=1:2"))
    folder = tmp_path / "profile" / "steps1-2"
    assert json.loads((folder / "rank0.pt.trace.json").read_text())["traceEvents"]
    assert pickle.loads((folder / "rank0.memory.pickle").read_bytes())["segments"]


@pytest.mark.parametrize("value", ["5:5", "6:2", "3", "a:b", "-1:4"])
def test_a_bad_profile_window_is_one_line_naming_the_option(value):
    with pytest.raises(ConfigError, match=r"^train\.profile=.*--train\.profile=\d+:\d+"):
        config.parse(["--preset", "debug", f"--train.profile={value}"])


@pytest.mark.parametrize("option", ["straggler_ratio=1", "straggler_ratio=0.5", "straggler_intervals=0"])
def test_a_bad_straggler_setting_is_one_line_naming_the_option(option):
    key = option.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^train\.{key}=.*e\.g\. --train\.{key}="):
        config.parse(["--preset", "debug", f"--train.{option}"])


@pytest.mark.slow  # a 2-rank run (20-40 s on 2 shared cores)
def test_a_slow_rank_is_named_with_its_host_and_both_times(tiny_data, tmp_path):
    """Rank 1 computes 200 ms more CPU time per step than the ~10-25 ms of a debug step: far past the
    ratio 1.3 whatever the machine's load, since compute is measured in CPU time (stragglers.py)."""
    out = run_train(_train_args(tiny_data, tmp_path, "--train.steps=4", "--eval.interval=0",
                                "--checkpoint.interval=0", "--train.straggler_intervals=3"),
                    nproc=2, env={"DIST_GPT_FAULT_SLOW": "1:200"})
    warnings = [line for line in out.stdout.splitlines() if line.startswith("warning: straggler")]
    host = socket.gethostname()
    assert len(warnings) == 2  # at log steps 3 and 4: three and four intervals in a row
    for line in warnings:
        match = re.match(rf"warning: straggler: rank 1 on host {re.escape(host)} computed ([\d.]+) ms per step, "
                         r"[\d.]+ x the other ranks' median ([\d.]+) ms, for [34] log intervals", line)
        assert match and float(match.group(1)) >= 200 > float(match.group(2))
    slowest = [json.loads(line).get("ranks/slowest") for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in slowest if r is not None] == [1, 1, 1, 1]


def _train_args(tiny_data, run_dir, *extra: str) -> list[str]:
    return [*EXACT, f"--data.path={tiny_data}", f"--train.run_dir={run_dir}", "--eval.at_start=false", *extra]


def test_out_of_memory_in_a_step_is_one_line_with_what_would_fit(tiny_data, tmp_path):
    out = run_train(_train_args(tiny_data, tmp_path, "--train.steps=3"), env={"DIST_GPT_FAULT_OOM_AT": "1:0"},
                    check=False)
    assert out.returncode == 5, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    (line,) = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith("error: rank 0 ran out of memory at step 1 (micro-batch 2 x 32 tokens): "
                           "allocated n/a, reserved n/a, peak ")
    # the debug preset: global batch 8 of micro-batches of 2 on one rank, no activation checkpointing
    assert re.search(r"options that may fit \(estimated per rank\): --train\.micro_batch=1 \([\d.]+ MiB\), "
                     r"--model\.activation_checkpointing=true \([\d.]+ MiB\); ", line)
    assert line.endswith(f"check them with: python -m dist_gpt.train {' '.join(_train_args(tiny_data, tmp_path))} "
                         "--train.steps=3 --dry-run --dry-run-world=1")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_memory_snapshot_at_the_end_and_on_out_of_memory(tiny_data, tmp_path):
    args = _train_args(tiny_data, tmp_path, "--train.steps=2", "--train.device=cuda", "--train.memory_snapshot=true")
    run_train(args)
    end = tmp_path / "memory" / "rank0-step2.pickle"
    assert pickle.loads(end.read_bytes())["segments"]  # the allocator's segments at the end of the run
    out = run_train([*args, "--train.steps=4"], env={"DIST_GPT_FAULT_OOM_AT": "2:0"}, check=False)
    assert out.returncode == 5 and "Traceback" not in out.stderr
    snapshot = tmp_path / "memory" / "rank0-oom.pickle"
    assert f"memory snapshot: {snapshot}" in out.stderr and pickle.loads(snapshot.read_bytes())["segments"]
    assert re.search(r"allocated [\d.]+ GiB, reserved [\d.]+ GiB, peak [\d.]+ GiB of [\d.]+ GiB", out.stderr)


def wandb_records(path: Path):
    """The protobuf records of an offline W&B run file (run-<id>.wandb): a ':W&B' header of 7 bytes,
    then LevelDB's log format (32 KiB blocks of records, each with a 7-byte header: CRC32, length,
    type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4). wandb 0.31 has no Python reader of its own."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, parts = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (kind == 0 and length == 0):  # a block's zero-filled tail
            pos += left
            continue
        parts, pos = parts + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)  # wandb writes a key either way


def wandb_run(folder: Path) -> tuple[str, dict[int, dict], dict]:
    """(run id, step -> logged values, config) of one offline W&B run directory."""
    (path,) = folder.glob("run-*.wandb")
    run_id, history, config = None, {}, {}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
        elif kind == "config":
            config.update({_key(item): json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            values = {_key(item): json.loads(item.value_json) for item in record.history.item}
            if "_step" in values:  # (not in the bookkeeping record that ends a run)
                history.setdefault(int(values["_step"]), {}).update(values)
    return run_id, history, config


@pytest.mark.slow  # two runs (30-70 s on 2 shared cores)
def test_wandb_offline_holds_the_scalars_and_a_resume_keeps_the_run_id(tiny_data, tmp_path):
    require("wandb")
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    args = _train_args(tiny_data, tmp_path, "--log.wandb=true", "--eval.interval=2", "--checkpoint.interval=2")
    run_train([*args, "--train.steps=2"], env=env)
    run_train([*args, "--train.steps=3"], env=env)
    first, second = sorted((tmp_path / "wandb").glob("offline-run-*"), key=lambda p: p.name)
    (id1, history1, config1), (id2, history2, _) = wandb_run(first), wandb_run(second)
    assert id1 == id2 == run_id(tmp_path) and first.name.endswith(id1)
    expected = {}
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():  # the same scalars as TensorBoard gets
        rec = json.loads(line)
        expected.setdefault(rec.pop("step"), {}).update({k: v for k, v in rec.items() if k != "time"})
    logged = {**history1, **history2}
    assert sorted(logged) == sorted(expected) == [1, 2, 3]
    for step, values in expected.items():
        assert {k: logged[step][k] for k in values} == values
    assert config1["train"]["steps"] == 2 and config1["model"]["n_layer"] == 2


def test_log_wandb_without_the_package_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` meets where it is not installed
    with pytest.raises(ConfigError, match=r"^log\.wandb=true needs the wandb package: pip install 'dist_gpt\[wandb\]'"):
        config.parse(["--preset", "debug", "--log.wandb=true"])


@pytest.mark.slow  # a hang of train.hang_timeout_s, then a resume
def test_a_hung_step_leaves_every_stack_one_line_and_a_resumable_run(tiny_data, tmp_path):
    """30 s: far above a debug step on a loaded machine (under 8 s), so only the held step trips it."""
    args = _train_args(tiny_data, tmp_path, "--train.steps=5", "--checkpoint.interval=2", "--eval.interval=0",
                       "--train.hang_timeout_s=30")
    out = run_train(args, env={"DIST_GPT_FAULT_HANG_AT": "3:0"}, check=False)
    stacks = tmp_path / "hang" / "rank0.txt"
    assert out.returncode == 6 and "Traceback" not in out.stderr
    (line,) = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert line == (f"error: rank 0: step 3 made no progress for 30 s (train.hang_timeout_s); every thread's Python "
                    f"stack is in {stacks}; run the same command again to resume from the last checkpoint")
    text = stacks.read_text()
    assert "in before_step" in text and "dist_gpt/train.py" in text  # the held main thread, where it is held
    assert text.count("Thread 0x") + text.count("Current thread 0x") >= 2  # every thread, not just one
    resumed = run_train(args).stdout
    assert "resumed from" in resumed and "step_0000002" in resumed and final(tmp_path)["step"] == 5


def test_the_flight_recorder_is_on_unless_the_user_set_it(monkeypatch, tmp_path):
    names = {name for row in FLIGHT_RECORDER for name in row[:2] if name}
    environ = {k: v for k, v in os.environ.items() if k not in names}
    environ["TORCH_NCCL_TRACE_BUFFER_SIZE"] = "500"  # the user's, under the older name
    monkeypatch.setattr(os, "environ", environ)  # this test's environment, dropped after it
    assert set_flight_recorder_env(tmp_path / "flight") == {
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1", "TORCH_FR_DUMP_TEMP_FILE": str(tmp_path / "flight" / "rank_")}
    assert os.environ["TORCH_FR_DUMP_TEMP_FILE"] == str(tmp_path / "flight" / "rank_")
    assert "TORCH_FR_BUFFER_SIZE" not in os.environ and os.environ["TORCH_NCCL_TRACE_BUFFER_SIZE"] == "500"


def _rank_of(pid: int) -> int:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(v for v in environ if v.startswith(b"RANK=")).split(b"=", 1)[1])


@pytest.mark.slow  # a 2-rank run that waits out a 15 s collective timeout
def test_a_stopped_rank_is_named_with_its_host_by_the_survivor(tiny_data, tmp_path):
    """Rank 1 is SIGSTOPped where every rank is held before step 3, so its (step, phase) record equals
    rank 0's: only its beat, which stops with it, tells them apart."""
    pauses = tmp_path / "pauses"
    args = _train_args(tiny_data, tmp_path / "run", "--train.steps=6", "--eval.interval=0",
                       "--checkpoint.interval=0", "--train.timeout_s=15")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "dist_gpt.train", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(pause_env(pauses, 3)), cwd=REPO)
    stopped = None
    try:
        wait_paused(pauses, 3, 2, alive=lambda: proc.poll() is None)
        pids = {_rank_of(int(p.name.rsplit("-", 1)[1])): int(p.name.rsplit("-", 1)[1]) for p in pauses.glob("paused-3-*")}
        stopped = pids[1]
        os.kill(stopped, signal.SIGSTOP)
        release(pauses, 3)
        while proc.poll() is None and Path(f"/proc/{pids[0]}").exists():  # rank 0 waits out its timeout
            time.sleep(0.2)
        os.kill(stopped, signal.SIGKILL)  # torchrun's SIGTERM would wait for a stopped process to go on
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        if stopped is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stopped, signal.SIGKILL)
    (line,) = [line for line in err.splitlines() if line.startswith("error: rank 0:")]
    assert line.startswith(f"error: rank 0: rank 1 on host {socket.gethostname()} (last heard in the "), line
    assert "stopped beating" in line and "train.timeout_s=15" in line

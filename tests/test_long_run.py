"""Operating a long run: profiles of a window of steps, out-of-memory reports and snapshots (#26)."""

from __future__ import annotations

import json
import pickle
import re

import pytest
import torch

from conftest import EXACT, run_train
from dist_gpt import config
from dist_gpt.dist import DistEnv
from dist_gpt.errors import ConfigError
from dist_gpt.faults import StopSignals
from dist_gpt.train import train
from dist_gpt.trainer import build

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

"""Operating a long run: profiles of a window of steps, out-of-memory reports (#26)."""

from __future__ import annotations

import json

import pytest
import torch

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


@pytest.mark.parametrize("value", ["5:5", "6:2", "3", "a:b", "-1:4"])
def test_a_bad_profile_window_is_one_line_naming_the_option(value):
    with pytest.raises(ConfigError, match=r"^train\.profile=.*--train\.profile=\d+:\d+"):
        config.parse(["--preset", "debug", f"--train.profile={value}"])

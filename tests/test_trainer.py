"""The builder and the step in-process: the checkpointer owns the run's state, the best validation
loss survives a resume, and a step is what the training loop and the benchmarks both run."""

from __future__ import annotations

import json

import torch

from dist_gpt import config
from dist_gpt.parallel.dist import DistEnv
from dist_gpt.training.faults import Verdict
from dist_gpt.training.signals import StopSignals
from dist_gpt.training.trainer import build


def _cfg(tiny_data, run_dir, *extra: str):
    return config.parse(["--preset", "debug", "--train.precision=fp32", "--log.tensorboard=false",
                         "--eval.sample_tokens=0", "--log.interval=1", f"--data.path={tiny_data}",
                         f"--train.run_dir={run_dir}", *extra])


def test_the_best_validation_loss_survives_a_resume(tiny_data, tmp_path, capsys):
    first = build(_cfg(tiny_data, tmp_path), DistEnv(), StopSignals())
    assert first.step() is Verdict.PROCEED and first.state.step == 1
    first.state.best_val = 0.25  # as if an earlier evaluation had done that well
    first.checkpointer.save(1)
    first.log.close()

    resumed = build(_cfg(tiny_data, tmp_path), DistEnv(), StopSignals())
    assert resumed.state.step == 1 and resumed.state.best_val == 0.25 and resumed.batches.position == 1
    loss = resumed.evaluator.run(1)
    resumed.log.close()
    assert loss > 0.25
    assert "(best 0.2500)" in capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["val/best_loss"] for r in records if "val/best_loss" in r] == [0.25]


def test_a_step_continues_exactly_after_a_save_and_restore(tiny_data, tmp_path):
    """Two steps straight equal one step, a checkpoint, a rebuilt trainer and one more step."""
    straight = build(_cfg(tiny_data, tmp_path / "a"), DistEnv(), StopSignals())
    for _ in range(2):
        straight.step()
    halves = build(_cfg(tiny_data, tmp_path / "b"), DistEnv(), StopSignals())
    halves.step()
    halves.checkpointer.save(1)
    again = build(_cfg(tiny_data, tmp_path / "b"), DistEnv(), StopSignals())
    assert again.checkpointer.restored_step == 1 and again.checkpointer.maybe_save(1) is None
    again.step()
    assert again.train_loss == straight.train_loss
    for a, b in zip(straight.model.state_dict().values(), again.model.state_dict().values()):
        assert torch.equal(a, b)
    for log in (straight.log, halves.log, again.log):
        log.close()

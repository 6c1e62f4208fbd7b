"""Loss spikes (train.spike_policy): detection on the agreed global loss and gradient norm, and what
skip, warn and rollback do, including a rolled-back run's exact resume (fp32, gloo)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from conftest import EXACT, losses, run_train
from dist_gpt.checkpoint.run_state import RunState
from dist_gpt.config import ConfigError, TrainConfig
from dist_gpt.training.spikes import SpikeDetector


def _detector(policy="skip", z=6.0, window=4, history=None, grad_z=6.0):
    state = RunState(spike_history=[list(h) for h in history or []])
    cfg = SimpleNamespace(spike_policy=policy, spike_z=z, spike_grad_z=grad_z, spike_window=window)
    return SpikeDetector(cfg, state), state


def test_no_spike_before_the_window_is_full_then_z_scores_against_it():
    det, state = _detector()
    for step, loss in enumerate([3.0, 3.2, 3.0, 3.2]):
        assert det.check(step, step, loss, 1.0 + step % 2) is None
    assert len(state.spike_history) == 4
    # window losses 3.0, 3.2, 3.0, 3.2: mean 3.1, deviation 0.1; grad norms 1, 2, 1, 2: mean 1.5, deviation 0.5
    assert det.check(4, 4, 3.3, 1.5) is None and len(state.spike_history) == 4  # the window slides
    spike = det.check(5, 17, 3.9, 1.5)  # window now 3.2, 3.0, 3.2, 3.3: mean 3.175
    assert spike is not None and spike.position == 17
    assert spike.loss_z == pytest.approx((3.9 - 3.175) / 0.10897247, rel=1e-6)
    assert state.spike_history[-1] == [3.3, 1.5]  # skip: a spike does not join the window
    assert det.check(6, 18, 3.1, 9.0).grad_norm_z > 6  # the gradient norm alone is enough
    assert det.check(7, 19, 1.0, 0.1) is None  # only upward deviations count
    det.grad_z = 0  # the loss alone decides
    assert det.check(8, 20, 3.1, 9.0) is None


def test_the_gradient_norm_has_its_own_higher_bar():
    window = [[3.0, 1.0], [3.2, 2.0]] * 2  # grad norms: mean 1.5, deviation 0.5
    assert _detector(history=window, grad_z=30)[0].check(0, 0, 3.1, 9.0) is None  # z 15: below 30
    assert _detector(history=window, grad_z=30)[0].check(0, 0, 3.1, 17.0).grad_norm_z == pytest.approx(31.0)

def test_warn_lets_the_spike_into_the_window_and_a_flat_window_is_not_all_spikes():
    det, state = _detector(policy="warn", history=[[2.0, 1.0]] * 4)
    assert det.check(0, 0, 2.001, 1.0) is None  # deviation floored at 1e-3 of the mean: z 0.5
    assert det.check(1, 1, 2.5, 1.0) is not None
    assert state.spike_history[-1] == [2.5, 1.0]


def test_a_shortened_window_on_resume_uses_the_latest_steps():
    det, _ = _detector(window=2, history=[[9.0, 1.0], [9.0, 1.0], [2.0, 1.0], [2.2, 1.0]])
    assert det.check(0, 0, 2.2, 1.0) is None  # against 2.0 and 2.2 only (z 1), not the old 9s
    assert det.check(1, 1, 2.9, 1.0) is not None


@pytest.mark.parametrize("key, value, fix", [
    ("spike_policy", "sometimes", "off | warn | skip | rollback"), ("spike_z", 0.0, "--train.spike_z=6"),
    ("spike_window", 0, "--train.spike_window=100"), ("spike_grad_z", -1.0, "--train.spike_grad_z=30"), ("spike_skip_batches", 0, "--train.spike_skip_batches=10")])
def test_bad_spike_options_name_the_option_and_the_fix(key, value, fix):
    with pytest.raises(ConfigError, match=f"train.{key}") as e:
        TrainConfig(**{key: value})
    assert fix in str(e.value)


# A poisoned global batch 9 (every token 0) against windows of 5 steps; z-scores of 20 keep the tiny
# debug model's ordinary noise out (its loss still falls fast; the poison's gradient norm z-score is higher).
SPIKES = ["--train.steps=14", "--train.spike_window=5", "--train.spike_z=20", "--train.spike_grad_z=20",
          "--checkpoint.interval=2"]
POISON = {"DIST_GPT_FAULT_POISON_AT": "9"}


def _args(data, run, *extra):
    return [*EXACT, f"--data.path={data}", f"--train.run_dir={run}", *SPIKES, *extra]


def _events(run):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r.get("event")]


def test_skip_drops_the_poisoned_update_and_warn_takes_it(tiny_data, tmp_path):
    skip = run_train(_args(tiny_data, tmp_path / "skip", "--train.spike_policy=skip"), env=POISON)
    assert "loss spike at step 9 (global batch 9)" in skip.stdout and "update skipped" in skip.stdout
    [event] = _events(tmp_path / "skip")
    assert event["event"] == "spike" and event["step"] == 9 and max(event["loss_z"], event["grad_norm_z"]) > 20
    meta = json.loads((tmp_path / "skip" / "checkpoints" / "step_0000014" / "meta.json").read_text())
    assert meta["run"]["skipped"] == [9] and meta["run"]["spikes"] == 1 and meta["batches"]["position"] == 15
    assert len(meta["run"]["spike_history"]) == 5
    warn = run_train(_args(tiny_data, tmp_path / "warn", "--train.spike_policy=warn"), env=POISON)
    assert "update taken (train.spike_policy=warn)" in warn.stdout
    off = run_train(_args(tiny_data, tmp_path / "off"), env=POISON)
    assert "loss spike" not in off.stdout
    # warn only reports: its losses are off's, bitwise; skip's part from step 10 (the update it dropped)
    ref, got = losses(tmp_path / "off"), losses(tmp_path / "warn")
    assert got == ref
    assert losses(tmp_path / "skip")[9] == ref[9] and losses(tmp_path / "skip")[10] != ref[10]


@pytest.mark.slow
def test_rollback_skips_the_batches_ending_at_the_spike_and_resumes_exactly(tiny_data, tmp_path):
    """2 ranks: the spike at global batch 9 rolls back to step 8 and skips batches 7..9 (spike_skip_batches=3);
    a run of the same config killed at step 12 and resumed gives the uninterrupted run's losses bitwise."""
    rollback = ["--train.spike_policy=rollback", "--train.spike_skip_batches=3"]
    whole = run_train(_args(tiny_data, tmp_path / "whole", *rollback), nproc=2, env=POISON)
    assert "rolled back to step_0000008, skipping global batches 7..9 (rollback 1)" in whole.stdout
    assert whole.stdout.count("loss spike") == 1  # printed once (rank 0)
    meta = json.loads((tmp_path / "whole" / "checkpoints" / "step_0000014" / "meta.json").read_text())
    assert meta["run"]["bad_positions"] == [7, 8, 9] and meta["run"]["rollbacks"] == 1 and meta["run"]["spikes"] == 1
    assert meta["batches"]["position"] == 16  # 14 steps from batches 0..15 with 7 (condemned after use) 8, 9 skipped
    crashed = tmp_path / "crashed"
    out = run_train(_args(tiny_data, crashed, *rollback), nproc=2, check=False,
                    env={**POISON, "DIST_GPT_FAULT_KILL_AT": "13:0"})
    assert out.returncode != 0 and "rolled back to step_0000008" in out.stdout
    run_train(_args(tiny_data, crashed, *rollback), nproc=2)  # resumes from step 12
    ref, got = losses(tmp_path / "whole"), losses(crashed)
    assert [got[s] for s in range(1, 15)] == [ref[s] for s in range(1, 15)]

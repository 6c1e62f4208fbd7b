"""Checkpointer in one process: exact round trip, async save, atomic commit under crashes, retention."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from checkpoint_worker import build, flat_state, make_checkpointer, train_step
from conftest import _env
from dist_gpt.checkpoint import CheckpointConfig, ModelOptimizerState, read_metadata, resolve_checkpoint
from dist_gpt.checkpoint.layout import CheckpointInfo
from dist_gpt.checkpoint.retention import steps_to_keep
from dist_gpt.errors import CheckpointError, ConfigError

WORKER = Path(__file__).with_name("checkpoint_worker.py")


def trained(steps: int = 3):
    model, opt = build()
    for s in range(1, steps + 1):
        train_step(model, opt, s, 0)
    return model, opt


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("use_async", [False, True])
def test_round_trip_is_exact_and_keys_are_plain(tmp_path, use_async):
    model, opt = trained()
    # torch.compile's wrapper (never run here) must not leak `_orig_mod.` into the keys.
    ckpt, _ = make_checkpointer(tmp_path / "checkpoints", CheckpointConfig(async_save=use_async),
                                {"model_optim": ModelOptimizerState(torch.compile(model), [opt])}, {"step": 3, "note": "x"})
    path = ckpt.save(3)
    expected = flat_state(model, opt)
    train_step(model, opt, 4, 0)  # the live state moves on while an async write may still run
    ckpt.wait()
    assert path == tmp_path / "checkpoints" / "step_0000003" and (path / "DONE").is_file()
    keys = set(read_metadata(path).state_dict_metadata)
    assert "model_optim.model.0.weight" in keys and "model_optim.optim.state.2.bias.exp_avg_sq" in keys
    assert not any("module." in k or "_orig_mod" in k or "param_groups" in k for k in keys)

    model2, opt2 = build()
    ckpt2, note = make_checkpointer(tmp_path / "checkpoints", CheckpointConfig(),
                                    {"model_optim": ModelOptimizerState(model2, [opt2])})
    ckpt2.load(ckpt2.latest())
    assert note.value == {"step": 3, "note": "x"}
    assert_same_state(flat_state(model2, opt2), expected)
    # and training continues identically from there
    model3, opt3 = trained(3)
    train_step(model2, opt2, 4, 0)
    train_step(model3, opt3, 4, 0)
    assert_same_state(flat_state(model2, opt2), flat_state(model3, opt3))


def _staged_pointers(ckpt) -> dict[str, int]:
    """{key: data_ptr} of the tensors of the async save's staged copy (its host buffers)."""
    out = {}
    def walk(prefix, node):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(f"{prefix}{k}.", v)
            else:
                out[prefix + k] = v.data_ptr()
    walk("", ckpt.staging.staged)
    return out


def test_async_save_reuses_its_buffers_and_holds_exactly_its_step(tmp_path, monkeypatch):
    """checkpoint.async_staging=reuse: the second save copies into the first one's buffers, yet each
    checkpoint holds bitwise its own step's state although training went on while it was written."""
    from dist_gpt.checkpoint import writer

    release = threading.Event()
    write_data = writer.ChecksummedFileSystemWriter.write_data

    def held_write(self, plan, planner):  # the background write waits until training has moved on
        assert release.wait(60)
        return write_data(self, plan, planner)

    monkeypatch.setattr(writer.ChecksummedFileSystemWriter, "write_data", held_write)
    model, opt = trained(3)
    ckpt, _ = make_checkpointer(tmp_path, CheckpointConfig(async_save=True), {"s": ModelOptimizerState(model, [opt])}, {})
    ckpt.save(3)
    expected = {3: flat_state(model, opt)}
    first = _staged_pointers(ckpt)
    for step in (4, 5):  # in place, while the step-3 write has not started reading its copy
        train_step(model, opt, step, 0)
    release.set()
    ckpt.save(5)  # waits for step 3's write, then copies into the same buffers
    expected[5] = flat_state(model, opt)
    assert _staged_pointers(ckpt) == first and len(first) > 6  # the same buffers, not new ones
    train_step(model, opt, 6, 0)
    ckpt.close()
    assert ckpt.staging is None
    for step in (3, 5):
        model2, opt2 = build()
        reader, _ = make_checkpointer(tmp_path, CheckpointConfig(), {"s": ModelOptimizerState(model2, [opt2])})
        reader.load(tmp_path / f"step_{step:07d}")
        assert_same_state(flat_state(model2, opt2), expected[step])


def test_scalar_optimizer_state_round_trips_as_tensor(tmp_path):
    model, _ = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train_step(model, opt, 1, 0)
    for st in opt.state.values():
        st["count"] = 7  # a plain int, as some optimizers keep
    make_checkpointer(tmp_path, CheckpointConfig(), {"s": ModelOptimizerState(model, [opt])}, {})[0].save(1)
    model2, _ = build()
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    train_step(model2, opt2, 5, 0)
    for st in opt2.state.values():
        st["count"] = 0
    ckpt, _ = make_checkpointer(tmp_path, CheckpointConfig(), {"s": ModelOptimizerState(model2, [opt2])})
    ckpt.load(ckpt.latest())
    assert all(st["count"] == 7 and type(st["count"]) is int for st in opt2.state.values())
    assert_same_state(flat_state(model2, opt2), flat_state(model, opt))


def test_non_tensor_state_is_refused_and_nothing_is_committed(tmp_path):
    model, _ = build()
    ckpt, _ = make_checkpointer(tmp_path, CheckpointConfig(), {"s": {"w": model[0].weight, "note": "text"}}, {})
    with pytest.raises(TypeError, match="not a tensor"):
        ckpt.save(1)
    assert ckpt.latest() is None and not ckpt.has_checkpoints()
    ckpt, _ = make_checkpointer(tmp_path, CheckpointConfig(), {"s": {"w": model[0].weight}}, {"bad": object()})
    with pytest.raises(TypeError):
        ckpt.save(2)  # meta must be JSON


def test_same_step_saved_twice_in_a_process_is_written_once(tmp_path):
    model, opt = trained(1)
    ckpt, note = make_checkpointer(tmp_path, CheckpointConfig(), {"s": ModelOptimizerState(model, [opt])}, {"n": 1})
    first = ckpt.save(1)
    stamp = (first / "DONE").stat().st_mtime_ns
    note.value = {"n": 2}
    assert ckpt.save(1) == first and (first / "DONE").stat().st_mtime_ns == stamp


def test_maybe_save_follows_interval_and_skips_the_restored_step(tmp_path):
    model, opt = trained(1)
    ckpt, _ = make_checkpointer(tmp_path, CheckpointConfig(interval=5), {"s": ModelOptimizerState(model, [opt])}, {})
    assert [s for s in range(0, 16) if ckpt.maybe_save(s)] == [5, 10, 15]
    ckpt.load(tmp_path / "step_0000010")
    assert ckpt.maybe_save(10) is None and ckpt.maybe_save(15) == tmp_path / "step_0000015"
    never, _ = make_checkpointer(tmp_path / "never", CheckpointConfig(interval=0), {"s": ModelOptimizerState(model, [opt])}, {})
    assert not any(never.maybe_save(s) for s in range(10))


def test_config_validation_names_the_key():
    with pytest.raises(ConfigError, match="checkpoint.keep_last"):
        CheckpointConfig(keep_last=-1)
    with pytest.raises(ConfigError, match="checkpoint.resume"):
        CheckpointConfig(resume="")
    with pytest.raises(ConfigError, match="checkpoint.async_staging must be reuse or fresh, got 'pinned'"):
        CheckpointConfig(async_staging="pinned")


@pytest.mark.parametrize("where", ["write", "rename", "done", "write async"])
def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, where):
    """SIGKILL while writing data, before the rename, and between the rename and DONE; and while an
    async save's background thread writes (into reused staging buffers)."""
    root = tmp_path / "checkpoints"
    point, *mode = where.split()
    proc = subprocess.run([sys.executable, str(WORKER), "crash-at", point, str(root), *mode], capture_output=True,
                          text=True, timeout=120, env=_env())  # this checkout's dist_gpt, not an installed one
    assert proc.returncode == -9, proc.stderr  # killed, as injected
    leftovers = {p.name for p in root.iterdir()}
    assert leftovers == {"step_0000001", ".tmp_step_0000002" if point != "done" else "step_0000002"}

    model, opt = build()
    ckpt, note = make_checkpointer(root, CheckpointConfig(), {"model_optim": ModelOptimizerState(model, [opt])})
    assert ckpt.latest() == root / "step_0000001"
    assert {p.name for p in root.iterdir()} == {"step_0000001"}  # rank 0 cleaned the partial one
    ckpt.load(ckpt.latest())
    assert note.value == {"step": 1}
    expected_model, expected_opt = trained(1)
    assert_same_state(flat_state(model, opt), flat_state(expected_model, expected_opt))
    # and the interrupted step can be saved again
    train_step(model, opt, 2, 0)
    note.value = {"step": 2}
    assert (ckpt.save(2) / "DONE").is_file()


def test_incomplete_checkpoint_is_ignored_and_refused_with_the_fix(tmp_path):
    model, opt = trained(1)
    ckpt, _ = make_checkpointer(tmp_path, CheckpointConfig(), {"s": ModelOptimizerState(model, [opt])}, {})
    good = ckpt.save(1)
    bad = tmp_path / "step_0000009"
    bad.mkdir()
    (bad / "meta.json").write_text("{}")
    rank1, _ = make_checkpointer(tmp_path, CheckpointConfig(), {}, rank=1, world=2)
    assert rank1.latest() == good  # rank 1 only ignores it
    with pytest.raises(CheckpointError, match=r"step_0000009 is incomplete \(no DONE\): delete it or pass --resume"):
        ckpt.load(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        ckpt.load(tmp_path / "step_0000404")


def info(step, val=None):
    return CheckpointInfo(Path(f"step_{step}"), step, True, val)


def test_retention_policy_table():
    ten = [info(s) for s in range(10, 110, 10)]
    assert steps_to_keep(ten, 3, 0, True) == {80, 90, 100}
    assert steps_to_keep(ten, 2, 40, False) == {40, 80, 90, 100}
    assert steps_to_keep(ten, 0, 0, False) == set(range(10, 110, 10))
    scored = [info(10, 3.0), info(20, 2.0), info(30, 2.5), info(40, 2.0), info(50, 2.7), info(60, None)]
    assert steps_to_keep(scored, 1, 0, True) == {40, 60}  # best: lowest loss, newest among equals
    assert steps_to_keep(scored, 1, 0, False) == {60}
    assert steps_to_keep([info(5, float("nan"))], 1, 0, True) == {5}
    assert steps_to_keep([], 3, 0, True) == set()


def test_retention_on_disk_keeps_exactly_what_it_should(tmp_path):
    model, opt = trained(1)
    cfg = CheckpointConfig(keep_last=2, keep_every=4, keep_best=True)
    losses = {1: 5.0, 2: 4.0, 3: 1.5, 4: 3.0, 5: 2.0, 6: 2.5, 7: None, 8: 2.2, 9: 3.3, 10: 3.1}
    ckpt, _ = make_checkpointer(tmp_path, cfg, {"s": ModelOptimizerState(model, [opt])}, {}, val_loss=losses.get)
    for step in losses:
        ckpt.save(step)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step_0000003", "step_0000004", "step_0000008", "step_0000009", "step_0000010"]
    best = resolve_checkpoint(tmp_path, "best")
    assert best == tmp_path / "step_0000003" and ckpt.latest() == tmp_path / "step_0000010"
    assert json.loads((best / "DONE").read_text())["val_loss"] == 1.5


def test_resume_from_a_file_is_one_line(tmp_path):
    """--resume /etc/passwd used to end in NotADirectoryError from list_checkpoints ('/etc/passwd/checkpoints')."""
    model, opt = build()
    a_file = tmp_path / "passwd"
    a_file.write_text("root:x:0:0\n")
    ckpt, _ = make_checkpointer(tmp_path / "checkpoints", CheckpointConfig(resume=str(a_file)),
                                {"s": ModelOptimizerState(model, [opt])})
    with pytest.raises(CheckpointError, match=rf"^--resume {a_file} is a file, not a checkpoint: pass a checkpoint"):
        ckpt.restore()
    with pytest.raises(CheckpointError, match=rf"^{a_file} is a file, not a checkpoint"):
        resolve_checkpoint(a_file)  # sample --run, export --checkpoint, evaluate --run

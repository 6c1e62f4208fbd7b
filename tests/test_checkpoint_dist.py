"""Checkpoints across world sizes with real processes: torchrun, gloo, DDP, 2 ranks <-> 1 rank."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoint_worker import build, flat_state, make_checkpointer, train_step
from conftest import _env
from dist_gpt.checkpoint import CheckpointConfig, ModelOptimizerState, read_metadata

pytestmark = pytest.mark.slow
WORKER = Path(__file__).with_name("checkpoint_worker.py")


def torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in _env().items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(WORKER), *args], capture_output=True, text=True, timeout=180, env=env)


def load_one_rank(path: Path):
    model, opt = build()
    ckpt, note = make_checkpointer(path.parent, CheckpointConfig(), {"model_optim": ModelOptimizerState(model, [opt])})
    ckpt.load(path)
    return note.value, flat_state(model, opt)


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_two_rank_saves_load_on_one_rank(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    proc = torchrun("save", str(tmp_path / "checkpoints"), str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for step in (3, 5):  # 3: a plain save; 5: an async save whose live state changed right after
        path = tmp_path / "checkpoints" / f"step_{step:07d}"
        assert {p.name for p in path.glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}  # both ranks wrote
        keys = read_metadata(path).state_dict_metadata
        assert "model_optim.model.0.weight" in keys and not any("module." in k for k in keys)
        meta, state = load_one_rank(path)
        assert meta == {"step": step, "world_size": 2}
        assert_same(state, torch.load(out / f"expected_step{step}.pt", weights_only=True))


def test_one_rank_save_loads_on_two_ranks(tmp_path):
    model, opt = build()
    for s in (1, 2):
        train_step(model, opt, s, 0)
    ckpt, _ = make_checkpointer(tmp_path / "checkpoints", CheckpointConfig(),
                                {"model_optim": ModelOptimizerState(model, [opt])}, {"step": 2})
    path = ckpt.save(2)
    out = tmp_path / "out"
    out.mkdir()
    proc = torchrun("load", str(path), str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = flat_state(model, opt)
    for rank in (0, 1):
        loaded = torch.load(out / f"loaded_rank{rank}.pt", weights_only=True)
        assert int(loaded.pop("meta_step")) == 2
        assert_same(loaded, expected)


def test_fsdp_async_saves_reuse_buffers_and_hold_their_steps(tmp_path):
    """FSDP2 shards (DTensors) through the reused staging buffers: each checkpoint holds bitwise its
    step's shards although training went on, and the second save copied into the first one's buffers."""
    proc = torchrun("fsdp-async", str(tmp_path / "checkpoints"), str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        assert json.loads((tmp_path / f"fsdp_rank{rank}.json").read_text()) == {"same": {"2": True, "4": True},
                                                                                "reused": True}


def test_rank_killed_mid_save_leaves_previous_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    proc = torchrun("crash", str(root), str(tmp_path))
    assert proc.returncode != 0
    assert (root / ".tmp_step_0000002").is_dir()  # the partial write is there ...
    ckpt, _ = make_checkpointer(root, CheckpointConfig(), {})
    assert ckpt.latest() == root / "step_0000001"  # ... and ignored, then cleaned
    assert not (root / ".tmp_step_0000002").exists()
    meta, _ = load_one_rank(ckpt.latest())
    assert meta == {"step": 1}

"""Loading never runs code from a checkpoint, and damage gives one clear line naming the file."""

from __future__ import annotations

import io
import json
import os
import pickle
import zlib
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from dist_gpt.torch_version import parse_version
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from checkpoint_worker import build, flat_state, make_checkpointer, train_step
from dist_gpt import config as config_mod
from dist_gpt.checkpoint import Checkpointer, CheckpointConfig, ModelOptimizerState, read_metadata
from dist_gpt.checkpoint.layout import build_manifest, write_done
from dist_gpt.checkpoint.safe_reader import RestrictedUnpickler, UnsafeGlobalError
from dist_gpt.checkpoint.writer import ChecksummedFileSystemWriter
from dist_gpt.parallel.dist import DistEnv
from dist_gpt.errors import CheckpointError
from dist_gpt.model.gpt import GPT
from dist_gpt.optim.optimizers import build_optimizers
from dist_gpt.presets import PRESETS

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


class RunsShell:
    """Unpickling this runs a shell command: what a malicious checkpoint would carry."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def saved(tmp_path: Path) -> tuple[Checkpointer, Path, nn.Module, torch.optim.Optimizer]:
    model, opt = build()
    train_step(model, opt, 1, 0)
    ckpt, _ = make_checkpointer(tmp_path / "checkpoints", CheckpointConfig(),
                                {"model_optim": ModelOptimizerState(model, [opt])}, {"step": 1})
    return ckpt, ckpt.save(1), model, opt


def load(path: Path, state: dict) -> None:
    """Load the tensor `state` from the checkpoint at `path` with a Checkpointer that owns only it."""
    Checkpointer(path.parent, CheckpointConfig(), DistEnv(), state, {}).load(path)


def fresh_state():
    model, opt = build()
    return {"model_optim": ModelOptimizerState(model, [opt])}


def reseal(path: Path, name: str) -> None:
    """Update DONE's size/CRC32 of one file, as a careful attacker would (so only the reader stands guard)."""
    done = json.loads((path / "DONE").read_text())
    raw = (path / name).read_bytes()
    done["files"][name] = {"size": len(raw), "crc32": zlib.crc32(raw)}
    write_done(path, done)


# -- damage -----------------------------------------------------------------------------------

def test_flipped_byte_in_tensor_data_names_the_file(tmp_path):
    ckpt, path, _, _ = saved(tmp_path)
    data = path / "__0_0.distcp"
    raw = bytearray(data.read_bytes())
    raw[len(raw) - 40] ^= 0xFF  # inside the last tensor's payload: torch.load alone would not notice
    data.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp is corrupt: the bytes of .* do not match their CRC32"):
        load(path, fresh_state())


def test_truncated_data_file_names_the_file(tmp_path):
    ckpt, path, _, _ = saved(tmp_path)
    data = path / "__0_0.distcp"
    os.truncate(data, data.stat().st_size - 100)
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp is \d+ bytes but DONE records \d+: the file is truncated"):
        load(path, fresh_state())


@pytest.mark.parametrize("name", [".metadata", "meta.json"])
def test_truncated_small_files_name_the_file(tmp_path, name):
    ckpt, path, _, _ = saved(tmp_path)
    os.truncate(path / name, (path / name).stat().st_size // 2)
    with pytest.raises(CheckpointError, match=rf"{name} is corrupt or truncated .*delete checkpoint"):
        load(path, fresh_state())


def test_truncated_metadata_with_matching_done_is_still_a_clear_error(tmp_path):
    ckpt, path, _, _ = saved(tmp_path)
    os.truncate(path / ".metadata", 200)
    reseal(path, ".metadata")
    with pytest.raises(CheckpointError, match=r"\.metadata is corrupt \("):
        load(path, fresh_state())


def test_garbled_done_and_missing_file_name_the_file(tmp_path):
    ckpt, path, _, _ = saved(tmp_path)
    (path / "__0_0.distcp").unlink()
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp is missing"):
        load(path, fresh_state())
    (path / "DONE").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"DONE is corrupt"):
        load(path, fresh_state())


def with_adamw(model: nn.Module) -> dict:
    return {"model_optim": ModelOptimizerState(model, [torch.optim.AdamW(model.parameters())])}


def test_other_model_shapes_are_refused_before_reading(tmp_path):
    ckpt, path, _, _ = saved(tmp_path)
    wider = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 4))
    with pytest.raises(CheckpointError, match=r"holds 'model_optim.model.0.weight' with shape \[16, 8\] but this run's has shape \[32, 8\]"):
        load(path, with_adamw(wider))
    deeper = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4), nn.Linear(4, 4))
    with pytest.raises(CheckpointError, match=r"does not hold 'model_optim.model.3.weight' \(and 7 more\)"):
        load(path, with_adamw(deeper))
    shallower = nn.Sequential(nn.Linear(8, 16))
    with pytest.raises(CheckpointError, match=r"holds 'model_optim.model.2.weight' \(and 7 more\) that this run does not have"):
        load(path, with_adamw(shallower))
    with pytest.raises(CheckpointError, match=r"holds 'model_optim.optim.state.0.weight.step' \(and 11 more\) that this run does not have"):
        load(path, {"model_optim": ModelOptimizerState(build()[0])})  # no optimizer: refused, not half-loaded


# -- code in the metadata ---------------------------------------------------------------------

def test_metadata_carrying_os_system_is_refused_and_never_run(tmp_path):
    ckpt, path, _, _ = saved(tmp_path)
    marker = tmp_path / "pwned"
    md = pickle.loads((path / ".metadata").read_bytes())  # our own, honest file
    md.planner_data["model_optim.model.0.weight"] = RunsShell(f"touch {marker}")
    (path / ".metadata").write_bytes(pickle.dumps(md))
    reseal(path, ".metadata")

    with pytest.raises(CheckpointError, match=r"\.metadata refers to (posix|os)\.system, which a checkpoint's metadata never holds"):
        load(path, fresh_state())
    with pytest.raises(CheckpointError, match="refusing to load it"):
        read_metadata(path)
    assert not marker.exists()
    # The payload is live: PyTorch's stock reader (plain pickle) runs it.
    FileSystemReader(path).read_metadata()
    assert marker.exists()


@pytest.mark.parametrize("module,name", [
    ("os", "system"), ("builtins", "eval"), ("builtins", "exec"), ("builtins", "getattr"),
    ("subprocess", "Popen"), ("torch", "load"), ("torch", "save"), ("torch.serialization", "load"),
    ("pickle", "loads"), ("torch.distributed.checkpoint.metadata", "torch"), ("pathlib", "os"),
])
def test_restricted_unpickler_refuses_any_other_global(module, name):
    # PROTO 4, the two names, STACK_GLOBAL, STOP: a pickle that only resolves `module.name`.
    raw = (b"\x80\x04" + pickle.SHORT_BINUNICODE + bytes([len(module)]) + module.encode()
           + pickle.SHORT_BINUNICODE + bytes([len(name)]) + name.encode() + pickle.STACK_GLOBAL + pickle.STOP)
    with pytest.raises(UnsafeGlobalError):
        RestrictedUnpickler(io.BytesIO(raw)).load()


def test_non_tensor_entry_is_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoints" / "step_0000001"
    path.mkdir(parents=True)
    (path / "meta.json").write_text("{}")
    model, _ = build()
    state = {"model_optim": {"model": model.state_dict()}, "extra": RunsShell(f"touch {marker}")}
    dcp.save(state, storage_writer=ChecksummedFileSystemWriter(path), no_dist=True)
    write_done(path, build_manifest(path, 1, None, 1))

    ckpt = Checkpointer(path.parent, CheckpointConfig(), DistEnv(), {}, {})
    assert ckpt.latest() == path  # it looks complete ...
    with pytest.raises(CheckpointError, match=r"\.metadata lists a non-tensor entry 'extra'.*refusing"):
        load(path, {"model_optim": {"model": build()[0].state_dict()}})  # ... but is refused
    assert not marker.exists()
    # The payload is live: PyTorch's stock reader hands it to torch.load(weights_only=False).
    dcp.load({"extra": 0}, storage_reader=FileSystemReader(path), no_dist=True)
    assert marker.exists()


# -- every real metadata loads ----------------------------------------------------------------

class MetadataOnlyWriter(FileSystemWriter):
    """Writes DCP's real `.metadata` for a state but no tensor bytes (a sparse file stands in)."""

    def write_data(self, plan, planner):
        results, offset = [], 0
        for item in plan.items:
            results.append(WriteResult(index=item.index, size_in_bytes=64,
                                       storage_data=_StorageInfo("__0_0.distcp", offset, 64)))
            offset += 64
        with open(Path(self.path) / "__0_0.distcp", "wb") as f:
            f.truncate(offset)
        fut: Future = Future()
        fut.set_result(results)
        return fut


# Building every preset's optimizer state on the meta device (no memory for modern-1b) makes DCP step
# the optimizers there; torch 2.9's Adam then calls .item() on a meta tensor. The product never does
# this (it saves real tensors); the test runs where it was checked, torch 2.13 and later.
@pytest.mark.skipif(parse_version(torch.__version__) < (2, 13), reason="optimizer state on the meta device needs torch>=2.13")
@pytest.mark.parametrize("recipe", ["classic", "modern"])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_real_metadata_of_every_preset_and_optimizer_reads_safely(tmp_path, preset, recipe):
    cfg = config_mod.build(preset, overrides={"train.recipe": recipe})
    with torch.device("meta"):  # real shapes, no memory: gpt2-350m + its optimizer state is 4 GB
        model = GPT(cfg.model)
        optimizers = build_optimizers(model, cfg.optim, "cpu")
        state = ModelOptimizerState(model, optimizers).state_dict()
    dcp.save({"model_optim": state}, storage_writer=MetadataOnlyWriter(tmp_path), no_dist=True)
    md = read_metadata(tmp_path)
    n_model = len(state["model"])
    n_optim = sum(len(v) for v in state["optim"]["state"].values())
    assert len(md.state_dict_metadata) == n_model + n_optim
    assert md.state_dict_metadata["model_optim.model.tok_emb.weight"].size == torch.Size(
        [cfg.model.vocab_size, cfg.model.n_embd])


@pytest.mark.parametrize("recipe", ["classic", "modern"])
def test_real_gpt_and_optimizers_round_trip(tmp_path, recipe):
    cfg = config_mod.build("debug", overrides={"train.recipe": recipe})
    torch.manual_seed(0)
    model = GPT(cfg.model)
    optimizers = build_optimizers(model, cfg.optim, "cpu")
    idx = torch.randint(0, cfg.model.vocab_size, (2, cfg.model.block_size))
    model(idx, idx).backward()
    for opt in optimizers:
        opt.step()
    ckpt, _ = make_checkpointer(tmp_path, CheckpointConfig(), {"model_optim": ModelOptimizerState(model, optimizers)})
    path = ckpt.save(1)
    torch.manual_seed(1)
    model2 = GPT(cfg.model)
    optimizers2 = build_optimizers(model2, cfg.optim, "cpu")
    load(path, {"model_optim": ModelOptimizerState(model2, optimizers2)})
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    for o1, o2 in zip(optimizers, optimizers2):
        assert flat_state(model, o1).keys() == flat_state(model2, o2).keys()
        for k, v in flat_state(model, o1).items():
            assert torch.equal(v, flat_state(model2, o2)[k]), k

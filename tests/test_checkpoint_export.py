"""Weights from a run, a checkpoint or an export; export to one .safetensors with config and tokenizer."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from dist_gpt import config as config_mod
from dist_gpt.checkpoint import Checkpointer, ModelOptimizerState
from dist_gpt.parallel.dist import DistEnv
from dist_gpt.metrics import QuietLogger
from dist_gpt.checkpoint.run_state import ConfigIdentity, DatasetIdentity
from dist_gpt.data import Dataset
from dist_gpt.data.prepare import PrepareOptions, prepare
from dist_gpt.errors import CheckpointError
from conftest import export_main
from dist_gpt.model.gpt import GPT
from dist_gpt.optim.optimizers import build_optimizers
from dist_gpt.convert.weights import load_weights

ASSETS = Path(__file__).resolve().parent / "assets"


@pytest.fixture(scope="module")
def bpe_data(tmp_path_factory) -> Path:
    """A dataset with a trained tokenizer.json (bpe:300), so the tokenizer file itself must travel."""
    out = tmp_path_factory.mktemp("data") / "bpe"
    return prepare(PrepareOptions(out=str(out), inputs=[str(ASSETS / "licenses.txt")], tokenizer="bpe:300",
                                  progress=False, workers=1))


def trained_run(run_dir: Path, data_path: Path):
    """Two checkpoints of a real GPT (debug preset): step 1 with the better val loss, step 2 the latest."""
    ds = Dataset.open(data_path)
    cfg = config_mod.build("debug", overrides={"model.vocab_size": ds.vocab_size, "data.path": str(data_path)})
    torch.manual_seed(0)
    model = GPT(cfg.model)
    optimizers = build_optimizers(model, cfg.optim, "cpu")
    val_losses = {1: 1.0, 2: 2.0}
    ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint, DistEnv(),
                        {"model_optim": ModelOptimizerState(model, optimizers)},
                        {"config": ConfigIdentity(cfg, QuietLogger()), "dataset": DatasetIdentity(ds, str(data_path))},
                        val_loss=val_losses.get)
    snapshots = {}
    for step in val_losses:
        idx = torch.randint(0, ds.vocab_size, (2, cfg.model.block_size))
        model(idx, idx).backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        ckpt.save(step)
        snapshots[step] = {k: v.clone() for k, v in model.state_dict().items()}
    return cfg, model, snapshots


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_weights_from_run_checkpoint_and_export_agree(tmp_path, bpe_data):
    data = shutil.copytree(bpe_data, tmp_path / "data")
    run = tmp_path / "run"
    cfg, model, snapshots = trained_run(run, data)

    latest = load_weights(run)
    assert latest.source == run / "checkpoints" / "step_0000002" and latest.step == 2
    assert latest.config == cfg.model and same_tensors(latest.state_dict, snapshots[2])
    best = load_weights(run, which="best")
    assert best.step == 1 and best.val_loss == 1.0 and same_tensors(best.state_dict, snapshots[1])
    assert same_tensors(load_weights(run / "checkpoints" / "step_0000001").state_dict, snapshots[1])
    text = "Permission is hereby granted"
    assert latest.tokenizer.decode(latest.tokenizer.encode(text)) == text
    assert latest.eot_id == 0 and latest.data_path == str(data)

    out = tmp_path / "export" / "model.safetensors"
    assert export_main(["--checkpoint", str(run), "--out", str(out)]) == 0
    beside = out.with_name("model.tokenizer.json")
    assert beside.read_bytes() == (data / "tokenizer.json").read_bytes()
    shutil.rmtree(data)  # the export carries everything: no dataset needed any more
    exported = load_weights(out)
    assert exported.step == 2 and exported.config == cfg.model and same_tensors(exported.state_dict, snapshots[2])
    assert exported.tokenizer.decode(exported.tokenizer.encode(text)) == text
    beside.unlink()  # the tokenizer also travels inside the file's metadata
    assert load_weights(out).tokenizer.encode(text) == exported.tokenizer.encode(text)

    restored = GPT(exported.config)
    restored.load_state_dict(exported.state_dict)
    idx = torch.randint(0, cfg.model.vocab_size, (1, 8))
    model.eval(), restored.eval()
    assert torch.equal(restored(idx), model(idx))


def test_export_never_overwrites_and_best_is_selectable(tmp_path, bpe_data, capsys):
    run = tmp_path / "run"
    trained_run(run, bpe_data)
    out = tmp_path / "best.safetensors"
    assert export_main(["--checkpoint", str(run), "--best", "--out", str(out)]) == 0
    assert load_weights(out).step == 1
    stamp = out.stat().st_mtime_ns
    assert export_main(["--checkpoint", str(run), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.stat().st_mtime_ns == stamp
    assert export_main(["--checkpoint", str(run), "--out", str(out), "--force"]) == 0
    assert load_weights(out).step == 2
    assert export_main(["--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_damaged_export_is_a_clear_error(tmp_path, bpe_data):
    run = tmp_path / "run"
    trained_run(run, bpe_data)
    out = tmp_path / "model.safetensors"
    assert export_main(["--checkpoint", str(run), "--out", str(out)]) == 0
    raw = bytearray(out.read_bytes())
    raw[-10] ^= 0xFF  # inside the last tensor
    out.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupt: its tensors do not match the CRC32"):
        load_weights(out)
    out.write_bytes(bytes(raw[: len(raw) // 2]))
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not a readable \.safetensors file"):
        load_weights(out)
    with pytest.raises(CheckpointError, match="holds no complete checkpoint"):
        load_weights(tmp_path)


def test_checkpoint_errors_offer_the_commands_own_option(tmp_path, bpe_data, capsys):
    """export and sample take a checkpoint through --checkpoint (they have no --resume): their errors
    say so; the trainer's path (Checkpointer.load) keeps --resume."""
    from dist_gpt.checkpoint import read_meta
    from conftest import sample_main

    run = tmp_path / "run"
    trained_run(run, bpe_data)
    meta = run / "checkpoints" / "step_0000002" / "meta.json"
    raw = bytearray(meta.read_bytes())
    raw[5] ^= 0x01
    meta.write_bytes(bytes(raw))
    assert export_main(["--checkpoint", str(run), "--out", str(tmp_path / "m.safetensors")]) == 2
    assert sample_main(["--run", str(run), "--max-new-tokens", "2"]) == 2
    for line in capsys.readouterr().err.splitlines():
        assert line.startswith(f"error: {meta} is corrupt") and "delete checkpoint" in line, line
        assert line.endswith("or pass --checkpoint with another checkpoint") and "--resume" not in line, line
    with pytest.raises(CheckpointError, match="pass --resume with another checkpoint$"):
        read_meta(meta.parent)  # what Checkpointer.load reads first


def test_prompt_outside_a_char_vocabulary_names_the_way_out(tmp_path, capsys):
    import numpy as np

    from dist_gpt.data.tokenizers import CharTokenizer
    from tests.data_fixtures import write_dataset
    from conftest import sample_main

    data = tmp_path / "data"
    write_dataset(data, CharTokenizer("\n abcde"), {"train": [np.arange(3000) % 7], "val": [np.arange(500) % 7]})
    trained_run(tmp_path / "run", data)
    assert sample_main(["--run", str(tmp_path / "run"), "--prompt", "bad€", "--max-new-tokens", "2"]) == 2
    assert capsys.readouterr().err == ("error: --prompt 'bad€': character '€' (U+20AC) is not in the char vocabulary; "
                                       "use only its 7 characters: '\\n abcde'\n")
    assert sample_main(["--run", str(tmp_path / "run"), "--prompt", "bad", "--max-new-tokens", "2"]) == 0

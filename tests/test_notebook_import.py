"""From the notebook's four files to training: prepare, import, sample, `--init-from` (1 and 2 ranks).

The model is made and evaluated by the notebook's own classes in a child process
(`tests/notebook_fixture.py`); the data goes through `tools.prepare` exactly as the docs say.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, _env, run_train
from dist_gpt.data import Dataset, ValBlocks
from dist_gpt.data.prepare import main as prepare_main
from dist_gpt.errors import CheckpointError, DataError
from dist_gpt.model.gpt import GPT
from dist_gpt.convert.notebook import import_notebook
from conftest import sample_main
from dist_gpt.convert.weights import load_weights
from notebook_fixture import SIZES, build_notebook_model, notebook_forward, write_notebook_files

VAL_BLOCKS = 12


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> dict[str, Path]:
    """The notebook's files, its pickled model, the prepared dataset and the import."""
    root = tmp_path_factory.mktemp("notebook")
    files = write_notebook_files(root)
    files["pkl"] = build_notebook_model(root / "model-01.pkl", files["vocab"])
    files["data"], files["out"] = root / "data", root / "import"
    assert prepare_main(["--train", str(files["train"]), "--val", str(files["val"]), "--tokenizer", "char",
                         "--vocab", str(files["vocab"]), "--out", str(files["data"]), "--quiet", "--workers", "0"]) == 0
    files["printed"] = import_tool(files["pkl"], "--vocab", files["vocab"], "--out", files["out"]).stdout
    return files


def import_tool(*args, code: int = 0) -> subprocess.CompletedProcess:
    """`python -m tools.import_notebook ARGS`, as a user runs it from the repository."""
    proc = subprocess.run([sys.executable, "-m", "tools.import_notebook", *map(str, args)], capture_output=True,
                          text=True, timeout=300, cwd=REPO, env=_env())
    assert proc.returncode == code, proc.stderr
    return proc


def test_import_writes_a_checkpoint_and_an_export_with_the_notebooks_weights(imported, capsys):
    ckpt = load_weights(imported["out"])
    export = load_weights(imported["out"] / "model.safetensors")
    assert ckpt.source.name == "step_0000000" and ckpt.step == 0
    assert ckpt.config == export.config and ckpt.config.block == "postnorm" and ckpt.config.head_bias
    for key, tensor in ckpt.state_dict.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, export.state_dict[key])
    # Same logits as the notebook's own model, read back from disk.
    model = GPT(ckpt.config)
    model.load_state_dict(ckpt.state_dict)
    idx = torch.randint(0, ckpt.config.vocab_size, (2, SIZES["block_size"]), generator=torch.Generator().manual_seed(1))
    [(ref, _)] = notebook_forward(imported["pkl"], [(idx, None)])
    with torch.no_grad():
        assert (model.eval()(idx) - ref).abs().max().item() < 1e-5


def test_the_imported_tokenizer_is_the_datasets(imported):
    tok = load_weights(imported["out"]).tokenizer
    ds = Dataset.open(imported["data"])
    assert tok.fingerprint == ds.tokenizer.fingerprint and tok.chars == ds.tokenizer.chars
    text = imported["val"].read_text(encoding="utf-8")[:50]
    assert tok.decode(ds.tokenizer.encode(text)) == text


@pytest.mark.parametrize("source", ["import", "import/model.safetensors"])
def test_sample_reads_the_import(imported, source, capsys):
    path = imported["out"].parent / source
    flag = "--model" if source.endswith(".safetensors") else "--run"
    assert sample_main([flag, str(path), "--prompt", "def f", "--max-new-tokens", "20", "--temperature", "0"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("def f") and len(text) >= 20


def test_import_prints_the_training_command(imported):
    printed = imported["printed"]
    assert "nothing in it was run" in printed
    # No --model.vocab_size: the seed preset takes the dataset's, which is vocab.txt's.
    assert f"-m dist_gpt.train --preset seed --data.path data/notebook --init-from {imported['out']} " in printed
    assert "--model.vocab_size" not in printed


def test_import_refuses_another_vocabulary_and_never_overwrites(imported, tmp_path):
    other = tmp_path / "vocab.txt"
    other.write_text(imported["vocab"].read_text(encoding="utf-8") + "Z", encoding="utf-8")
    err = import_tool(imported["pkl"], "--vocab", other, "--out", tmp_path / "x", code=2).stderr
    assert err.count("\n") == 1 and err.startswith(f"error: --vocab {other} has ") and "distinct characters" in err
    assert not (tmp_path / "x").exists()
    before = (imported["out"] / "model.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match="already exists"):
        import_notebook(imported["pkl"], imported["vocab"], imported["out"])
    assert (imported["out"] / "model.safetensors").read_bytes() == before
    with pytest.raises(DataError, match="not found"):
        import_notebook(imported["pkl"], tmp_path / "missing.txt", tmp_path / "y")


def _notebook_val_loss(imported) -> float:
    """The notebook model's mean loss, by its own forward, on the validation blocks dist_gpt evaluates."""
    ds = Dataset.open(imported["data"])
    blocks = list(ValBlocks(ds, block_size=SIZES["block_size"], batch_size=VAL_BLOCKS, max_blocks=VAL_BLOCKS))
    x, y = torch.cat([b[0] for b in blocks]), torch.cat([b[1] for b in blocks])
    assert x.shape == (VAL_BLOCKS, SIZES["block_size"])
    [(_, loss)] = notebook_forward(imported["pkl"], [(x, y)])
    return loss


def _train_args(imported, run_dir: Path, init_from: Path) -> list[str]:
    cfg = load_weights(imported["out"]).config
    shape = [f"--model.{k}={getattr(cfg, k)}" for k in ("block_size", "n_layer", "n_head", "n_embd", "head_dim")]
    return ["--preset", "seed", "--data.path", str(imported["data"]), "--init-from", str(init_from), *shape,
            "--train.precision=fp32", "--train.steps=2", "--train.global_batch=4", "--train.micro_batch=2",
            f"--eval.max_blocks={VAL_BLOCKS}", "--eval.batch_size=4", "--eval.sample_tokens=0",
            "--log.tensorboard=false", "--log.interval=1", "--train.run_dir", str(run_dir)]


def _first_eval(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in records if "val/loss" in r)


def test_training_from_the_import_begins_at_the_notebooks_loss(imported, tmp_path):
    run_train(_train_args(imported, tmp_path / "run", imported["out"]))
    first = _first_eval(tmp_path / "run")
    assert first["step"] == 0
    assert abs(first["val/loss"] - _notebook_val_loss(imported)) < 1e-5
    assert (tmp_path / "run" / "checkpoints" / "step_0000002" / "DONE").exists()


@pytest.mark.slow
def test_two_ranks_continue_from_the_export(imported, tmp_path):
    run_train(_train_args(imported, tmp_path / "run", imported["out"] / "model.safetensors"), nproc=2)
    first = _first_eval(tmp_path / "run")
    assert first["step"] == 0 and abs(first["val/loss"] - _notebook_val_loss(imported)) < 1e-5
    assert (tmp_path / "run" / "checkpoints" / "step_0000002" / "DONE").exists()

"""Files made by an older dist_gpt still work: a run resumes, a dataset opens, an export loads
(torchtitan's checkpoint-compatibility test). The fixtures in tests/assets/compat/ were made by the
code before the package was cut into layers (their README says how); never regenerate them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import ASSETS, EXACT, losses, run_train

COMPAT = ASSETS / "compat"
EXPECTED = json.loads((COMPAT / "expected.json").read_text())


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return ""


def _same_machine() -> bool:
    # A bitwise loss is bitwise only on the CPU model and torch build it was recorded with.
    return _cpu_model() == EXPECTED["cpu"] and torch.__version__ == EXPECTED["torch"]


def test_old_dataset_opens_and_verifies():
    from dist_gpt.data.dataset import Dataset

    ds = Dataset.open(COMPAT / "dataset", verify=True)
    want = EXPECTED["dataset"]
    assert (ds.vocab_size, ds.num_tokens("train"), ds.num_tokens("val"), ds.fingerprint) == (
        want["vocab_size"], want["train_tokens"], want["val_tokens"], want["fingerprint"])


def test_old_export_loads_with_the_same_logits():
    from dist_gpt.convert.weights import load_weights
    from dist_gpt.model.gpt import GPT

    loaded = load_weights(COMPAT / "export.safetensors")
    model = GPT(loaded.config)
    model.load_state_dict(loaded.state_dict)
    model.eval()
    with torch.no_grad():
        logits = model(torch.arange(32).view(1, 32) * 7 % 256)
    assert float(logits.double().sum()) == pytest.approx(EXPECTED["export_logits_sum"], rel=1e-5)
    assert logits[0, -1, :8].tolist() == pytest.approx(EXPECTED["export_logits_last"], rel=1e-5)


def test_old_run_resumes_where_it_stopped(tmp_path):
    run, data = tmp_path / "run", tmp_path / "dataset"
    shutil.copytree(COMPAT / "run", run)
    shutil.copytree(COMPAT / "dataset", data)
    out = run_train([*EXACT, "--data.path", str(data), "--train.run_dir", str(run), "--train.steps=10",
                     "--checkpoint.interval=5", "--model.n_embd=16", "--model.n_layer=1"])
    assert "resumed from" in out.stdout and "at step 5" in out.stdout
    got = {str(k): v for k, v in losses(run).items() if k > 5}
    want = EXPECTED["resumed_losses"]
    if _same_machine():
        assert got == want
    else:
        assert got == pytest.approx(want, rel=1e-5)

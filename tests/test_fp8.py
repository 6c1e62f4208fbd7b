"""FP8 training (`--train.fp8=true`, dist_gpt/parallel/fp8.py), on a CPU through torchao's emulation
(DIST_GPT_FP8_EMULATE=1): which layers convert, the one-line refusals, checkpoints across fp8 and
bf16, and 300 steps of the `cpu` preset against bf16."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

from conftest import final, losses, require, run_train
from dist_gpt import config
from dist_gpt.parallel import fp8
from dist_gpt.errors import ConfigError
from dist_gpt.model.gpt import GPT

EMULATE = {fp8.EMULATE_ENV: "1"}


def _model(recipe: str = "modern") -> GPT:
    cfg = config.build("debug", overrides={"train.recipe": recipe, "model.vocab_size": 256})
    torch.manual_seed(0)
    return GPT(cfg.model)


@pytest.mark.parametrize("recipe", ["classic", "modern"])
def test_only_the_blocks_linears_convert_and_the_state_dict_is_unchanged(recipe, monkeypatch):
    require("torchao")
    from torchao.float8.float8_linear import Float8Linear

    monkeypatch.setenv(fp8.EMULATE_ENV, "1")
    model = _model(recipe)
    before = {k: (v.shape, v.dtype) for k, v in model.state_dict().items()}
    assert fp8.convert(model) == 4 * model.cfg.n_layer
    converted = {name for name, m in model.named_modules() if isinstance(m, Float8Linear)}
    assert converted == {name for name, m in model.named_modules() if isinstance(m, nn.Linear)
                         and name.startswith("blocks.")}
    assert not isinstance(model.head, Float8Linear) and type(model.tok_emb) is nn.Embedding
    # the same keys, shapes and dtypes as plain nn.Linear: checkpoints resume across fp8 and bf16
    assert {k: (v.shape, v.dtype) for k, v in model.state_dict().items()} == before
    plain = _model(recipe)
    plain.load_state_dict(model.state_dict())  # strict
    x = torch.randint(0, 256, (2, model.cfg.block_size))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x, x).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_refused_on_a_cpu_without_emulation_in_one_line(tmp_path):
    out = run_train(["--preset", "debug", "--train.fp8=true", "--train.precision=bf16",
                     f"--train.run_dir={tmp_path / 'run'}"], env={fp8.EMULATE_ENV: ""}, check=False)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: train.fp8=true needs a GPU with FP8 (compute capability 8.9+), and this run is on the CPU: use "
        f"--train.fp8=false (or {fp8.EMULATE_ENV}=1 to emulate FP8 for testing, no faster)"]
    assert not (tmp_path / "run").exists()


def test_refused_on_a_gpu_before_8_9_without_torchao_and_outside_bf16(monkeypatch):
    monkeypatch.delenv(fp8.EMULATE_ENV, raising=False)
    # What an A100 reports (no FP8 tensor cores): the refusal names the card and its capability.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ConfigError, match=r"NVIDIA A100-SXM4-80GB has 8\.0: use --train.fp8=false"):
        fp8.check(torch.device("cuda", 0), "bf16")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    fp8.check(torch.device("cuda", 0), "bf16")  # an H100 passes
    monkeypatch.setenv(fp8.EMULATE_ENV, "1")
    with pytest.raises(ConfigError, match=r"precision is fp32: use --train.precision=bf16"):
        fp8.check(torch.device("cpu"), "fp32")
    monkeypatch.setitem(sys.modules, "torchao", None)  # as if torchao were not installed
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    with pytest.raises(ConfigError, match=r"needs torchao: pip install 'dist_gpt\[fp8\]'$"):
        fp8.check(torch.device("cpu"), "bf16")


@pytest.mark.slow
def test_checkpoints_resume_across_fp8_and_bf16(tiny_data, tmp_path):
    """bf16 for 4 steps, fp8 (emulated) to 8 under fsdp on 2 ranks, bf16 again to 12 in one process,
    in one run directory; every resume continues the step count and the losses keep falling."""
    require("torchao")
    run = tmp_path / "run"
    args = ["--preset", "debug", "--train.precision=bf16", "--log.interval=1", "--log.tensorboard=false",
            "--eval.sample_tokens=0", "--eval.interval=0", "--eval.at_start=false", "--checkpoint.interval=4",
            f"--data.path={tiny_data}", f"--train.run_dir={run}"]
    run_train([*args, "--train.steps=4"], timeout=1800)
    out = run_train([*args, "--train.steps=8", "--train.fp8=true", "--parallel.data=fsdp"], nproc=2, env=EMULATE,
                    timeout=1800)
    assert "resumed from" in out.stdout and "step 4" in out.stdout
    out = run_train([*args, "--train.steps=12"], timeout=1800)
    assert "step 8" in out.stdout
    got = losses(run)
    assert sorted(got) == list(range(1, 13)) and final(run)["step"] == 12
    assert all(torch.isfinite(torch.tensor(v)) for v in got.values())
    assert got[12] < got[4] < got[1]


@pytest.mark.slow
def test_300_steps_of_the_cpu_preset_in_emulated_fp8_match_bf16(stdlib_data, tmp_path):
    """The `cpu` preset, 300 steps, same seed: emulated FP8 ends within 0.05 nats per byte of bf16's
    validation loss (byte-level data: a token is a byte). Evaluation only at the end, on 64 blocks.
    The two runs go side by side, one thread each (two threads per process stall on a busy machine).

    On the default corpus, not the 80 KB test text: 300 steps of 4,096 tokens are 16 epochs of that
    text, where the validation loss of an overfitting model moves by up to 0.09 between seeds of
    bf16 alone, as much as FP8 and bf16 differ. On the corpus (1.2M of ~30M tokens) measured
    differences were 0.000-0.011 (docs/PERFORMANCE.md, "FP8")."""
    require("torchao")
    args = ["--preset", "cpu", "--train.steps=300", "--train.precision=bf16", "--train.threads=1",
            "--log.tensorboard=false", "--eval.interval=0", "--eval.at_start=false", "--eval.max_blocks=64",
            "--eval.sample_tokens=0", "--checkpoint.interval=0", f"--data.path={stdlib_data}"]
    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(run_train, [*args, f"--train.run_dir={tmp_path / 'bf16'}"], timeout=3600),
                pool.submit(run_train, [*args, f"--train.run_dir={tmp_path / 'fp8'}", "--train.fp8=true"],
                            env=EMULATE, timeout=3600)]
        for run in runs:
            run.result()
    bf16, fp8_ = final(tmp_path / "bf16"), final(tmp_path / "fp8")
    assert bf16["step"] == fp8_["step"] == 300
    assert abs(fp8_["val_loss"] - bf16["val_loss"]) < 0.05, (fp8_["val_loss"], bf16["val_loss"])

"""The training recipes (`--recipe classic | modern`) through the real entry point (fp32, real processes).

Where Muon's own behaviour is already tested elsewhere, it is referenced rather than repeated:

* Muon gets exactly the 2-D hidden matrices, AdamW everything else (embeddings, head, norms, biases):
  tests/test_optim.py::test_muon_gets_exactly_the_hidden_matrices (every architecture, tied or not).
* Muon's optimizer state round-trips bitwise: tests/test_optim.py::test_optimizer_state_round_trip_is_bitwise.
* A Muon run resumed from a checkpoint gives bitwise the uninterrupted losses on 2 ranks, and on 1 rank
  the identical data stream with losses within 1e-5: tests/test_resume.py; 1 and 2 processes with the
  same global batch agree within 1e-5: tests/test_train.py. Those runs take the debug preset's default
  recipe; `test_the_integration_tests_train_with_muon` below pins that it is Muon, and
  `test_a_muon_checkpoint_holds_momentum_for_exactly_the_hidden_matrices` that what such a resume
  reads back is Muon state.
"""

from __future__ import annotations

import json

import torch
from torch.distributed.checkpoint import FileSystemReader

from conftest import ASSETS, EXACT, losses, run_train
from machine import cpu_identity, fingerprint
from dist_gpt import config as config_mod

RECORD = ASSETS / "classic_losses.json"
# The run the record was made with (tests/assets/classic_losses.json, "args"). One CPU thread: the
# matmul kernels split work by thread count and 1 vs 2 threads already differ by 1e-7 relative.
CLASSIC_RECORD_ARGS = ["--preset", "debug", "--recipe", "classic", "--train.precision=fp32", "--model.dropout=0",
                       "--log.interval=1", "--log.tensorboard=false", "--eval.sample_tokens=0",
                       "--train.steps=30", "--train.threads=1"]


def _val_losses(run_dir) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "val/loss" in rec:
            out[rec["step"]] = rec["val/loss"]
    return out


def classic_record_run(data, run_dir) -> tuple[dict[int, float], dict[int, float]]:
    """The recorded run's per-step training losses and its validation losses, made here."""
    run_train([*CLASSIC_RECORD_ARGS, f"--data.path={data}", f"--train.run_dir={run_dir}"])
    return losses(run_dir), _val_losses(run_dir)


def test_classic_recipe_reproduces_its_recorded_losses(tiny_data, tmp_path):
    """The classic recipe's losses are the ones recorded before the modern recipe work began.

    Bitwise only against a record made on this machine's fingerprint (tests/machine.py: torch, CPU
    vendor, model name and number, ISA level, thread count): the run is fp32 on one thread, and the same
    kernels then give the same bits. Two CPUs that both report AVX512 to torch (an AMD EPYC and an Intel
    Xeon) already differ in the 7th digit, so everywhere else the losses must agree with the first record
    within its relative tolerance (1e-6; the drift between kernel variants over 30 steps is ~1e-7, while a
    changed recipe moves the losses by far more).
    """
    record = json.loads(RECORD.read_text())
    assert record["args"] == CLASSIC_RECORD_ARGS
    got_train, got_val = classic_record_run(tiny_data, tmp_path / "run")
    here = fingerprint(threads=1)
    for rec in record["records"]:
        want_train = {int(k): v for k, v in rec["train_loss"].items()}
        want_val = {int(k): v for k, v in rec["val_loss"].items()}
        assert sorted(got_train) == sorted(want_train) == list(range(1, 31))
        assert sorted(got_val) == sorted(want_val)
        if rec["machine"] == here:
            assert got_train == want_train and got_val == want_val, f"not bitwise on {here}"
    first = record["records"][0]
    pairs = [(got_train[int(s)], v) for s, v in first["train_loss"].items()]
    pairs += [(got_val[int(s)], v) for s, v in first["val_loss"].items()]
    worst = max(abs(a - b) / abs(b) for a, b in pairs)
    print(f"largest relative loss difference to the record of {first['machine']}: {worst:.2e}")
    assert worst <= record["tolerance"]


def test_a_record_is_bitwise_only_on_its_own_fingerprint(tmp_path):
    """The fingerprint tells apart the two machines that broke the old record (same torch, both AVX512)."""
    def cpuinfo(vendor, name, family, model):
        path = tmp_path / f"{vendor}-{model}"
        path.write_text(f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: {family}\nmodel\t\t: {model}\n"
                        f"model name\t: {name}\nflags\t\t: avx512f\n\nprocessor\t: 1\nvendor_id\t: other\n")
        return path

    epyc = cpu_identity(cpuinfo("AuthenticAMD", "AMD EPYC", 25, 17))
    xeon = cpu_identity(cpuinfo("GenuineIntel", "Intel(R) Xeon(R) Platinum 8480C", 6, 143))
    assert epyc == {"cpu_vendor": "AuthenticAMD", "cpu_model_name": "AMD EPYC", "cpu_family": "25", "cpu_model": "17"}
    assert epyc != xeon and xeon["cpu_vendor"] == "GenuineIntel"
    assert cpu_identity(tmp_path / "missing")["cpu_vendor"] == "unknown"
    assert fingerprint(threads=1) != fingerprint(threads=2)


def test_the_integration_tests_train_with_muon(tiny_data):
    """tests/test_resume.py and tests/test_train.py run EXACT without naming a recipe: the debug
    preset's default. It must stay the modern recipe, so that their exact-resume and 1-vs-2-rank
    parity checks are checks of Muon; and --recipe classic must turn every part of it off."""
    modern = config_mod.parse([*EXACT, f"--data.path={tiny_data}"])
    assert modern.train.recipe == "modern" and modern.optim.name == "muon" and modern.optim.schedule == "wsd"
    assert (modern.model.positions, modern.model.norm, modern.model.mlp) == ("rope", "rmsnorm", "relu2")
    assert modern.model.qk_norm and modern.model.zero_init and not modern.model.tie_embeddings
    classic = config_mod.parse([*EXACT, "--recipe", "classic", f"--data.path={tiny_data}"])
    assert classic.optim.name == "adamw" and classic.optim.schedule == "cosine"
    assert (classic.model.positions, classic.model.norm, classic.model.mlp) == ("learned", "layernorm", "gelu")
    assert not classic.model.qk_norm and not classic.model.zero_init and classic.model.tie_embeddings


def _optimizer_state_keys(checkpoint) -> dict[str, set[str]]:
    """parameter name -> the optimizer state keys a checkpoint holds for it (from the DCP metadata)."""
    prefix = "model_optim.optim.state."
    out: dict[str, set[str]] = {}
    for key in FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata:
        if key.startswith(prefix):
            param, _, name = key[len(prefix):].rpartition(".")
            out.setdefault(param, set()).add(name)
    return out


def test_a_muon_checkpoint_holds_momentum_for_exactly_the_hidden_matrices(tiny_data, tmp_path):
    """What a resumed modern run reads back: Muon's momentum for the 2-D block matrices (qkv, attention
    output, MLP in/out of each of the 2 layers) and AdamW's moments for every other parameter."""
    run = tmp_path / "run"
    run_train([*EXACT, "--recipe", "modern", f"--data.path={tiny_data}", f"--train.run_dir={run}",
               "--train.steps=6", "--optim.warmup_steps=2", "--eval.interval=0", "--eval.at_start=false"])
    state = _optimizer_state_keys(run / "checkpoints" / "step_0000006")
    hidden = {f"blocks.{i}.{m}.weight" for i in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")}
    assert {p for p, keys in state.items() if keys == {"momentum_buffer"}} == hidden
    others = {p: keys for p, keys in state.items() if p not in hidden}
    assert others and all(keys == {"exp_avg", "exp_avg_sq", "step"} for keys in others.values())
    assert {"tok_emb.weight", "head.weight", "norm_f.weight"} <= set(others)

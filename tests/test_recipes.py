"""The training recipes (`--recipe classic | modern`) through the real entry point (fp32, real processes).

Where Muon's own behaviour is already tested elsewhere, it is referenced rather than repeated:

* Muon gets exactly the 2-D hidden matrices, AdamW everything else (embeddings, head, norms, biases):
  tests/test_optim.py::test_muon_gets_exactly_the_hidden_matrices (every architecture, tied or not).
* Muon's optimizer state round-trips bitwise: tests/test_optim.py::test_optimizer_state_round_trip_is_bitwise.
"""

from __future__ import annotations

import json

import torch

from conftest import ASSETS, losses, run_train

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


def test_classic_recipe_reproduces_its_recorded_losses(tiny_data, tmp_path):
    """The classic recipe's losses are the ones recorded before the modern recipe work began.

    Bitwise on the machine type the record was made on (same torch, same CPU kernel family): the
    run is fp32 on one thread, and the same inputs then give the same bits. Elsewhere the CPU's
    kernels may sum in another order, so a relative 1e-6 is allowed (observed drift between
    kernel variants over 30 steps is ~1e-7); a changed recipe moves the losses by far more.
    """
    record = json.loads(RECORD.read_text())
    run = tmp_path / "run"
    run_train([*CLASSIC_RECORD_ARGS, f"--data.path={tiny_data}", f"--train.run_dir={run}"])
    got_train, got_val = losses(run), _val_losses(run)
    want_train = {int(k): v for k, v in record["train_loss"].items()}
    want_val = {int(k): v for k, v in record["val_loss"].items()}
    assert sorted(got_train) == sorted(want_train) == list(range(1, 31))
    assert sorted(got_val) == sorted(want_val)
    same_machine = record["machine"] == {"torch": torch.__version__,
                                         "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if same_machine:
        assert got_train == want_train and got_val == want_val
    else:
        pairs = [(got_train[s], want_train[s]) for s in want_train] + [(got_val[s], want_val[s]) for s in want_val]
        worst = max(abs(a - b) / abs(b) for a, b in pairs)
        print(f"recorded on {record['machine']}; largest relative loss difference here {worst:.2e}")
        assert worst <= 1e-6

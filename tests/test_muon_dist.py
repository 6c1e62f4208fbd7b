"""Muon under FSDP2 (fully_shard per block and at the root, CPU mesh), HSDP 2 x 2 and DDP, with real
gloo processes (tests/muon_worker.py): 10 steps equal one process on the whole batch within 1e-5,
and the Newton-Schulz work is divided among the ranks."""

from __future__ import annotations

import pytest
import torch

from muon_worker import CONFIGS, STEPS, run_layouts, single_process

pytestmark = pytest.mark.slow  # each world size is one job of spawned gloo processes: 20-60 s here


def matrices(world: int) -> int:
    """Muon's matrices in the GPT of muon_worker for `world` ranks: per block qkv, attn.proj, mlp.fc, mlp.proj."""
    return 4 * CONFIGS[world].n_layer


@pytest.fixture(scope="module")
def reference() -> dict:
    return {world: single_process(world) for world in CONFIGS}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    return run_layouts(2, ["fsdp", "fsdp_columns", "ddp"], tmp_path_factory.mktemp("muon2"))


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory) -> dict:
    return run_layouts(4, ["fsdp", "ddp", "hsdp"], tmp_path_factory.mktemp("muon4"))


def assert_matches(run: dict, references: dict, world: int, sharded: bool) -> None:
    reference = references[world]
    assert len(run["losses"]) == len(reference["losses"]) == STEPS
    for step, (got, want) in enumerate(zip(run["losses"], reference["losses"])):
        assert abs(got - want) <= 1e-5 * abs(want), f"step {step}: loss {got} vs {want}"
    for step, (got, want) in enumerate(zip(run["weights"], reference["weights"])):
        assert got.keys() == want.keys()
        for name in want:
            diff = (got[name] - want[name]).abs().max().item()
            assert diff <= 1e-5, f"step {step}: {name} differs by {diff:.2e}"
    per_rank = run["matrices_per_rank"]  # whole matrices each rank orthogonalised per step
    assert sum(per_rank) == matrices(world) and max(per_rank) == matrices(world) // world, per_rank
    assert run["momentum_is_dtensor"] == sharded  # FSDP keeps the state sharded like its parameter


def test_reference_is_the_same_batched_or_not(reference):
    """The 2-rank GPT has 4 matrices of each shape, 16+ wide: batched in one process, bit for bit."""
    unbatched = single_process(2, batched=False)
    assert unbatched["losses"] == reference[2]["losses"]
    assert all(torch.equal(a[n], b[n]) for a, b in zip(unbatched["weights"], reference[2]["weights"]) for n in a)


@pytest.mark.parametrize("layout", ["fsdp", "fsdp_columns", "ddp"])
def test_two_ranks_match_one_process(two_ranks, reference, layout):
    assert_matches(two_ranks[layout], reference, world=2, sharded=layout != "ddp")


@pytest.mark.parametrize("layout", ["fsdp", "ddp", "hsdp"])
def test_four_ranks_match_one_process(four_ranks, reference, layout):
    """fsdp: slices of 3, 3, 3 and 0 rows of the 9-row matrices; hsdp: 2 replicas x 2 shards."""
    assert_matches(four_ranks[layout], reference, world=4, sharded=layout != "ddp")

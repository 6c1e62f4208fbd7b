"""Muon under FSDP2, HSDP and DDP on gloo, for tests/test_muon_dist.py.

    run_layouts(world, ["fsdp", "ddp", "hsdp"], out_dir)    # spawns `world` processes, one file per layout

Layouts: fsdp (FSDP2, matrices sliced by rows), fsdp_columns (FSDP2's shard_placement_fn slices
the matrices with an even number of columns by columns, so one Muon holds two layouts), hsdp (2
replicas x world/2 shards), ddp.

Every layout trains the same tiny GPT (AdamW + Muon from dist_gpt.optim.build_optimizers, fp32
Newton-Schulz) for STEPS steps on the same global batches, each rank on its share, and rank 0 saves
the whole weights after every step, the mean loss of every step and how many matrices each rank
orthogonalised. `single_process()` is the reference: one process, the whole batch.

The models' widths do not divide the world, so FSDP2 slices are uneven: on 2 ranks a GPT of 4 blocks,
17 wide (slices of 9 + 8 rows), whose owners batch 2 matrices of each shape; on 4 ranks a GPT of 2
blocks, 9 wide (slices of 3 + 3 + 3 + 0 rows: a rank holding nothing of a matrix).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dist_gpt.model.gpt import GPT, GPTConfig
from dist_gpt.optim.muon import Muon
from dist_gpt.optim.optimizers import OptimConfig, build_optimizers

STEPS = 10
BATCH = 8  # sequences per step, all ranks together
MODERN = dict(vocab_size=32, block_size=8, n_head=2, norm="rmsnorm", positions="rope", qk_norm=True, mlp="relu2",
              tie_embeddings=False)
CONFIGS = {2: GPTConfig(n_layer=4, n_embd=17, head_dim=8, mlp_hidden=34, **MODERN),  # by world size
           4: GPTConfig(n_layer=2, n_embd=9, head_dim=4, mlp_hidden=14, **MODERN)}
OPTIM = OptimConfig(name="muon", lr=1e-2, muon_lr=0.02, muon_weight_decay=0.01, warmup_steps=0)


def build(config: GPTConfig) -> GPT:
    torch.manual_seed(0)
    return GPT(config)


def batch(step: int, config: GPTConfig) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return (torch.randint(0, config.vocab_size, (BATCH, config.block_size), generator=g),
            torch.randint(0, config.vocab_size, (BATCH, config.block_size), generator=g))


def whole(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}


def count_matrices(optimizers) -> list[int]:
    """Wrap Muon's Newton-Schulz to count the whole matrices this process orthogonalises."""
    muon = next(opt for opt in optimizers if isinstance(opt, Muon))
    counted = [0]
    inner = muon._newton_schulz

    def counting(groups, matrices):
        counted[0] += len(matrices)
        return inner(groups, matrices)

    muon._newton_schulz = counting
    return counted


def train(model, forward, optimizers, rank: int, world: int) -> dict:
    """STEPS steps; every rank takes its BATCH // world sequences. Returns what rank 0 saves."""
    share = BATCH // world
    losses, weights = [], []
    for step in range(STEPS):
        x, y = batch(step, model.cfg)
        loss = forward(x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share])
        loss.backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        loss = loss.detach()
        if world > 1:
            dist.all_reduce(loss)
        losses.append(loss.item() / world)
        weights.append(whole(model))
    return {"losses": losses, "weights": weights}


def single_process(world: int, batched: bool = True) -> dict:
    """The reference for the runs on `world` ranks: their model, one process, the whole batch."""
    model = build(CONFIGS[world])
    optimizers = build_optimizers(model, OPTIM, "cpu", exact=True)
    optimizers[1].batched = batched
    return train(model, model, optimizers, 0, 1)


def _shard(model: GPT, mesh, columns: bool = False) -> None:
    """fully_shard per block and at the root; with `columns`, the matrices whose columns divide the
    world are sliced by columns (FSDP2 slices other dims only evenly), the rest by rows."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    def placement(p):
        return Shard(1 if columns and p.ndim == 2 and p.shape[1] % mesh.size() == 0 else 0)

    for block in model.blocks:
        fully_shard(block, mesh=mesh, shard_placement_fn=placement)
    fully_shard(model, mesh=mesh, shard_placement_fn=placement)


def run_layout(layout: str, rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    model, group = build(CONFIGS[world]), None
    forward = model
    if layout in ("fsdp", "fsdp_columns"):
        _shard(model, init_device_mesh("cpu", (world,)), columns=layout == "fsdp_columns")
    elif layout == "hsdp":
        _shard(model, init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard")))
    else:
        forward = torch.nn.parallel.DistributedDataParallel(model)
        group = dist.group.WORLD
    optimizers = build_optimizers(model, OPTIM, "cpu", exact=True, process_group=group)
    counted = count_matrices(optimizers)
    result = train(model, forward, optimizers, rank, world)
    per_rank = [None] * world
    dist.all_gather_object(per_rank, counted[0] // STEPS)
    result["matrices_per_rank"] = per_rank
    result["momentum_is_dtensor"] = all(hasattr(s["momentum_buffer"], "device_mesh")
                                        for s in optimizers[1].state.values())
    return result


def _worker(rank: int, world: int, layouts: list[str], out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=world)
    for layout in layouts:
        result = run_layout(layout, rank, world)
        if rank == 0:
            torch.save(result, Path(out_dir) / f"{layout}.pt")
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo can abort during interpreter exit even after destroy (see docs/CLUSTER.md)


def run_layouts(world: int, layouts: list[str], out_dir: Path) -> dict[str, dict]:
    mp.spawn(_worker, args=(world, layouts, str(out_dir)), nprocs=world, join=True)
    return {layout: torch.load(out_dir / f"{layout}.pt", weights_only=True) for layout in layouts}

"""A tiny DDP training process for the checkpoint tests (run by torchrun or as one plain process).

    torchrun --standalone --nproc_per_node=2 tests/checkpoint_worker.py save  ROOT OUT
    torchrun --standalone --nproc_per_node=2 tests/checkpoint_worker.py load  CKPT OUT
    torchrun --standalone --nproc_per_node=2 tests/checkpoint_worker.py crash ROOT OUT
    python tests/checkpoint_worker.py crash-at {write|rename|done} ROOT [async]
    torchrun --standalone --nproc_per_node=2 tests/checkpoint_worker.py fsdp-async ROOT OUT

save:  3 steps -> sync save at step 3; 2 more -> async save at step 5; rank 0 writes the live state
       after each save to OUT/expected_step<N>.pt (torch.save of tensors only).
load:  load CKPT into a fresh model + AdamW; every rank writes OUT/loaded_rank<r>.pt.
crash: save at step 1; rank 1 is SIGKILLed while it writes the step-2 checkpoint.
fsdp-async: the model sharded with FSDP2; async saves at steps 2 and 4 by one Checkpointer (reused
       staging buffers) while training goes on; each rank loads both into a fresh sharded model and
       writes OUT/fsdp_rank<r>.json: its shards equal bitwise to those at each step, buffers reused.
crash-at: one process, saves step 1, then kills itself (SIGKILL) at the named point of the step-2 save
       (with `async`: both saves async, the kill in the background write of step 2).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from dist_gpt.checkpoint import Checkpointer, CheckpointConfig, JsonState, ModelOptimizerState
from dist_gpt.parallel.dist import DistEnv


def make_checkpointer(root, cfg, tensors, note=None, rank=0, world=1, val_loss=lambda step: None):
    """(Checkpointer of `tensors` and one JSON state "note" holding `note`, that JsonState)."""
    box = JsonState(note)
    return Checkpointer(root, cfg, DistEnv(rank=rank, world_size=world), tensors, {"note": box}, val_loss), box


def build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def train_step(ddp, opt, step: int, rank: int) -> None:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(4, 8, generator=g)  # (B=4, 8) this rank's batch
    ddp(x).pow(2).mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def flat_state(model, opt) -> dict[str, torch.Tensor]:
    """Model tensors and optimizer state tensors under readable keys (what tests compare)."""
    out = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    names = {id(p): n for n, p in model.named_parameters()}
    for p, st in opt.state.items():
        for k, v in st.items():
            out[f"optim.{names[id(p)]}.{k}"] = v.detach().clone() if torch.is_tensor(v) else torch.tensor(v)
    return out


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    mode = sys.argv[1]
    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    model, opt = build()
    ddp = nn.parallel.DistributedDataParallel(model) if distributed else model
    state = {"model_optim": ModelOptimizerState(ddp, [opt])}  # DDP-wrapped on purpose: no "module." keys

    if mode == "save":
        root, out = Path(sys.argv[2]), Path(sys.argv[3])
        step = 0
        for target, use_async in ((3, False), (5, True)):
            ckpt, note = make_checkpointer(root, CheckpointConfig(async_save=use_async), state, rank=rank,
                                           world=world, val_loss=lambda s: 1.0 / s)
            while step < target:
                step += 1
                train_step(ddp, opt, step, rank)
            note.value = {"step": step, "world_size": world}
            ckpt.save(step)
            if rank == 0:
                torch.save(flat_state(model, opt), out / f"expected_step{step}.pt")
            train_step(ddp, opt, 100 + step, rank)  # change the live state while an async write may still run
            ckpt.wait()
    elif mode == "load":
        ckpt_path, out = Path(sys.argv[2]), Path(sys.argv[3])
        ckpt, note = make_checkpointer(ckpt_path.parent, CheckpointConfig(), state, rank=rank, world=world)
        ckpt.load(ckpt_path)
        torch.save(flat_state(model, opt) | {"meta_step": torch.tensor(note.value["step"])}, out / f"loaded_rank{rank}.pt")
    elif mode == "fsdp-async":
        fsdp_async(Path(sys.argv[2]), Path(sys.argv[3]), rank, world)
    elif mode == "crash":
        root = Path(sys.argv[2])
        ckpt, note = make_checkpointer(root, CheckpointConfig(), state, {"step": 1}, rank, world)
        train_step(ddp, opt, 1, rank)
        ckpt.save(1)
        train_step(ddp, opt, 2, rank)
        note.value = {"step": 2}
        if rank == 1:
            from dist_gpt.checkpoint import writer

            def write_then_die(self, plan, planner):
                writer.FileSystemWriter.write_data(self, plan, planner)  # data on disk, no checksums
                kill_self()

            writer.ChecksummedFileSystemWriter.write_data = write_then_die
        ckpt.save(2)
    elif mode == "crash-at":
        where, root, use_async = sys.argv[2], Path(sys.argv[3]), sys.argv[4:] == ["async"]
        ckpt, note = make_checkpointer(root, CheckpointConfig(async_save=use_async), state, {"step": 1}, rank, world)
        train_step(ddp, opt, 1, rank)
        ckpt.save(1)
        train_step(ddp, opt, 2, rank)
        inject_crash(where)
        note.value = {"step": 2}
        ckpt.save(2)
        ckpt.wait()  # an async save is killed in its background thread
        raise SystemExit("the injected crash did not happen")
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def sharded(world: int):
    """build()'s model with each Linear and the root sharded over the ranks (FSDP2, CPU mesh)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    mesh = init_device_mesh("cpu", (world,))
    for layer in (model[0], model[2], model):
        fully_shard(layer, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def local_shards(model, opt) -> dict[str, torch.Tensor]:
    """flat_state of this rank's shards (a DTensor's local part)."""
    return {k: v.to_local().clone() if hasattr(v, "to_local") else v
            for k, v in flat_state(model, opt).items()}


def fsdp_async(root: Path, out: Path, rank: int, world: int) -> None:
    model, opt = sharded(world)
    ckpt, note = make_checkpointer(root, CheckpointConfig(async_save=True, keep_last=0),
                                   {"model_optim": ModelOptimizerState(model, [opt])}, rank=rank, world=world)
    expected, buffers = {}, []
    for step in range(1, 6):
        train_step(model, opt, step, rank)
        if step in (2, 4):
            note.value = {"step": step}
            ckpt.save(step)  # the next train_step changes the shards in place while this one is written
            expected[step] = local_shards(model, opt)
            buffers.append(sorted(t.to_local().data_ptr() if hasattr(t, "to_local") else t.data_ptr()
                                  for t in torch.utils._pytree.tree_leaves(ckpt.staging.staged)))
    ckpt.close()
    same = {}
    for step, want in expected.items():
        model2, opt2 = sharded(world)
        train_step(model2, opt2, 99, rank)  # AdamW state to load into
        reader, _ = make_checkpointer(root, CheckpointConfig(), {"model_optim": ModelOptimizerState(model2, [opt2])},
                                      rank=rank, world=world)
        reader.load(root / f"step_{step:07d}")
        got = local_shards(model2, opt2)
        same[step] = got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    (out / f"fsdp_rank{rank}.json").write_text(json.dumps({"same": same, "reused": buffers[0] == buffers[1]}))


def inject_crash(where: str) -> None:
    """SIGKILL this process at one point of the next save (the real code runs up to that point)."""
    from dist_gpt.checkpoint import manager, writer

    if where == "write":  # half of the data file written, no .metadata yet
        original = writer.FileSystemWriter.write_data

        def half_written(self, plan, planner):
            original(self, plan, planner)
            for f in Path(self.path).glob("*.distcp"):
                os.truncate(f, f.stat().st_size // 2)
            kill_self()

        writer.ChecksummedFileSystemWriter.write_data = half_written
    elif where == "rename":  # everything written, not yet renamed to step_0000002
        rename = os.rename

        def rename_or_die(src, dst, *a, **k):
            if Path(src).name.startswith(".tmp_step_"):
                kill_self()
            return rename(src, dst, *a, **k)

        manager.os.rename = rename_or_die
    elif where == "done":  # renamed to step_0000002, DONE not yet written
        manager.write_done = lambda *a: kill_self()
    else:
        raise SystemExit(f"unknown crash point {where}")


if __name__ == "__main__":
    main()

"""The one module that knows about ranks: environment detection, device, process group, wrapping.

One launch contract, three launchers: torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/PORT;
`srun python -m dist_gpt.train` (one SLURM task per rank, no torchrun) sets SLURM_PROCID/NTASKS/
LOCALID, from which the same variables are derived; a plain `python -m dist_gpt.train` is rank 0
of a world of 1 and starts no process group at all.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_gpt.errors import ConfigError, PeerLost, UserError


@dataclass
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None: no process group (world of 1)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def _slurm_to_torch_env() -> None:
    """Map a SLURM task (srun without torchrun) onto the torchrun variables."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ or "SLURM_NTASKS" not in os.environ:
        return
    if int(os.environ["SLURM_NTASKS"]) == 1 and "SLURM_STEP_ID" not in os.environ:
        return  # the batch script itself, not a step of ranks
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
    if "MASTER_ADDR" not in os.environ:
        nodes = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                               capture_output=True, text=True, check=True).stdout.split()
        os.environ["MASTER_ADDR"] = nodes[0]
    # A port derived from the job id: the same on every task, unlikely to collide between jobs.
    os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))


def _pick_device(preference: str, local_rank: int) -> torch.device:
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but no CUDA device is visible: use --train.device=cpu")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _cpu_threads(local_world_size: int, threads: int | None) -> int:
    """Each rank gets its share of the cores this process may run on (the cgroup/affinity view)."""
    if threads:
        return threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, local_world_size))


def _keep_freed_memory(largest: int) -> None:
    """Stop glibc from handing the memory a CPU training step frees back to the kernel.

    Every step frees and re-allocates the same activations. By default glibc serves blocks above
    its mmap threshold with fresh mappings and trims freed memory at the top of a heap, so each
    step page-faults (and zero-fills) that memory in again: ~3,400 faults and ~7 ms of a 70-100 ms
    step of the 4 x 4 x 128 model (docs/PERFORMANCE.md). Serving blocks up to `largest` bytes from
    the heap and never trimming it removes them; the process keeps its peak heap mapped, which the
    next step needs anyway. Linux with glibc only; elsewhere nothing changes.
    """
    if platform.libc_ver()[0] != "glibc":
        return
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
    mallopt(M_MMAP_THRESHOLD, largest)
    mallopt(M_TRIM_THRESHOLD, 2**31 - 1)


def init(device: str = "auto", timeout_s: float = 600.0, threads: int | None = None, layout: str = "ddp") -> DistEnv:
    """Detect the launcher, pick device and backend (nccl on CUDA, gloo on CPU), start the group.

    On a CPU, freed memory is kept for the next step (`_keep_freed_memory`): blocks up to 32 MiB
    (glibc's largest threshold) under ddp; under fsdp/hsdp only up to 4 MiB, because every block's
    gathered parameters (several MiB per matrix) are freed right after use and, kept in the heap,
    would never shrink the resident set: on 4 ranks of a 6 x 768 model (3 steps, one micro-step each)
    a rank's peak was 1,713 MiB with 32 MiB (ddp's: 1,813) and 1,093 MiB with 4 MiB (docs/SCALING.md).
    """
    _slurm_to_torch_env()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    dev = _pick_device(device, local_rank)
    if dev.type == "cpu":
        # torchrun sets OMP_NUM_THREADS=1 per worker; give each rank its share of the cores instead.
        torch.set_num_threads(_cpu_threads(local_world, threads))
        _keep_freed_memory(32 << 20 if layout == "ddp" else 4 << 20)
    env = DistEnv(rank, local_rank, world, local_world, dev, None)
    if world > 1:
        env.backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=env.backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=dev if dev.type == "cuda" else None)
    return env


# ---------------------------------------------------------------------------------------------
# Layouts: how the model is spread over the ranks (section `parallel`)

LAYOUTS = ("ddp", "fsdp", "hsdp")


@dataclass
class ParallelConfig:
    """The `parallel` section: how the model, its gradients and its optimizer state are laid out over
    the ranks. Applied by `parallelize`; a checkpoint saved under any layout resumes under any other."""

    data: str = field(default="ddp", metadata={"help": "ddp (every rank holds the whole model, optimizer state and gradients) | fsdp (all three sharded over every rank: FSDP2 fully_shard) | hsdp (sharded within groups of parallel.shard_size ranks, replicated across the groups)"})
    shard_size: int | None = field(default=None, metadata={"help": "hsdp: ranks per shard group; must divide the world size (default: the ranks of one node)"})
    reshard_after_forward: bool = field(default=True, metadata={"help": "fsdp/hsdp: free each block's gathered parameters after its forward and gather them again in backward (less memory, more communication)"})

    def __post_init__(self) -> None:
        if self.data not in LAYOUTS:
            raise ConfigError(f"parallel.data must be one of {' | '.join(LAYOUTS)}, got {self.data!r}")
        if self.shard_size is not None and self.shard_size < 1:
            raise ConfigError(f"parallel.shard_size must be at least 1 (or none), got {self.shard_size}")

    def mesh_shape(self, world_size: int, local_world_size: int) -> tuple[int, ...]:
        """(shard,) for fsdp, (replicate, shard) for hsdp, () for ddp; a ConfigError when the shard size
        does not divide the world."""
        if self.data == "ddp":
            return ()
        if self.data == "fsdp":
            return (world_size,)
        shard = self.shard_size or local_world_size
        if world_size % shard:
            raise ConfigError(f"parallel.shard_size={shard} does not divide the world size {world_size}: hsdp "
                              "needs whole shard groups; pass --parallel.shard_size=S with S dividing "
                              f"{world_size} (e.g. the ranks of one node)")
        return (world_size // shard, shard)


def device_mesh(env: DistEnv, cfg: ParallelConfig):
    """The DeviceMesh of a sharded layout; None for ddp, and for any layout in a world of one process
    (nothing to shard: the model is whole on its one device)."""
    if cfg.data == "ddp" or not env.distributed:
        return None
    shape = cfg.mesh_shape(env.world_size, env.local_world_size)
    names = ("shard",) if len(shape) == 1 else ("replicate", "shard")
    return init_device_mesh(env.device.type, shape, mesh_dim_names=names)


def parallelize(model: nn.Module, env: DistEnv, cfg: ParallelConfig, mesh, compile_model: bool,
                precision: str) -> tuple[nn.Module, nn.Module]:
    """Apply the layout to `model`, in this order; return (forward model, training model).

    1. activation checkpointing: the model's own option (model.activation_checkpointing), so it
       works the same on every layout;
    2. compile: the whole model under ddp; each block in place under fsdp/hsdp (names unchanged);
    3. fsdp/hsdp: `fully_shard` each block, then the root (embeddings, final norm, head); on CUDA in
       bf16 the parameters are gathered in bf16 and gradients reduced in fp32;
    4. ddp: DistributedDataParallel around the (compiled) model, on several ranks.

    The forward model evaluates and samples (never DDP's wrapper, whose forward would sync); the
    training model runs forward/backward. Under fsdp/hsdp both are `model` itself, sharded in place.
    """
    if mesh is None:
        fwd_model = torch.compile(model) if compile_model else model
        return fwd_model, wrap(fwd_model, env)
    # start-up cost: FSDP2 adds ~3 s to a DDP run's start (python -X importtime, 2-core AMD EPYC)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if compile_model:
        for block in model.blocks:
            block.compile()
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if env.device.type == "cuda" and precision == "bf16" else MixedPrecisionPolicy())
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=cfg.reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=cfg.reshard_after_forward)
    register_fsdp_forward_method(model, "generate")  # sampling reads the root's parameters outside forward
    return model, model


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device) -> None:
    """Give a model built on the meta device and sharded its initial weights, one parameter at a time.

    Each parameter is made full size on the CPU by the model's own init step, in the model's own
    order (so the random numbers are those an unsharded build with the same seed draws), and only
    this rank's share is kept: no rank ever holds the whole model.
    """
    # start-up cost: DTensor comes with FSDP2 (~3 s), which a DDP run never loads
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _replay_construction_draws(model)
    model.to_empty(device=device)
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, init in model.init_steps():
        param = params[name]
        full = torch.empty(param.shape, dtype=param.dtype)  # one parameter, full size, on the CPU
        init(full)
        if isinstance(param, DTensor):
            shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
            part = full[tuple(slice(o, o + n) for o, n in zip(offset, shape))]
            param.to_local().copy_(part)
        else:
            param.copy_(full)


def _replay_construction_draws(model: nn.Module) -> None:
    """An unsharded build draws random numbers before the model's own init: every nn.Linear and
    nn.Embedding initialises itself when it is constructed (and the model then overwrites it). On
    the meta device those draws do not happen, so make them here, in construction order, on
    throwaway CPU twins (one module at a time): the model's init then draws what it draws unsharded."""
    for module in model.modules():  # registration order = construction order
        if isinstance(module, nn.Linear):
            nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        elif isinstance(module, nn.Embedding):
            nn.Embedding(module.num_embeddings, module.embedding_dim, padding_idx=module.padding_idx)


def is_sharded(model: nn.Module) -> bool:
    """Whether forward passes of `model` are collective (fsdp/hsdp): every rank must run the same ones."""
    from torch.distributed.fsdp import FSDPModule  # start-up cost: as in parallelize, ~3 s for FSDP2

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def no_grad_sync(model: nn.Module):
    """Backward passes inside accumulate gradients without reducing them over the ranks (every
    micro-step but the last one of a step). Under fsdp/hsdp the gradients then stay unsharded until
    the last micro-step: gradient accumulation costs a full gradient's memory per rank."""
    from torch.distributed.fsdp import FSDPModule  # start-up cost: as in parallelize, ~3 s for FSDP2

    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    elif hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    else:
        yield


def wrap(model: nn.Module, env: DistEnv) -> nn.Module:
    """DDP around the model on several ranks; the raw model stays the caller's for saving/sampling.

    gradient_as_bucket_view avoids a copy of every gradient into the buckets. (static_graph is left
    off: it trips an internal assert with `no_sync` gradient accumulation.)
    """
    if not env.distributed:
        return model
    return DDP(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None,
               gradient_as_bucket_view=True, bucket_cap_mb=25)


def replica_group(env: DistEnv, cfg: ParallelConfig):
    """The group across which plain (unsharded) parameters are replicated: the whole world under ddp
    on several ranks, else None (FSDP2's DTensor parameters carry their own mesh). Muon divides its
    Newton-Schulz work among the ranks of this group."""
    return dist.group.WORLD if env.distributed and cfg.data == "ddp" else None


def is_collective_failure(error: BaseException) -> bool:
    """A timeout or a lost peer inside a collective, as opposed to a bug."""
    kinds = tuple(getattr(dist, name) for name in ("DistBackendError", "DistNetworkError", "DistError") if hasattr(dist, name))
    text = str(error)
    return isinstance(error, kinds) or any(s in text for s in ("Timed out", "timed out", "Connection closed by peer",
                                                               "Connection reset by peer", "Broken pipe"))


# ---------------------------------------------------------------------------------------------
# Collectives that are a no-op in a world of 1, so callers never branch on rank.

def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the running process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def from_rank0(obj):
    """Rank 0's `obj` on every rank (a collective; the object itself in a world of 1)."""
    if dist.is_available() and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def default_store():
    """The default process group's store (the rendezvous TCPStore), where the heartbeat writes."""
    return dist.distributed_c10d._get_default_store()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown(code: int = 0) -> None:
    """End an entry point: barrier, destroy the group, flush, `os._exit` (writers are closed by then).

    gloo can abort at interpreter exit (a gloo thread frees a tensor while Python finalizes) even
    after destroy_process_group; leaving through os._exit after flushing avoids it entirely.
    """
    if dist.is_available() and dist.is_initialized():
        try:
            if code == 0:
                dist.barrier()
            dist.destroy_process_group()
        except Exception:  # a peer already gone: nothing left to synchronise with
            code = code or 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_main(run, argv: list[str]) -> None:
    """The one way an entry point ends: `exit_code(run, argv)`, then `shutdown` on every rank."""
    shutdown(exit_code(run, argv))


def exit_code(run, argv: list[str]) -> int:
    """`run(argv)`'s exit code; a UserError becomes its one-line message and exit code 2, a lost peer
    (errors.PeerLost) its message and 4 (the tests call entry points in-process through this).

    A ConfigError raised before the process group exists comes from the command line, which every
    rank of a launch shares: only the launch's rank 0 prints it, so it appears once, first.
    """
    try:
        return run(argv)
    except (UserError, PeerLost) as e:
        same_everywhere = isinstance(e, ConfigError) and not (dist.is_available() and dist.is_initialized())
        if not same_everywhere or launch_rank() == 0:
            print(f"error: {e}", file=sys.stderr)
        return e.exit_code


def launch_rank() -> int:
    """This process's rank as the launcher set it (torchrun's RANK or SLURM's SLURM_PROCID), before init."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def launch_world() -> tuple[int, int]:
    """(world size, ranks on this node) as the launcher set them up (torchrun's WORLD_SIZE and
    LOCAL_WORLD_SIZE, or the SLURM tasks of a step), before the process group starts."""
    _slurm_to_torch_env()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world, int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))

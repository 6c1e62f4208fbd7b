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
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_gpt.errors import ConfigError, Refusal

from . import fp8


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


def launch_device(preference: str) -> torch.device:
    """The device `init` will give this rank (train.device), known before the process group starts,
    so that a setting the device cannot run is refused once, by the launch's rank 0."""
    _slurm_to_torch_env()
    return _pick_device(preference, int(os.environ.get("LOCAL_RANK", "0")))


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


def init(device: str = "auto", timeout_s: float = 600.0, threads: int | None = None, layout: str = "ddp",
         flight_dir: str | Path | None = None) -> DistEnv:
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
        if flight_dir is not None:  # read when the NCCL process group is created, so set before it
            set_flight_recorder_env(flight_dir)
        dist.init_process_group(backend=env.backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=dev if dev.type == "cuda" else None)
    return env


# NCCL's flight recorder: a ring buffer of each rank's recent collectives, dumped on a timeout.
FLIGHT_RECORDER = (  # (variable, its older name, dist_gpt's value; None: the dump folder's file prefix)
    ("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE", "2000"),
    ("TORCH_NCCL_DUMP_ON_TIMEOUT", None, "1"),
    ("TORCH_FR_DUMP_TEMP_FILE", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE", None),
)


def set_flight_recorder_env(folder: str | Path) -> dict[str, str]:
    """Turn on NCCL's flight recorder (2,000 collectives per rank, dumped on a collective timeout to
    `<folder>/rank_<r>`), leaving alone each variable the user set (under either of its names).
    Returns what it set. gloo has no flight recorder: the variables are then inert."""
    chosen = {}
    for name, old_name, value in FLIGHT_RECORDER:
        if name in os.environ or (old_name and old_name in os.environ):
            continue
        chosen[name] = value if value is not None else str(Path(folder) / "rank_")
    os.environ.update(chosen)
    return chosen


# ---------------------------------------------------------------------------------------------
# Layouts: how the model is spread over the ranks (section `parallel`)

LAYOUTS = ("ddp", "fsdp", "hsdp")


@dataclass
class ParallelConfig:
    """The `parallel` section: how the model, its gradients and its optimizer state are laid out over
    the ranks. Applied by `parallelize`; a checkpoint saved under any layout resumes under any other."""

    data: str = field(default="ddp", metadata={"help": "ddp (every rank holds the whole model, optimizer state and gradients) | fsdp (all three sharded over every rank: FSDP2 fully_shard) | hsdp (sharded within groups of parallel.shard_size ranks, replicated across the groups)"})
    shard_size: int | None = field(default=None, metadata={"help": "hsdp only: ranks per shard group; must divide the world size (default: the ranks of one node); refused with fsdp, which shards over every rank; ddp ignores it (--dry-run uses it for its hsdp row)"})
    reshard_after_forward: bool = field(default=True, metadata={"help": "fsdp/hsdp: free each block's gathered parameters after its forward and gather them again in backward (less memory, more communication)"})

    def __post_init__(self) -> None:
        if self.data not in LAYOUTS:
            raise ConfigError(f"parallel.data must be one of {' | '.join(LAYOUTS)}, got {self.data!r}")
        if self.shard_size is not None and self.shard_size < 1:
            raise ConfigError(f"parallel.shard_size must be at least 1 (or none), got {self.shard_size}")

    def check_launch(self, world_size: int, local_world_size: int) -> None:
        """Refuse a layout that cannot run on this launch (a ConfigError naming the option).

        fsdp with a shard size is refused rather than run: fsdp always shards over the whole world,
        so the user asked for something (groups of S ranks: hsdp) that fsdp would silently not do."""
        if self.data == "fsdp" and self.shard_size is not None:
            raise ConfigError(f"parallel.shard_size={self.shard_size} applies to hsdp only: fsdp shards over every "
                              f"rank ({world_size}); drop --parallel.shard_size, or pass --parallel.data=hsdp for "
                              "shard groups of that size")
        self.mesh_shape(world_size, local_world_size)

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


def use_compile(setting: bool | None, device: torch.device) -> bool:
    """train.compile with auto (None) decided as before the run-length rule: on for CUDA, off on CPU.
    The trainer decides with `compile_rule.decide` (which compiles long CPU runs too); this is how
    auto resumes a checkpoint written before the choice was recorded. An explicit true/false wins."""
    return device.type == "cuda" if setting is None else setting


@dataclass
class Transforms:
    """What `parallelize` applies to the model besides the layout (trainer.build_model decides them)."""

    compile: bool = False   # train.compile, decided (use_compile)
    precision: str = "fp32"  # the resolved train.precision: bf16 gathers parameters in bf16 under fsdp on CUDA
    fp8: bool = False       # train.fp8: the blocks' linears in float8 (dist_gpt/parallel/fp8.py)


def parallelize(model: nn.Module, env: DistEnv, cfg: ParallelConfig, mesh,
                transforms: Transforms) -> tuple[nn.Module, nn.Module]:
    """Apply the layout to `model`, in this order; return (forward model, training model).

    1. activation checkpointing: the model's own option (model.activation_checkpointing), so it
       works the same on every layout;
    2. fp8: the blocks' nn.Linear layers become torchao Float8Linear, in place (same parameters,
       same names), before compile traces them and before fully_shard shards their weights;
    3. compile: the whole model under ddp; each block in place under fsdp/hsdp (names unchanged);
    4. fsdp/hsdp: `fully_shard` each block, then the root (embeddings, final norm, head); on CUDA in
       bf16 the parameters are gathered in bf16 and gradients reduced in fp32;
    5. ddp: DistributedDataParallel around the (compiled) model, on several ranks.

    The forward model evaluates and samples (never DDP's wrapper, whose forward would sync); the
    training model runs forward/backward. Under fsdp/hsdp both are `model` itself, sharded in place.
    """
    if transforms.fp8:
        fp8.convert(model)
    if mesh is None:
        fwd_model = torch.compile(model) if transforms.compile else model
        return fwd_model, wrap(fwd_model, env)
    # start-up cost: FSDP2 adds ~3 s to a DDP run's start (python -X importtime, 2-core AMD EPYC)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if transforms.compile:
        for block in model.blocks:
            block.compile()
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if env.device.type == "cuda" and transforms.precision == "bf16" else MixedPrecisionPolicy())
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


def settle_buckets(model: nn.Module, first_step) -> None:
    """Give DDP its final gradient-bucket layout before the first real step, in every process.

    DDP reduces a process's first synchronised backward in one bucket in parameter order and then
    rebuilds its buckets in the order the gradients became ready. gloo's ring all-reduce sums each
    element over the ranks in an order set by its place in the bucket, so with 3 or more ranks
    (a + b = b + a hides it on 2) a resumed process, whose first step is the uninterrupted run's k-th,
    summed in another order and drifted in the last bits. `first_step()` runs one forward/backward of
    the training micro-batch's shape (its gradients are dropped, the random state restored); the
    rebuild happens at the next forward, so every real step of every process uses the rebuilt layout.
    """
    if not isinstance(model, DDP):
        return
    devices = [model.device] if model.device_type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        first_step()
    for p in model.parameters():
        p.grad = None


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
    """`run(argv)`'s exit code; a `Refusal` (UserError: 2, errors.PeerLost: 4, ...) goes through
    `refuse` (the tests call entry points in-process through this)."""
    try:
        return run(argv)
    except Refusal as e:
        return refuse(e)


def refuse(error: Refusal) -> int:
    """The one path of every refusal: its line `error: <message>` on stderr, printed by one rank of
    the launch, and written to torchrun's error file so that torchrun's summary quotes it as the root
    cause. Returns the exit status (`error.exit_code`).

    Raise a `Refusal` under `run_main` and this is done for you; code that cannot raise into it (a
    watchdog thread) calls `refuse(error)` itself and exits with what it returns. Never collective:
    peers may be anywhere (in another collective, hung, gone), so nothing here waits for them.
    """
    message = f"error: {error}"
    if _first_to_report(error, message):
        print(message, file=sys.stderr, flush=True)
    record_for_torchrun(message)
    return error.exit_code


def _first_to_report(error: Refusal, message: str) -> bool:
    """Whether this rank prints the refusal: one rank per distinct message and launch.

    Before the process group, a ConfigError comes from the command line every rank shares: the
    launch's rank 0 prints it. With a process group, the first rank to count the message in the
    rendezvous store prints it (a store `add` needs no peer, so it cannot hang on ranks that did not
    hit the error); a message that names its own rank ("rank 1: ...") counts as the same refusal.
    If the store's host is gone, every rank prints: twice is better than never.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return not isinstance(error, ConfigError) or launch_rank() == 0

    key = "dist_gpt/refusal/" + hashlib.sha256(re.sub(r"^error: rank \d+: ", "", message).encode()).hexdigest()
    try:
        store = default_store()
        store.set_timeout(datetime.timedelta(seconds=10))
        return store.add(key, 1) == 1
    except Exception:  # the agent that hosts the store is gone
        return True


def record_for_torchrun(message: str) -> None:
    """Write `message` where torchrun looks for a worker's root cause (TORCHELASTIC_ERROR_FILE, set by
    torchrun for each worker), in the JSON of torch.distributed.elastic's ErrorHandler.record_exception:
    the summary torchrun prints on failure then shows it as `traceback : error: ...` instead of
    `error_file: <N/A>`. Nothing to do outside torchrun."""

    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {"message": {"message": message,
                        "extraInfo": {"py_callstack": message, "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as f:
            json.dump(data, f)
    except OSError:  # the agent's log directory is gone or full: the printed line still stands
        pass


def launch_rank() -> int:
    """This process's rank as the launcher set it (torchrun's RANK or SLURM's SLURM_PROCID), before init."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def launch_world() -> tuple[int, int]:
    """(world size, ranks on this node) as the launcher set them up (torchrun's WORLD_SIZE and
    LOCAL_WORLD_SIZE, or the SLURM tasks of a step), before the process group starts."""
    _slurm_to_torch_env()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world, int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
